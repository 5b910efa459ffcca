"""generate_conditional_samples.py: prompts from an argument, a file or stdin; one per line."""
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, SRC_DIR, run_main, run_script
from test_generate_unconditional_samples import CONTROL_FLAGS, CONTROLS, FLAGS, assert_one_line_error, headers

SCRIPT = "generate_conditional_samples.py"


def run(models_dir, *args, stdin=b"", length=8, runner=run_main):
    return runner(SCRIPT, *args, "--model_name", "tiny", "--models_dir", models_dir, "--length", length, stdin=stdin)


def samples(stdout):
    """The text of each sample, in order."""
    parts = re.split(r"={40} SAMPLE \d+ ={40}\n", stdout)[1:]
    return [p.split("=" * 80 + "\n")[0].rstrip("\n") for p in parts]


def test_help_documents_every_flag():
    result = run_script(SCRIPT, "--help", env={"PAGER": "cat"})
    assert result.returncode == 0
    for flag in FLAGS + ["prompt_file", "per_line", "json", "logprobs"]:
        assert f"--{flag}" in result.stdout + result.stderr, flag


def test_argument_file_and_stdin_give_the_same_samples(tiny_models_dir, tmp_path):
    prompt = "The quick brown fox"
    (tmp_path / "p.txt").write_text(prompt, encoding="utf-8")
    a = run(tiny_models_dir, prompt, "--seed", 2, "--nsamples", 2, runner=run_script)
    b = run(tiny_models_dir, "--prompt_file", tmp_path / "p.txt", "--seed", 2, "--nsamples", 2)
    c = run(tiny_models_dir, "--seed", 2, "--nsamples", 2, stdin=prompt.encode())
    assert a.returncode == b.returncode == c.returncode == 0, a.stderr
    assert a.stdout == b.stdout == c.stdout
    assert headers(a.stdout) == [1, 2]


def test_one_prompt_per_line_batches_mixed_lengths_exactly(tiny_models_dir, tmp_path):
    prompts = ["Hi", "A much longer prompt with many more tokens in it", "Third"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    batched = run(tiny_models_dir, "--prompt_file", tmp_path / "p.txt", "--per_line", "--batch_size", 3,
                  "--temperature", 0)
    assert batched.returncode == 0, batched.stderr
    out = batched.stdout
    assert headers(out) == [1, 1, 1]
    assert out.count("=" * 80 + "\n") == 3
    # Greedy rows of a mixed batch equal each prompt generated alone: padding changes nothing.
    for prompt, text in zip(prompts, samples(out)):
        alone = run(tiny_models_dir, prompt, "--temperature", 0)
        assert samples(alone.stdout) == [text]


@pytest.mark.parametrize("content,pattern", [
    (b"caf\xe9", r"not valid UTF-8"),
    (b"", r"the prompt is empty"),
])
def test_bad_prompt_files(tiny_models_dir, tmp_path, content, pattern):
    (tmp_path / "p.txt").write_bytes(content)
    assert_one_line_error(run(tiny_models_dir, "--prompt_file", tmp_path / "p.txt"), pattern)


def test_prompt_too_long_says_how_much_room(tiny_models_dir):
    result = run(tiny_models_dir, " word" * 70, length=10)
    assert_one_line_error(result, r"the prompt is 70 tokens and the window 64: use a prompt 6 tokens shorter, "
                                  r"or use --truncate left to keep its last 64$")


def test_truncate_left_notes_it_and_goes_on_past_the_window(tiny_models_dir, tiny_gpt):
    result = run(tiny_models_dir, " word" * 70, "--truncate", "left", "--temperature", 0, length=100)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "note: the prompt is 70 tokens, longer than the window: only its last 64 go in (--truncate left)"]
    gpt = tiny_gpt
    assert gpt.generate([gpt.encode(" word" * 70)[-64:]], 100, temperature=0)[0] in result.stdout


def test_missing_prompt_file(tiny_models_dir, tmp_path):
    assert_one_line_error(run(tiny_models_dir, "--prompt_file", tmp_path / "nope.txt"), r"cannot read --prompt_file")


@pytest.mark.parametrize("args,pattern", [
    (["Hi", "--length", "abc"], r"^error: --length must be a whole number, got 'abc'$"),
    (["--prompt_file"], r"^error: --prompt_file needs a value"),
    (["--prompt_file", "1"], r"^error: cannot read --prompt_file 1: No such file"),  # not file descriptor 1
])
def test_flag_values_that_fire_would_misread(tiny_models_dir, args, pattern):
    result = run_main(SCRIPT, "--model_name", "tiny", "--models_dir", tiny_models_dir, *args, stdin=b"")
    assert_one_line_error(result, pattern)
    assert result.stdout == ""


def test_prompts_and_stops_that_look_like_numbers_are_text(tiny_models_dir, tmp_path):
    (tmp_path / "p.txt").write_text("12.50", encoding="utf-8")
    typed = run(tiny_models_dir, "12.50", "--seed", 2, "--stop", "True", "--temperature", 0)
    from_file = run(tiny_models_dir, "--prompt_file", tmp_path / "p.txt", "--seed", 2, "--stop", "True",
                    "--temperature", 0)
    assert typed.returncode == 0, typed.stderr
    assert typed.stdout == from_file.stdout  # "12.50" was not read as the number 12.5


def test_an_undecodable_prompt_argument_is_a_one_line_error(tiny_models_dir):
    # Python passes an argument's undecodable bytes on as lone surrogates, which no encoder takes.
    result = subprocess.run([sys.executable, f"{SRC_DIR}/{SCRIPT}", b"caf\xe9", "--model_name", "tiny",
                             "--models_dir", tiny_models_dir], capture_output=True, text=True, cwd=REPO_ROOT,
                            timeout=300)
    assert_one_line_error(result, r"^error: the prompt is not valid UTF-8 \(character 4\): convert it to UTF-8$")


def test_the_controls_give_the_apis_text(tiny_models_dir, tiny_gpt):
    result = run(tiny_models_dir, "Hello there", "--temperature", 0, *CONTROL_FLAGS, length=12)
    assert result.returncode == 0, result.stderr
    gpt = tiny_gpt
    want = gpt.generate("Hello there", 12, temperature=0, **CONTROLS)
    assert samples(result.stdout) == [want] and want != gpt.generate("Hello there", 12, temperature=0)


def test_json_with_logprobs_prints_the_apis_records_one_line_each(tiny_models_dir, tiny_gpt):
    import json

    result = run(tiny_models_dir, "Hello there", "--temperature", 0, "--json", "--logprobs", 3, "--nsamples", 2,
                 "--repetition_penalty", 1.5)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    want = tiny_gpt.generate("Hello there", 8, temperature=0, logprobs=3, repetition_penalty=1.5)
    assert len(lines) == 2
    for got in map(json.loads, lines):
        assert (got["prompt"], got["text"]) == (want["prompt"], want["text"])
        assert [t["id"] for t in got["tokens"]] == [t["id"] for t in want["tokens"]]
        np.testing.assert_allclose([t["logprob"] for t in got["tokens"]], [t["logprob"] for t in want["tokens"]],
                                   atol=1e-5)
        assert [[a for a, _ in t["top_logprobs"]] for t in got["tokens"]] == [
            [a for a, _ in t["top_logprobs"]] for t in want["tokens"]]
    assert len(want["tokens"]) == 8 and all(len(t["top_logprobs"]) == 3 for t in want["tokens"])
