"""cli.command_line: every entry point run through cli.run checks its flags before doing any work,
and gets the text of its string flags as typed."""
import glob
import os

import fire
import pytest
from fire.parser import DefaultParseValue

import cli
from conftest import REPO_ROOT, run_main, run_script
from errors import UserError

ENTRY_POINTS = sorted(os.path.relpath(path, REPO_ROOT)
                      for path in glob.glob(f"{REPO_ROOT}/src/*.py") + glob.glob(f"{REPO_ROOT}/*.py")
                      if "cli.run(" in open(path, encoding="utf-8").read() and not path.endswith("cli.py"))
CALLS = []


def sample_model(prompt: str = None, model_name="124M", top_k: int = 0, length: int = None, stop_at_eot=False,
                 stop: cli.str_or_list = None, max_steps=None):
    """Stands in for an entry point."""
    CALLS.append(dict(locals()))


def score(*files: str, json=False):
    """Stands in for an entry point with *args."""
    CALLS.append(dict(files=files, json=json))


def bound(fn, *args):
    """What fn is called with when run with `args` through command_line and fire."""
    CALLS.clear()
    fire.Fire(fn, command=cli.command_line(fn, list(args)))
    return CALLS[-1]


def flag_values(fn, *args):
    """What fire makes of each --name=value that command_line writes for `fn`."""
    return {name[2:]: DefaultParseValue(value) for name, _, value in
            (arg.partition("=") for arg in cli.command_line(fn, list(args)) if arg.startswith("--"))}


def test_every_entry_point_is_found():
    assert {"src/generate_unconditional_samples.py", "src/train.py", "src/encode.py", "download_model.py"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_a_mistyped_flag_stops_every_entry_point_at_once(script, tmp_path):
    result = run_script(script, "--model_nam", "124M", "--models_dir", tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "error: unknown flag --model_nam (did you mean --model_name?)\n"
    assert result.stdout == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,expected", [
    (["--top_k", "40"], {"top_k": 40}),
    (["--top_k=40"], {"top_k": 40}),
    (["--top-k", "40"], {"top_k": 40}),
    (["--max-steps=3"], {"max_steps": 3}),
    (["--top_k", "-1"], {"top_k": -1}),
    (["-t", "5"], {"top_k": 5}),  # fire's shortcut for the one flag starting with t
    (["--stop_at_eot"], {"stop_at_eot": True}),
    (["--nostop_at_eot"], {"stop_at_eot": False}),
    (["--stop_at_eot", "false"], {"stop_at_eot": False}),
    (["--stop_at_eot=True"], {"stop_at_eot": True}),
    (["Hello", "--top_k", "2"], {"prompt": "Hello", "top_k": 2}),
    (["--top_k", "2", "Hi", "355M"], {"prompt": "Hi", "model_name": "355M", "top_k": 2}),
])
def test_flags_as_fire_spells_them_bind_as_fire_binds_them(args, expected):
    call = bound(sample_model, *args)
    assert {k: v for k, v in call.items() if k in expected} == expected


@pytest.mark.parametrize("args", [["--topk", "--help"], ["-h"], ["--top_k", "1", "--", "--help"]])
def test_help_is_left_to_fire(args):
    assert cli.command_line(sample_model, args) == args


def test_what_follows_the_last_double_dash_is_fires_own():
    assert cli.command_line(sample_model, ["--top_k", "1", "--", "--trace"]) == ["--top_k=1", "--", "--trace"]


@pytest.mark.parametrize("args,message", [
    (["--topk", "40"], "unknown flag --topk (did you mean --top_k?)"),
    (["--max_step=3"], "unknown flag --max_step (did you mean --max_steps?)"),
    (["--no_stop_at_eot"], "unknown flag --no_stop_at_eot (did you mean --nostop_at_eot?)"),
    (["--notop_k"], "unknown flag --notop_k (did you mean --top_k?)"),
    (["-x"], "unknown flag -x (--help lists the flags)"),
    (["--trace", "--", "--verbose"], "unknown flag --trace (--help lists the flags)"),
    (["a", "b", "1", "2", "False", "c", "d", "e"], "unexpected argument 'e' (flags start with --; --help lists them)"),
    (["--top_k"], "--top_k needs a value (write --top_k=VALUE for one that starts with -)"),
    (["--stop", "--top_k", "1"], "--stop needs a value (write --stop=VALUE for one that starts with -)"),
    (["--stop_at_eot=yes"], "--stop_at_eot is a switch: give --stop_at_eot or --nostop_at_eot, not 'yes'"),
    (["--nostop_at_eot=True"], "--nostop_at_eot takes no value: give --nostop_at_eot alone"),
    (["--length", "abc"], "--length must be a whole number, got 'abc'"),
    (["--length", "2.5"], "--length must be a whole number, got '2.5'"),
    (["--top_k", "True"], "--top_k must be a whole number, got 'True'"),
])
def test_bad_command_lines_are_user_errors(args, message):
    with pytest.raises(UserError) as raised:
        cli.command_line(sample_model, args)
    assert str(raised.value) == message


