"""What every command-line entry point shares: one-line errors instead of tracebacks."""
import os
import sys

# TensorFlow's C++ start-up chatter buries the one line a user needs; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow enables its oneDNN kernels only on CPUs it deems new enough; on the others (AVX2
# machines included) they still make batch-1 decoding ~25% and batch-8 decoding ~30% faster.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


class UserError(Exception):
    """Bad input from the user. The message is one line that says what to do."""


def check_counts(nsamples, batch_size, allow_forever=False):
    """UserErrors for sample counts the scripts cannot honour."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise UserError(f"--batch_size must be a whole number >= 1, got {batch_size!r}")
    least = 0 if allow_forever else 1
    if not isinstance(nsamples, int) or isinstance(nsamples, bool) or nsamples < least:
        raise UserError(f"--nsamples must be a whole number >= {least}, got {nsamples!r}")
    if nsamples % batch_size:
        raise UserError(f"--nsamples ({nsamples}) must be a multiple of --batch_size ({batch_size})")


def fail(message, status=2):
    """Prints `message` as one line on stderr and exits with `status`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def fast_start():
    """Skips Grappler's graph rewrites in the scripts' processes: on the decode loop they cost
    about a second before the first token and bought no measurable speed. GPT2_GRAPPLER=1 keeps them."""
    if os.environ.get("GPT2_GRAPPLER") != "1":
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})


def run(fn):
    """Runs `fn` as a fire CLI; a UserError becomes a one-line error and exit status 2."""
    import fire

    try:
        fire.Fire(fn)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        # Ctrl-C is how users stop a run; it is not an error worth a traceback.
        print(file=sys.stderr)
        sys.exit(130)
