"""What every command-line entry point shares: one-line errors instead of tracebacks."""
import gc
import inspect
import os
import sys

# TensorFlow's C++ start-up chatter buries the one line a user needs; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow enables its oneDNN kernels only on CPUs it deems new enough; on the others (AVX2
# machines included) they still make batch-1 decoding ~25% and batch-8 decoding ~30% faster.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


# Flags the sampling scripts share, documented once; `documented` builds each script's --help.
SHARED_ARGS = {
    "model_name": "Model directory under models_dir: 124M, 355M, 774M, 1558M (117M, 345M: legacy names).",
    "seed": "Integer seed; the same seed (and prompts) give the same samples run after run.",
    "batch_size": "Samples generated at once; nsamples must be a multiple of it.",
    "temperature": "Randomness: logits are divided by it; 0 is greedy (always the likeliest token).",
    "top_k": "Sample only from the k likeliest tokens; 0 turns it off (40 is a good value).",
    "top_p": "Sample only from the smallest set of likeliest tokens whose probability stays within top_p "
             "(the reference's nucleus rule); 1 turns it off.",
    "models_dir": "Directory holding the model directories (~ and $VARS are expanded).",
    "stop_at_eot": "End a sample at <|endoftext|>.",
    "stop": "A string, or a list like '[\"\\n\\n\", \"THE END\"]', that ends a sample when generated.",
    "dtype": "float32 (default, exact) or bfloat16 (weights and matrix products in bf16: for GPUs and "
             "CPUs with AVX-512 BF16).",
}


def documented(summary, **specific):
    """Gives an entry point a Google-style docstring (which fire shows as --help): `summary`, then
    one Args line per parameter, from `specific` or else from SHARED_ARGS."""
    def attach(fn):
        params = list(inspect.signature(fn).parameters)
        undocumented = [p for p in params if p not in specific and p not in SHARED_ARGS]
        assert not undocumented, f"no help text for {undocumented}"
        lines = [inspect.cleandoc(summary), "", "Args:"]
        lines += [f"    {p}: {specific.get(p) or SHARED_ARGS[p]}" for p in params]
        fn.__doc__ = "\n".join(lines) + "\n"
        return fn
    return attach


from errors import UserError  # noqa: E402  (re-exported: cli.UserError is what the scripts raise)


def check_whole(name, value, least):
    """A UserError unless flag --`name` is an int (not a bool) of at least `least`; returns it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise UserError(f"--{name} must be a whole number >= {least}, got {value!r}")
    return value


def check_counts(nsamples, batch_size, allow_forever=False):
    """UserErrors for sample counts the scripts cannot honour."""
    check_whole("batch_size", batch_size, 1)
    check_whole("nsamples", nsamples, 0 if allow_forever else 1)
    if nsamples % batch_size:
        raise UserError(f"--nsamples ({nsamples}) must be a multiple of --batch_size ({batch_size})")


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
        except BaseException:
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


def run(fn, quick_exit=False):
    """Runs `fn` as a fire CLI; a UserError becomes a one-line error and exit status 2.

    With `quick_exit` the process ends as soon as `fn` does, its output flushed, skipping the
    interpreter's teardown, in which TensorFlow took ~0.7 s: longer than generating 8 tokens.
    Only for entry points that leave no file open when `fn` returns.
    """
    import fire

    status = 0
    try:
        fire.Fire(fn)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        status = 2
    except KeyboardInterrupt:
        # Ctrl-C is how users stop a run; it is not an error worth a traceback.
        print(file=sys.stderr)
        status = 130
    if quick_exit:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                status = status or 1  # the reader went away (a closed pipe): nothing more to tell it
        os._exit(status)
    sys.exit(status)
