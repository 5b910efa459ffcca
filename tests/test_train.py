"""train.py end to end on the tiny model: memorising, resuming, Ctrl-C and SIGTERM, a closed stdout, a full
disk, devices, bad input. Runs go through conftest.run_main (this process) unless the process itself is
what is tested: signals, a closed stdout, devices set before TensorFlow starts, TF_CONFIG."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train as train_script
from cli import UserError
from conftest import REPO_ROOT, SRC_DIR, run_main, run_script, sigint_as_at_a_terminal

CORPUS = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun by the door."
STEP_LINE = re.compile(r"^\[(\d+) \| (\d+\.\d\d)\] loss=(\d+\.\d\d) avg=(\d+\.\d\d)$", re.M)
# For the runs that test resuming, saving and stopping, not the step (test_trainer and test_lora test it compiled, the
# memorising run here too): XLA's compiling costs each run ~3 s.
UNCOMPILED = "--noxla"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS, encoding="utf-8")
    return str(path)


def train(tiny_models_dir, tmp_path, *args, env=None, runner=run_main):
    return runner("train.py", "--model_name", "tiny", "--models_dir", tiny_models_dir,
                  "--checkpoint_dir", str(tmp_path / "checkpoint"), "--sample_dir", str(tmp_path / "samples"),
                  *args, env=env)


def losses(stdout):
    return [(int(m.group(1)), float(m.group(3))) for m in STEP_LINE.finditer(stdout)]


def start_training(tiny_models_dir, tmp_path, corpus, *args):
    """train.py as a child process whose stdout and stderr pipes the test reads (or closes)."""
    command = [sys.executable, os.path.join(SRC_DIR, "train.py"), "--dataset", corpus, "--model_name", "tiny",
               "--models_dir", tiny_models_dir, "--checkpoint_dir", str(tmp_path / "checkpoint"),
               "--sample_dir", str(tmp_path / "samples"), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), preexec_fn=sigint_as_at_a_terminal)


def read_until(stream, prefix, seconds=120):
    deadline = time.time() + seconds
    for line in stream:
        if line.startswith(prefix) or time.time() > deadline:
            return line
    return ""


def assert_loadable_save(tmp_path, least_step):
    """Checks that run1's newest save is at `least_step` or later, listed and loadable; returns its step."""
    run = tmp_path / "checkpoint" / "run1"
    step = int((run / "counter").read_text())
    assert step >= least_step and f'model_checkpoint_path: "model-{step}"' in (run / "checkpoint").read_text()
    import model
    assert model.load_model("run1", str(tmp_path / "checkpoint")).hparams.n_ctx == 64
    return step


@contextlib.contextmanager
def file_size_limit(size):
    """This process's writes past `size` bytes fail with EFBIG while it lasts (Python ignores SIGXFSZ, which would
    otherwise end the process)."""
    import resource

    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    saved = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, saved[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, saved)


def test_memorises_a_small_corpus_and_the_run_directory_samples_it_back(tiny_models_dir, tmp_path, corpus):
    result = train(tiny_models_dir, tmp_path, "--dataset", corpus, "--learning_rate", "0.01", "--max_steps", "120",
                   "--save_every", "50", "--sample_every", "60", "--sample_length", "8", "--seed", "1")
    assert result.returncode == 0, result.stderr
    steps = losses(result.stdout)
    assert [s for s, _ in steps] == list(range(1, 121))
    assert steps[0][1] > 5 and steps[-1][1] < 0.2, steps[-1]
    # The text is shorter than the model's 64-token window: training used the whole text.
    assert re.search(r"training on windows of (\d+) tokens", result.stdout).group(1) == "21"
    run = tmp_path / "checkpoint" / "run1"
    assert {"hparams.json", "encoder.json", "vocab.bpe", "checkpoint", "counter", "model-120.index"} <= set(
        os.listdir(run))
    assert (run / "counter").read_text().strip() == "120"
    assert (tmp_path / "samples" / "run1" / "samples-120").read_text().startswith("======== SAMPLE 1 ========")

    prompt = "The quick brown fox"
    sampled = run_main("generate_conditional_samples.py", prompt, "--models_dir", str(tmp_path / "checkpoint"),
                       "--model_name", "run1", "--temperature", "0", "--length", "17")
    assert sampled.returncode == 0, sampled.stderr
    assert CORPUS[len(prompt):] in sampled.stdout


