"""Shared test setup: the scripts live in src/ and import each other as top-level modules."""
import os
import sys

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


def run_script(script, *args, stdin=None, timeout=300, env=None):
    """Runs a script from src/ (or the repo root) as a user would; stdout and stderr come back as text."""
    import subprocess

    path = os.path.join(SRC_DIR, script)
    if not os.path.exists(path):
        path = os.path.join(REPO_ROOT, script)
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONIOENCODING="utf-8")
    full_env.update(env or {})
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8")
    result = subprocess.run([sys.executable, path, *map(str, args)], input=stdin, capture_output=True,
                            timeout=timeout, env=full_env, cwd=REPO_ROOT)
    result.stdout = result.stdout.decode("utf-8", errors="replace")
    result.stderr = result.stderr.decode("utf-8", errors="replace")
    return result
