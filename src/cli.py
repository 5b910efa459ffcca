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


def import_tensorflow():
    """Imports TensorFlow and finds its devices without letting its start-up log lines (CUDA
    probing on machines with no GPU, written before its log level applies) reach the terminal;
    they are shown if the import fails, or always with GPT2_VERBOSE_TF=1."""
    if "tensorflow" in sys.modules or os.environ.get("GPT2_VERBOSE_TF") == "1":
        import tensorflow

        return tensorflow
    import tempfile

    sys.stderr.flush()
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            import tensorflow

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


def fast_start():
    """Prepares TensorFlow for a script: imports it quietly and skips Grappler's graph rewrites,
    which cost about a second before the first token and bought no measurable speed on the
    decode loop. GPT2_GRAPPLER=1 keeps them."""
    tf = import_tensorflow()
    if os.environ.get("GPT2_GRAPPLER") != "1":
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
