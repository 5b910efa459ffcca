"""TensorFlow's start-up settings, applied before it loads: `from runtime import tf` imports it.

Importing this module sets the environment TensorFlow reads as it loads, and no more; TensorFlow
itself loads on the first `runtime.tf` (or `import_tensorflow()`, or `fast_start()`).
"""
import gc
import os
import sys

# TensorFlow's C++ start-up chatter buries the one line a user needs; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow enables its oneDNN kernels only on CPUs it deems new enough; AVX2 ones decode faster with them.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


# TensorFlow imports Keras's optimizers as it starts, for SavedModel loading, which this project
# never uses and which costs start-up time and memory; TensorFlow tolerates that import failing.
_KERAS_ON_START = "keras.src.optimizers"


def _import_tensorflow_without_keras():
    blocked = _KERAS_ON_START not in sys.modules
    if blocked:
        sys.modules[_KERAS_ON_START] = None  # makes that one import raise ImportError
    # The cycle collector would walk the import's ~400,000 objects on every full collection, during
    # the import and while tracing graphs: off for the import, then those objects are frozen.
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
    which delay the first token and do not speed up the decode loop (GPT2_GRAPPLER=1 keeps them).

    With `system_allocator` (the sampling scripts), tensors come from malloc instead of the pool
    oneDNN keeps, which peaks higher at the same speed; training and scoring, whose tensors are
    large, keep the pool. Set TF_ONEDNN_USE_SYSTEM_ALLOCATOR yourself to choose either way.
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


def configure_devices():
    """Lets TensorFlow grow GPU memory as needed instead of taking it all at start-up.

    GPT2_CPU_DEVICES=N splits the CPU into N logical devices, so multi-device training
    (--strategy mirrored) can be tried and tested on a machine without GPUs.
    """
    tf = import_tensorflow()
    try:
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        cpus = int(os.environ.get("GPT2_CPU_DEVICES") or 0)
        if cpus > 1:
            tf.config.set_logical_device_configuration(
                tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * cpus)
    except RuntimeError:
        pass  # devices already initialised: configured before, or cannot change now