def test_restarting_with_latest_continues_the_count_and_the_optimizer(tiny_models_dir, tmp_path, corpus):
    options = ["--dataset", corpus, "--sample_every", "0", UNCOMPILED]
    first = train(tiny_models_dir, tmp_path, *options, "--max_steps", "3")
    assert first.returncode == 0, first.stderr
    second = train(tiny_models_dir, tmp_path, *options, "--max_steps", "5")
    assert second.returncode == 0, second.stderr
    assert [s for s, _ in losses(second.stdout)] == [4, 5]
    assert "at step 3 with its optimizer state" in second.stdout
    run = tmp_path / "checkpoint" / "run1"
    assert (run / "counter").read_text().strip() == "5"
    # At step 5 already: nothing to do, said before the data set loads (this one would not).
    done = train(tiny_models_dir, tmp_path, "--dataset", "nowhere/*.txt", "--max_steps", "4")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"{run} is already at step 5 and --max_steps is 4: nothing to do "
                                   "(raise --max_steps to train further)")
    assert (run / "counter").read_text().strip() == "5"
    fresh = train(tiny_models_dir, tmp_path, *options, "--max_steps", "1", "--restore_from", "fresh")
    assert [s for s, _ in losses(fresh.stdout)] == [1]


def test_an_adafactor_run_resumes_with_its_factored_state(tiny_models_dir, tmp_path, corpus):
    options = ["--dataset", corpus, "--sample_every", "0", "--optimizer", "adafactor", "--adafactor_beta1", "0.9",
               UNCOMPILED]
    first = train(tiny_models_dir, tmp_path, *options, "--max_steps", "2")
    assert first.returncode == 0, first.stderr
    run = tmp_path / "checkpoint" / "run1"
    import tensorflow as tf

    saved = tf.train.load_checkpoint(str(run / "optimizer-2")).get_variable_to_shape_map()
    assert saved["model/h0/mlp/c_fc/w/Adafactor_vr"] == [32] and "model/h0/mlp/c_fc/w/Adam" not in saved
    # Without --learning_rate the step is the paper's relative one, 1e-2 of the weights' RMS (0.29 of it after two
    # steps through the first moment), not a fixed 2e-5.
    name = "model/h0/mlp/c_fc/w"
    before = tf.train.load_checkpoint(os.path.join(tiny_models_dir, "tiny", "model.ckpt")).get_tensor(name)
    after = tf.train.load_checkpoint(str(run / "model-2")).get_tensor(name)
    assert 1e-3 < np.sqrt(np.mean((after - before) ** 2)) / np.sqrt(np.mean(before ** 2)) < 3e-2
    second = train(tiny_models_dir, tmp_path, *options, "--max_steps", "3")
    assert second.returncode == 0, second.stderr
    assert "at step 2 with its optimizer state" in second.stdout
    assert [s for s, _ in losses(second.stdout)] == [3]
    assert int(tf.train.load_checkpoint(str(run / "optimizer-3")).get_tensor("global_step")) == 3


def test_a_lora_run_resumes_its_adapters_and_its_saves_load_in_the_sampling_scripts(tiny_models_dir, tmp_path,
                                                                                      corpus):
    options = ["--dataset", corpus, "--sample_every", "0", "--lora_rank", "2", "--lora_alpha", "4",
               "--learning_rate", "0.01", UNCOMPILED]
    first = train(tiny_models_dir, tmp_path, *options, "--max_steps", "2")
    assert first.returncode == 0, first.stderr
    run = tmp_path / "checkpoint" / "run1"
    assert {"lora-2.index", "model-2.index", "optimizer-2.index"} <= set(os.listdir(run))
    second = train(tiny_models_dir, tmp_path, *options, "--max_steps", "4", "--save_every", "1")
    assert second.returncode == 0, second.stderr
    assert "at step 2 with its optimizer state" in second.stdout
    assert [s for s, _ in losses(second.stdout)] == [3, 4]
    assert {n for n in os.listdir(run) if n.startswith("lora-")} == {"lora-4.index", "lora-4.data-00000-of-00001"}
    sampled = run_main("generate_unconditional_samples.py", "--models_dir", str(tmp_path / "checkpoint"),
                       "--model_name", "run1", "--length", "4", "--nsamples", "1", "--seed", "1")
    assert sampled.returncode == 0, sampled.stderr
    assert "SAMPLE 1" in sampled.stdout
    other = train(tiny_models_dir, tmp_path, "--dataset", corpus, "--lora_rank", "3", "--max_steps", "5")
    assert other.returncode == 2 and "was trained with LoRA rank 2, alpha 4" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1


def test_ctrl_c_stops_after_the_step_and_saves_a_loadable_checkpoint(tiny_models_dir, tmp_path, corpus):
    process = start_training(tiny_models_dir, tmp_path, corpus, "--sample_every", "0", "--save_every", "1000000",
                             UNCOMPILED)
    assert read_until(process.stdout, "[5 |").startswith("[5 |")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    assert_loadable_save(tmp_path, 5)


