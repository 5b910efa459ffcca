"""End-to-end runs of generate_unconditional_samples.py on a tiny random model."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import sample
from conftest import REPO_ROOT, SRC_DIR, run_main, run_script, sigint_as_at_a_terminal

SCRIPT = "generate_unconditional_samples.py"
FLAGS = ["model_name", "seed", "nsamples", "batch_size", "length", "temperature", "top_k", "top_p",
         "models_dir", "stop_at_eot", "stop", "dtype", "repetition_penalty", "presence_penalty", "frequency_penalty",
         "logit_bias", "bad_words", "min_length"]
# The generation controls, each on, as flags and as the API takes them.
CONTROL_FLAGS = ["--repetition_penalty", 1.5, "--presence_penalty", 0.5, "--frequency_penalty", -0.5,
                 "--logit_bias", '{"464": 3, " the": -100}', "--bad_words", '["and", "of the"]', "--min_length", 6]
CONTROLS = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=-0.5,
                logit_bias={464: 3, " the": -100}, bad_words=["and", "of the"], min_length=6)


def headers(stdout):
    return [int(n) for n in re.findall(r"={40} SAMPLE (\d+) ={40}\n", stdout)]


def assert_one_line_error(result, pattern):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_help_documents_every_flag():
    result = run_script(SCRIPT, "--help", env={"PAGER": "cat"})
    assert result.returncode == 0
    for flag in FLAGS:
        assert f"--{flag}" in result.stdout + result.stderr, flag


def test_samples_are_numbered_one_to_n_for_any_batch_size(tiny_models_dir):
    result = run_main(SCRIPT, "--model_name", "tiny", "--models_dir", tiny_models_dir, "--nsamples", 6,
                      "--batch_size", 3, "--length", 5, "--seed", 1)
    assert result.returncode == 0, result.stderr
    assert headers(result.stdout) == [1, 2, 3, 4, 5, 6]


def test_seed_repeats_the_output(tiny_models_dir):
    args = ["--model_name", "tiny", "--models_dir", tiny_models_dir, "--nsamples", 2, "--length", 12, "--top_k", 40]
    a = run_script(SCRIPT, *args, "--seed", 5)
    b = run_main(SCRIPT, *args, "--seed", 5)  # in another process, one that has run other tests
    c = run_main(SCRIPT, *args, "--seed", 6)
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


@pytest.mark.parametrize("args,pattern", [
    (["--nsamples", 3, "--batch_size", 2], r"--nsamples \(3\) must be a multiple of --batch_size \(2\)"),
    (["--top_k", -1], r"--top_k"),
    (["--top_p", 0], r"--top_p must be in \(0, 1\]"),
    (["--top_p", 1.5], r"--top_p must be in \(0, 1\]"),
    (["--temperature", -1], r"--temperature"),
    (["--model_name", "355M"], r"model '355M' not found .*download_model.py 355M"),
    (["--models_dir", 2019], r"model 'tiny' not found in '2019'"),
    (["--length", "abc"], r"--length must be a whole number, got 'abc'"),
    (["--stop"], r"--stop needs a value"),
    (["--repetition_penalty", 0], r"^error: --repetition_penalty must be a number > 0 \(1 turns it off\), got 0$"),
    (["--presence_penalty", 3], r"--presence_penalty must be a number from -2 to 2"),
    (["--frequency_penalty", "high"], r"--frequency_penalty must be a number from -2 to 2"),
    (["--min_length", -1], r"--min_length must be a whole number >= 0"),
    (["--logit_bias", "{50256: -100}"], r"--logit_bias must be a JSON object like"),
    (["--logit_bias", '{"50256": "ban"}'], r"--logit_bias must be a number from -100 \(bans\) to 100, got 'ban'"),
    (["--logit_bias", '{"50257": 1}'], r"--logit_bias must hold token ids from 0 to 50256, got 50257"),
    (["--logit_bias", '{"two words": 1}'], r"--logit_bias must map strings of one token; 'two words' is 2 tokens"),
    (["--bad_words", '["fine", ""]'], r"--bad_words must be strings or token-id lists of one token or more, got ''"),
    (["--logprobs", 2], r"--logprobs needs --json"),
    (["--json", "--logprobs", -1], r"--logprobs must be a whole number >= 0"),
])
def test_bad_input_gets_a_one_line_error(tiny_models_dir, args, pattern):
    base = ["--model_name", "tiny", "--models_dir", tiny_models_dir, "--nsamples", 1, "--length", 3]
    result = run_main(SCRIPT, *base, *args)
    assert_one_line_error(result, pattern)
    assert result.stdout == ""  # not even a SAMPLE header before the error


def test_corrupt_checkpoint_gets_a_one_line_error(tiny_models_dir, tmp_path):
    import shutil

    shutil.copytree(f"{tiny_models_dir}/tiny", tmp_path / "tiny")
    data = tmp_path / "tiny" / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    result = run_script(SCRIPT, "--model_name", "tiny", "--models_dir", tmp_path, "--nsamples", 1, "--length", 3)
    assert_one_line_error(result, r"corrupt or truncated.*download the model again")


def test_nsamples_zero_runs_until_ctrl_c(tiny_models_dir):
    process = subprocess.Popen(
        [sys.executable, f"{SRC_DIR}/{SCRIPT}", "--model_name", "tiny", "--models_dir", tiny_models_dir,
         "--nsamples", "0", "--length", "4", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
        preexec_fn=sigint_as_at_a_terminal)
    seen = ""
    deadline = time.time() + 240
    while headers(seen)[-1:] < [3] and time.time() < deadline:
        seen += process.stdout.readline()
    assert headers(seen)[:3] == [1, 2, 3]
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_piped_into_head_it_ends_quietly(tiny_models_dir):
    process = subprocess.Popen(
        [sys.executable, f"{SRC_DIR}/{SCRIPT}", "--model_name", "tiny", "--models_dir", tiny_models_dir,
         "--nsamples", "0", "--length", "4", "--seed", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT)
    assert headers(process.stdout.readline().decode()) == [1]
    process.stdout.close()  # what `| head -n 1` does after its line
    assert process.wait(timeout=240) == 141
    assert process.stderr.read() == b""


@pytest.mark.parametrize("stop", ["5", "1.5", "True"])
def test_a_stop_that_looks_like_a_number_or_a_bool_is_text(tiny_models_dir, stop):
    result = run_main(SCRIPT, "--model_name", "tiny", "--models_dir", tiny_models_dir, "--nsamples", 1,
                      "--length", 4, "--stop", stop)
    assert result.returncode == 0, result.stderr
    assert headers(result.stdout) == [1]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="finds TensorFlow's library in /proc")
def test_ctrl_c_during_start_up_prints_only_a_newline(tiny_models_dir):
    process = subprocess.Popen(
        [sys.executable, f"{SRC_DIR}/{SCRIPT}", "--model_name", "tiny", "--models_dir", tiny_models_dir,
         "--nsamples", "1", "--length", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT, preexec_fn=sigint_as_at_a_terminal)
    # Interrupt once TensorFlow's library is loaded: the import is under way, its log captured.
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        with open(f"/proc/{process.pid}/maps") as maps:
            if "libtensorflow" in maps.read():
                break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert (out, err) == (b"", b"\n")


def test_the_controls_give_the_apis_samples(tiny_models_dir, tiny_gpt):
    result = run_main(SCRIPT, "--model_name", "tiny", "--models_dir", tiny_models_dir, "--nsamples", 2,
                      "--batch_size", 2, "--length", 12, "--seed", 4, "--top_k", 20, *CONTROL_FLAGS)
    assert result.returncode == 0, result.stderr
    texts = [p.rstrip("\n") for p in re.split(r"={40} SAMPLE \d+ ={40}\n", result.stdout)[1:]]
    gpt = tiny_gpt
    want = gpt.generate([[gpt.eot_token]] * 2, 12, top_k=20, seed=sample.batch_seed(sample.new_seed(4), 0),
                        **CONTROLS)
    assert texts == want
    assert want != gpt.generate([[gpt.eot_token]] * 2, 12, top_k=20, seed=sample.batch_seed(4, 0))


def test_json_prints_one_object_per_sample_with_tokens_when_asked(tiny_models_dir):
    import json

    base = ["--model_name", "tiny", "--models_dir", tiny_models_dir, "--nsamples", 4, "--batch_size", 2,
            "--length", 6, "--seed", 3, "--json"]
    plain, scored = run_main(SCRIPT, *base), run_main(SCRIPT, *base, "--logprobs", 0)
    assert plain.returncode == scored.returncode == 0, plain.stderr + scored.stderr
    plain, scored = ([json.loads(line) for line in r.stdout.splitlines()] for r in (plain, scored))
    assert [set(r) for r in plain] == [{"prompt", "text"}] * 4
    assert [r["text"] for r in scored] == [r["text"] for r in plain]
    assert all(len(r["tokens"]) == 6 and r["prompt"] == "<|endoftext|>" for r in scored)
    assert all(t["top_logprobs"] == [] and t["logprob"] < 0 for r in scored for t in r["tokens"])
