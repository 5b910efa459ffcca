"""Shared test setup: the scripts live in src/ and import each other as top-level modules."""
import os
import sys
import warnings

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_DIR = os.path.join(REPO_ROOT, "src")
if SRC_DIR not in sys.path:
    sys.path.insert(0, SRC_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

# A model small enough to build in a second, with the real vocabulary so the encoder works.
TINY_HPARAMS = dict(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory):
    """A models directory holding `tiny`, a random model written in the released format."""
    import checkpoint
    from hparams import HParams

    models = tmp_path_factory.mktemp("models")
    checkpoint.write_random_model(str(models / "tiny"), HParams(**TINY_HPARAMS), seed=1, std=0.2)
    return str(models)


@pytest.fixture(scope="session")
def tiny_lm(tiny_models_dir):
    import model

    return model.load_model("tiny", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_gpt(tiny_models_dir):
    """`tiny` loaded through the API (TensorFlow engine) once, for the tests that only read it: each
    new load traces its sampling loop again (~2 s)."""
    import api

    return api.load("tiny", tiny_models_dir)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A Hugging Face directory of the tiny shape written by transformers itself: a random
    GPT2LMHeadModel (every tensor perturbed, so norms and biases matter too) saved with
    save_pretrained, with the bundled vocabulary as vocab.json and merges.txt."""
    import shutil

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import encoder

    h = TINY_HPARAMS
    config = transformers.GPT2Config(vocab_size=h["n_vocab"], n_positions=h["n_ctx"], n_embd=h["n_embd"],
                                     n_head=h["n_head"], n_layer=h["n_layer"])
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    path = tmp_path_factory.mktemp("hf") / "tiny-hf"
    hf.save_pretrained(str(path))
    for source, name in zip(encoder.vocab_files(encoder.default_vocab_dir()), encoder.HF_VOCAB_FILES):
        shutil.copyfile(source, path / name)
    return str(path)


def sigint_as_at_a_terminal():
    """A Popen preexec_fn giving the child Ctrl-C's default action, as at a terminal. A shell
    without job control starts background jobs (a CI runner's, say) with SIGINT ignored, which a
    child inherits and rightly keeps; tests that send SIGINT must not depend on how pytest started."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def script_path(script):
    """Where a script named as run_script takes it lives: src/, else the repo root."""
    path = os.path.join(SRC_DIR, script)
    return path if os.path.exists(path) else os.path.join(REPO_ROOT, script)


def run_script(script, *args, stdin=None, timeout=300, env=None):
    """Runs a script from src/ (or the repo root) as a user would; stdout and stderr come back as text."""
    import subprocess

    path = script_path(script)
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONIOENCODING="utf-8")
    full_env.update(env or {})
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    result = subprocess.run([sys.executable, path, *map(str, args)], input=stdin, capture_output=True,
                            timeout=timeout, env=full_env, cwd=REPO_ROOT)
    result.stdout = result.stdout.decode("utf-8", errors="replace")
    result.stderr = result.stderr.decode("utf-8", errors="replace")
    return result


class _Finished:
    """What `run_main` returns: the fields of a finished `subprocess.run` that the tests read."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


# A fresh interpreter's warning filters (no -W options): deprecations show only from __main__.
_FRESH_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                          ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                          ("ignore", ResourceWarning, "")]


def _warning_to_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(script, *args, stdin=b"", env=None, cwd=REPO_ROOT):
    """Runs a script from src/ (or the repo root) as `python script args` does, but in this process:
    its `__main__` code with `sys.argv` set, through `cli.run` (ending by SystemExit, not
    `os._exit`), for tests of what a command line does once Python is up, which a fresh
    interpreter takes ~3 s (TensorFlow's import) to reach. Returns what `run_script` returns.

    Both streams are caught at file descriptors 1 and 2, so TensorFlow's C++ log lines land in
    stderr as they would; so do warnings, log records of WARNING and above, and a traceback
    (status 1) for an exception that would end the process. The environment, the working
    directory and the TensorFlow options a script's `runtime.fast_start` sets are put back after.
    """
    import io
    import logging
    import runpy
    import tempfile
    import traceback

    import cli
    import runtime

    path = script_path(script)
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    optimizer_options = runtime.tf.config.optimizer.get_experimental_options()
    saved = sys.argv, sys.stdin, sys.stdout, sys.stderr, dict(os.environ), os.getcwd(), cli.run
    run = cli.run
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds = os.dup(1), os.dup(2)
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    # As PYTHONIOENCODING=utf-8 sets them for run_script's child.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    log_handler = logging.StreamHandler(sys.stderr)
    log_handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(log_handler)
    returncode = 0
    try:
        os.environ.update(dict(TF_CPP_MIN_LOG_LEVEL="2", PYTHONIOENCODING="utf-8", **(env or {})))
        os.chdir(cwd)
        sys.argv = [path, *map(str, args)]
        cli.run = lambda fn, quick_exit=False: run(fn)
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(_FRESH_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _warning_to_stderr
            try:
                runpy.run_path(path, run_name="__main__")
            except SystemExit as e:
                returncode = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)  # as the interpreter prints sys.exit("message")
            except Exception:  # what the interpreter prints for an uncaught one
                traceback.print_exc()
                returncode = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        logging.getLogger().removeHandler(log_handler)
        sys.argv, sys.stdin, sys.stdout, sys.stderr, environ, original_cwd, cli.run = saved
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(original_cwd)
        os.dup2(saved_fds[0], 1)
        os.dup2(saved_fds[1], 2)
        for fd in saved_fds:
            os.close(fd)
        runtime.tf.config.optimizer.set_experimental_options(
            dict({"disable_meta_optimizer": False}, **optimizer_options))
    texts = []
    for file in (out, err):
        file.seek(0)
        texts.append(file.read().decode("utf-8", errors="replace"))
        file.close()
    return _Finished(returncode, *texts)