def test_sigterm_stops_after_the_step_and_saves_as_ctrl_c_does(tiny_models_dir, tmp_path, corpus):
    process = start_training(tiny_models_dir, tmp_path, corpus, "--sample_every", "0", "--save_every", "1000000",
                             UNCOMPILED)
    assert read_until(process.stdout, "[3 |").startswith("[3 |")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr  # stopped as asked and saved: not a failure
    assert "Traceback" not in stderr and "terminated" in stderr
    step = assert_loadable_save(tmp_path, 3)
    assert f"Saving {tmp_path / 'checkpoint' / 'run1' / f'model-{step}'}" in stdout


@pytest.mark.parametrize("stop", ["max_steps", "ctrl_c"])
def test_a_closed_stdout_never_costs_the_run(tiny_models_dir, tmp_path, corpus, stop):
    # As `train.py | head -n 2`, or `train.py | tee log` ended by the Ctrl-C that also stops training.
    options = ["--sample_every", "2", "--sample_length", "4", "--save_every", "1000000", UNCOMPILED]
    process = start_training(tiny_models_dir, tmp_path, corpus, *options,
                             *(["--max_steps", "6"] if stop == "max_steps" else []))
    if stop == "max_steps":
        assert process.stdout.readline().startswith("Loading dataset")
        process.stdout.readline()
    else:
        assert read_until(process.stdout, "[3 |").startswith("[3 |")
    process.stdout.close()
    if stop == "ctrl_c":
        process.send_signal(signal.SIGINT)
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr and "standard output is closed" in stderr
    step = assert_loadable_save(tmp_path, 6 if stop == "max_steps" else 3)
    if stop == "max_steps":
        assert step == 6 and (tmp_path / "samples" / "run1" / "samples-6").exists()


def test_a_full_disk_during_a_save_is_a_one_line_error_and_the_previous_save_stays(tiny_models_dir, tmp_path,
                                                                                     corpus):
    first = train(tiny_models_dir, tmp_path, "--dataset", corpus, "--max_steps", "1", "--sample_every", "0", UNCOMPILED)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "checkpoint" / "run1"
    files = sorted(os.listdir(run))

    # Writes past 1 MB fail (EFBIG) as on a full disk; the tiny model's weights are 6 MB.
    with file_size_limit(2 ** 20):
        result = train(tiny_models_dir, tmp_path, "--dataset", corpus, "--max_steps", "3", "--sample_every", "0",
                       UNCOMPILED)
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(r"error: cannot save .*model-3: File too large; .*resume from model-1.*\n", result.stderr), \
        result.stderr
    assert sorted(os.listdir(run)) == files  # no temporary or unlisted files
    assert assert_loadable_save(tmp_path, 1) == 1


# The options of the runs on several devices, whose losses one_device_losses gives for one device.
DEVICE_OPTIONS = ["--batch_size", "2", "--sample_every", "0", "--learning_rate", "0.001", "--seed", "7"]


@pytest.fixture(scope="module")
def one_device_losses(tiny_models_dir, tmp_path_factory, corpus):
    """The four steps' losses of a run on one device, which the runs on two devices must match."""
    one = train(tiny_models_dir, tmp_path_factory.mktemp("one"), "--dataset", corpus, *DEVICE_OPTIONS,
                "--max_steps", "4")
    assert one.returncode == 0, one.stderr
    steps = losses(one.stdout)
    assert [s for s, _ in steps] == [1, 2, 3, 4]
    return steps


def test_two_mirrored_devices_match_one_device(tiny_models_dir, tmp_path, corpus, one_device_losses):
    # A fresh process: the CPU is split into devices before TensorFlow initialises them.
    two = train(tiny_models_dir, tmp_path / "two", "--dataset", corpus, *DEVICE_OPTIONS, "--max_steps", "4",
                "--strategy", "mirrored", env={"GPT2_CPU_DEVICES": "2"}, runner=run_script)
    assert two.returncode == 0, two.stderr
    assert len(losses(two.stdout)) == 4
    for (step, a), (_, b) in zip(one_device_losses, losses(two.stdout)):
        assert a == pytest.approx(b, abs=0.011), step  # the log shows two decimals
    odd = train(tiny_models_dir, tmp_path / "odd", "--dataset", corpus, "--batch_size", "3", "--strategy", "mirrored",
                env={"GPT2_CPU_DEVICES": "2"}, runner=run_script)
    assert odd.returncode == 2 and "multiple of the 2 devices" in odd.stderr