@pytest.mark.parametrize("typed,expected", [
    ("5", "5"), ("1.50", "1.50"), ("True", "True"), ("None", "None"), ("[1]", "[1]"), ("[", "["),
    ('["\\n\\n", "THE END"]', ["\n\n", "THE END"]),
    ("THE END", "THE END"),
])
def test_a_stop_value_is_the_text_typed_unless_it_is_a_list_of_strings(typed, expected):
    assert bound(sample_model, "--stop", typed)["stop"] == expected
    assert bound(sample_model, f"--stop={typed}")["stop"] == expected


@pytest.mark.parametrize("typed", ["12", "1.50", "True", "[1, 2]", "-1", "None", "caf\udce9"])
def test_string_arguments_and_flags_are_the_text_typed(typed):
    assert bound(sample_model, typed)["prompt"] == typed
    assert bound(sample_model, "--prompt", typed)["prompt"] == typed
    assert bound(sample_model, "--model_name", typed)["model_name"] == typed  # a str default makes it a string
    assert bound(score, typed, typed)["files"] == (typed, typed)


def test_a_switch_does_not_swallow_the_next_word():
    assert bound(score, "--json", "file.txt") == {"files": ("file.txt",), "json": True}
    assert bound(score, "--json", "False", "file.txt") == {"files": ("file.txt",), "json": False}
    assert bound(score, "--nojson", "True") == {"files": ("True",), "json": False}


def test_the_scripts_paths_and_names_are_strings():
    import encode
    import evaluate
    import generate_conditional_samples
    import generate_unconditional_samples
    import interactive_conditional_samples
    import score as score_script
    import train

    for fn in (generate_unconditional_samples.sample_model, generate_conditional_samples.sample_model,
               interactive_conditional_samples.interact_model, score_script.score, encode.encode, evaluate.evaluate):
        values = flag_values(fn, "--models_dir", "2019", "--model_name", "1")
        assert values == {"models_dir": "2019", "model_name": "1"}, fn.__module__
    for fn in (generate_unconditional_samples.sample_model, generate_conditional_samples.sample_model,
               interactive_conditional_samples.interact_model):
        assert flag_values(fn, "--stop", "5", "--length", "7") == {"stop": "5", "length": 7}, fn.__module__
        assert flag_values(fn, "--bad_words", "5", "--logit_bias", '{"5": 1}') == {
            "bad_words": "5", "logit_bias": '{"5": 1}'}, fn.__module__
        with pytest.raises(UserError, match="--length must be a whole number, got 'abc'"):
            cli.command_line(fn, ["--length", "abc"])
    assert flag_values(generate_conditional_samples.sample_model, "--prompt_file", "1") == {"prompt_file": "1"}
    assert flag_values(train.train, "--run_name", "1", "--checkpoint_dir", "5", "--sample_dir", "5",
                       "--models_dir", "2019") == {"run_name": "1", "checkpoint_dir": "5", "sample_dir": "5",
                                                   "models_dir": "2019"}
    assert cli.command_line(encode.encode, ["2019", "1.npz"]) == ["'2019'", "'1.npz'"]


def test_a_typo_ends_an_endless_run_before_it_starts(tiny_models_dir):
    # Without the check this run would sample forever and time out.
    result = run_script("generate_unconditional_samples.py", "--model_name", "tiny", "--models_dir", tiny_models_dir,
                        "--topk", 40, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: unknown flag --topk (did you mean --top_k?)\n"


def test_score_json_then_a_file_scores_the_file(tiny_models_dir, tmp_path):
    (tmp_path / "file.txt").write_text("Some text to score.", encoding="utf-8")
    result = run_main("score.py", "--model_name", "tiny", "--models_dir", tiny_models_dir, "--json",
                      tmp_path / "file.txt")
    assert result.returncode == 0, result.stderr
    assert '"input": "' + str(tmp_path / "file.txt") in result.stdout


def test_encode_and_train_do_no_work_for_a_mistyped_flag(tiny_models_dir, tmp_path):
    (tmp_path / "corpus.txt").write_text("Some text to encode and train on. " * 20, encoding="utf-8")
    encoded = run_script("encode.py", tmp_path / "corpus.txt", tmp_path / "out.npz", "--topk", 5, timeout=120)
    assert encoded.stderr == "error: unknown flag --topk (--help lists the flags)\n"  # encode.py has no --top_k
    assert encoded.returncode == 2 and not (tmp_path / "out.npz").exists()
    trained = run_script("train.py", "--dataset", tmp_path / "corpus.txt", "--model_name", "tiny", "--models_dir",
                         tiny_models_dir, "--checkpoint_dir", tmp_path / "ck", "--sample_dir", tmp_path / "samples",
                         "--max_step", 3, timeout=120)
    assert trained.returncode == 2 and trained.stdout == ""
    assert trained.stderr == "error: unknown flag --max_step (did you mean --max_steps?)\n"
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]
