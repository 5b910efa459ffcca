"""The interactive loop, driven through standard input."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, SRC_DIR, run_main, run_script, sigint_as_at_a_terminal
from test_generate_unconditional_samples import CONTROL_FLAGS, CONTROLS, FLAGS, assert_one_line_error, headers

SCRIPT = "interactive_conditional_samples.py"


def run(models_dir, stdin, *args, runner=run_main):
    return runner(SCRIPT, "--model_name", "tiny", "--models_dir", models_dir, "--length", 6, "--seed", 3, *args,
                  stdin=stdin)


def test_help_documents_every_flag_and_multiline_prompts():
    result = run_script(SCRIPT, "--help", env={"PAGER": "cat"})
    assert result.returncode == 0
    for flag in FLAGS:
        assert f"--{flag}" in result.stdout + result.stderr, flag
    assert "backslash" in result.stdout + result.stderr


def test_prompts_until_end_of_input(tiny_models_dir):
    result = run(tiny_models_dir, "Hello there\n\nA second prompt\n", "--nsamples", 2, "--batch_size", 2)
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert out.count("Model prompt >>> ") == 4  # two prompts, the empty one, and the last at EOF
    assert out.count("Prompt should not be empty!") == 1
    assert headers(out) == [1, 2, 1, 2]
    assert out.count("=" * 80 + "\n") == 2


def test_a_prompt_too_long_is_refused_and_the_next_one_answered(tiny_models_dir):
    result = run(tiny_models_dir, " word" * 70 + "\nHello\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ("error: the prompt is 70 tokens and the window 64: use a prompt 6 tokens shorter, "
                                     "or use --truncate left to keep its last 64")
    assert headers(result.stdout) == [1]


def test_backslash_continues_the_prompt(tiny_models_dir):
    result = run(tiny_models_dir, "first line\\\nsecond line\n")
    out = result.stdout
    assert result.returncode == 0
    assert out.count("=" * 80 + "\n") == 1  # one prompt, not two
    assert "... " in out


def test_same_seed_same_samples_across_runs(tiny_models_dir):
    a = run(tiny_models_dir, "Once upon a time\n", "--top_k", 40, runner=run_script)
    b = run(tiny_models_dir, "Once upon a time\n", "--top_k", 40)  # in another process, one that has run other tests
    assert a.returncode == 0 and a.stdout == b.stdout


def test_too_long_prompt_is_reported_and_the_loop_goes_on(tiny_models_dir):
    long_prompt = " word" * 70
    result = run(tiny_models_dir, long_prompt + "\nshort\n")
    assert result.returncode == 0
    err = result.stderr
    assert "Traceback" not in err
    assert re.search(r"the prompt is 70 tokens", err)
    assert headers(result.stdout) == [1]


def test_undecodable_input_is_a_one_line_error(tiny_models_dir):
    result = run(tiny_models_dir, b"caf\xe9\n")
    err = result.stderr
    assert result.returncode != 0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "UTF-8" in err


def test_ctrl_c_at_the_prompt_exits_zero(tiny_models_dir):
    process = subprocess.Popen(
        [sys.executable, f"{SRC_DIR}/{SCRIPT}", "--model_name", "tiny", "--models_dir", tiny_models_dir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT,
        preexec_fn=sigint_as_at_a_terminal)
    # Wait for the prompt, which is printed without a newline.
    seen = b""
    deadline = time.time() + 240
    while b">>> " not in seen and time.time() < deadline:
        seen += process.stdout.read1(100)
    assert b"Model prompt >>> " in seen
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert b"Traceback" not in err


def test_a_length_that_is_not_a_number_is_refused_at_once(tiny_models_dir):
    result = run(tiny_models_dir, "Hello\n", "--length", "abc")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --length must be a whole number, got 'abc'\n"


def test_a_stop_that_looks_like_a_number_is_text(tiny_models_dir):
    result = run(tiny_models_dir, "Hello\n", "--stop", "1.5")
    assert result.returncode == 0, result.stderr
    assert headers(result.stdout) == [1]


def test_undecodable_bytes_under_a_utf8_locale_are_a_one_line_error(tiny_models_dir):
    # As the Dockerfiles run it: LANG=C.UTF-8 and no PYTHONIOENCODING, where Python reads stdin
    # with surrogateescape, so that bad bytes arrive as text instead of raising.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8", "LC_ALL", "LC_CTYPE")}
    env["LANG"] = "C.UTF-8"
    probe = subprocess.run([sys.executable, "-c", "import sys; print(sys.stdin.errors)"], env=env,
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert probe.stdout.strip() == "surrogateescape"
    result = subprocess.run([sys.executable, f"{SRC_DIR}/{SCRIPT}", "--model_name", "tiny", "--models_dir",
                             tiny_models_dir, "--length", "4"], input=b"\xff\xfe\n", capture_output=True,
                            env=env, cwd=REPO_ROOT, timeout=300)
    err = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.match(r"error: the input is not valid UTF-8 .*: type or pipe UTF-8 text$", err.strip())


@pytest.mark.parametrize("length,pattern", [
    (0, r"--length must be a whole number >= 1, got 0"),
])
def test_a_length_the_model_cannot_give_is_refused_before_the_first_prompt(tiny_models_dir, length, pattern):
    result = run_main(SCRIPT, "--model_name", "tiny", "--models_dir", tiny_models_dir, "--length", length,
                      stdin="Hello\nAgain\n")
    assert result.returncode == 2
    assert_one_line_error(result, pattern)
    assert result.stdout == ""  # not even the prompt


def test_the_controls_give_the_apis_text(tiny_models_dir, tiny_gpt):
    result = run(tiny_models_dir, "Hello there\n", "--temperature", 0, *CONTROL_FLAGS)
    assert result.returncode == 0, result.stderr
    gpt = tiny_gpt
    want = gpt.generate("Hello there", 6, temperature=0, **CONTROLS)
    assert want in result.stdout and want != gpt.generate("Hello there", 6, temperature=0)