def free_ports(count):
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_through_tf_config_match_one_device(tiny_models_dir, tmp_path, corpus, one_device_losses):
    options = ["--dataset", corpus, *DEVICE_OPTIONS, "--max_steps", "3", "--model_name", "tiny",
               "--models_dir", tiny_models_dir]
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, os.path.join(SRC_DIR, "train.py"), *options, "--strategy", "multi_worker",
             "--checkpoint_dir", str(tmp_path / f"worker{index}")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=config)))
    outputs = [p.communicate(timeout=240) for p in processes]
    for p, (_, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr
    for stdout, _ in outputs:
        assert len(losses(stdout)) == 3
        for (step, a), (_, b) in zip(one_device_losses, losses(stdout)):
            assert a == pytest.approx(b, abs=0.011), step
    # Only the chief (worker 0) writes the run directory.
    assert (tmp_path / "worker0" / "run1" / "model-3.index").exists()
    assert not (tmp_path / "worker1").exists()


def test_validation_loss_is_reported(tiny_models_dir, tmp_path, corpus):
    result = train(tiny_models_dir, tmp_path, "--dataset", corpus, "--val_dataset", corpus, "--val_every", "2",
                   "--val_batch_count", "2", "--max_steps", "2", "--sample_every", "0", UNCOMPILED)
    assert result.returncode == 0, result.stderr
    assert len(re.findall(r"^\[\d+ \| \d+\.\d\d\] validation loss = \d+\.\d\d$", result.stdout, re.M)) == 2


@pytest.mark.parametrize("args,message", [
    (["--dataset", "nowhere/*.txt"], "no dataset files match"),
    (["--optimizer", "adagrad"], "--optimizer must be adam, sgd or adafactor"),
    (["--adafactor_beta1", "0.9"], "--adafactor_beta1 must not be given with optimizer 'adam'"),
    (["--lora_rank", "0"], "--lora_rank must be a whole number >= 1, got 0"),
    (["--lora_rank", "-1"], "--lora_rank must be a whole number >= 1"),
    (["--lora_rank", "2", "--lora_targets", "attn/c_attn,attn/q"], "--lora_targets must be a comma-separated list"),
    (["--lora_alpha", "8"], "--lora_alpha and --lora_targets need --lora_rank"),
    (["--lora_rank", "2", "--base_dtype", "float16"], "--base_dtype must be one of bfloat16, float32, got 'float16'"),
    (["--base_dtype", "bfloat16"], "--base_dtype is for LoRA's frozen weights: give --lora_rank too"),
    (["--sample_length", "64"], "--sample_length (64) must be at most n_ctx - 1 (63)"),
    (["--restore_from", "no/such/run"], "--restore_from must be latest, fresh"),
    (["--batch_size", "0"], "--batch_size must be a whole number >= 1"),
    (["--noise", "1.5"], "--noise must be a probability"),
])
def test_bad_input_is_a_one_line_error(tiny_models_dir, tmp_path, corpus, args, message):
    if "--dataset" not in args:
        args = ["--dataset", corpus, *args]
    result = train(tiny_models_dir, tmp_path, *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_empty_and_too_small_datasets_are_one_line_errors(tiny_models_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("Hi", encoding="utf-8")
    for path in (empty, tiny):
        result = train(tiny_models_dir, tmp_path, "--dataset", str(path))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    missing = train(tiny_models_dir, tmp_path)
    assert missing.returncode == 2 and "--dataset is required" in missing.stderr


@pytest.mark.parametrize("name", ["../../etc", "/tmp/elsewhere", "a/b", "a\\b", "..", ".", ""])
def test_a_run_name_is_one_folder_name(name):
    with pytest.raises(UserError, match="--run_name must be one folder name"):
        train_script.check_run_name(name)


def test_good_run_names_pass_as_strings():
    names = ["run1", "my run.v2", "..x", 7]  # 7: fire reads --run_name 7 as an int
    assert [train_script.check_run_name(n) for n in names] == ["run1", "my run.v2", "..x", "7"]


@pytest.mark.parametrize("name", ["../escaped", ""])
def test_a_run_name_outside_the_checkpoint_directory_is_refused_before_anything_is_written(
        tiny_models_dir, tmp_path, corpus, name):
    result = train(tiny_models_dir, tmp_path / "work", "--dataset", corpus, "--run_name", name, "--max_steps", "1")
    assert result.returncode == 2 and "--run_name must be one folder name" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("flag", ["--checkpoint_dir", "--sample_dir"])
def test_a_directory_flag_naming_a_file_is_a_one_line_error_before_training(tiny_models_dir, tmp_path, corpus, flag):
    taken = tmp_path / "taken"
    taken.write_text("mine", encoding="utf-8")
    for value in (taken, taken / "below"):
        result = train(tiny_models_dir, tmp_path, "--dataset", corpus, "--max_steps", "1", flag, str(value))
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(f"error: {taken} is a file") and flag in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert taken.read_text(encoding="utf-8") == "mine"
