"""TensorFlow's start-up settings, applied before it loads: `from runtime import tf` imports it.

Importing this module sets the environment TensorFlow reads as it loads, and no more; TensorFlow
itself loads on the first `runtime.tf` (or `import_tensorflow()`, or `fast_start()`).
"""
import gc
import os
import sys

# TensorFlow's C++ start-up chatter buries the one line a user needs; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow enables its oneDNN kernels only on CPUs it deems new enough; on the others (AVX2
# machines included) they still make batch-1 decoding ~25% and batch-8 decoding ~30% faster.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


# TensorFlow imports Keras's optimizers as it starts, to register them for SavedModel loading,
# which this project never uses; Keras and what it pulls in (IPython, where installed) cost
# ~0.5 s and ~40 MiB of a sampling script. TensorFlow tolerates that import failing.
_KERAS_ON_START = "keras.src.optimizers"


def _import_tensorflow_without_keras():
    blocked = _KERAS_ON_START not in sys.modules
    if blocked:
        sys.modules[_KERAS_ON_START] = None  # makes that one import raise ImportError
    # The import leaves ~400,000 objects, which Python's cycle collector would walk again on each
    # full collection, during the import and while tracing graphs later (0.2 s a walk here). So
    # collection is off for the import, and what it made is frozen (never walked, never freed):
    # 1.6 -> 1.3 s for the import, 0.28 -> 0.13 s to trace the sampler's loop, ~1.5 MiB kept.
    collecting = gc.isenabled()
    gc.disable()
    try:
        import tensorflow
    finally:
        if collecting:
            gc.enable()
        if blocked and sys.modules.get(_KERAS_ON_START, 0) is None:
            del sys.modules[_KERAS_ON_START]  # Keras imports as usual from here on
    gc.freeze()
    return tensorflow


def import_tensorflow():
    """Imports TensorFlow (without Keras) and finds its devices without letting its start-up
    log lines (CUDA probing on machines with no GPU, written before its log level applies) reach
    the terminal; they are shown if the import fails, or always with GPT2_VERBOSE_TF=1."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if os.environ.get("GPT2_VERBOSE_TF") == "1":
        return _import_tensorflow_without_keras()
    import tempfile

    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            tensorflow = _import_tensorflow_without_keras()
            tensorflow.config.list_physical_devices()
        except Exception:  # not Ctrl-C, which needs no log to explain it
            os.dup2(saved_stderr, 2)
            log.seek(0)
            sys.stderr.write(log.read().decode("utf-8", errors="replace"))
            raise
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
    return tensorflow


def fast_start(system_allocator=False):
    """Prepares TensorFlow for a script: imports it quietly and skips Grappler's graph rewrites,
    which cost about a second before the first token and bought no measurable speed on the
    decode loop. GPT2_GRAPPLER=1 keeps them.

    With `system_allocator` (the sampling scripts), tensors come from malloc instead of the pool
    oneDNN keeps: 31 MiB less peak memory for a 264-token 124M sample (1171 vs 1202 MiB), and
    the same speed within this machine's noise. Training and scoring, whose tensors are large,
    keep the pool. Set TF_ONEDNN_USE_SYSTEM_ALLOCATOR yourself to choose either way.
    """
    if system_allocator:
        os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")  # read when TensorFlow loads
    tf = import_tensorflow()
    if os.environ.get("GPT2_GRAPPLER") != "1":
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def __getattr__(name):
    # `from runtime import tf` lands here (PEP 562): TensorFlow loads on first use, never on import.
    if name == "tf":
        return import_tensorflow()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
