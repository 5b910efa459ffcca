"""What every command-line entry point shares: one-line errors instead of tracebacks."""
import os
import sys

# TensorFlow's C++ start-up chatter buries the one line a user needs; keep warnings and errors.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(Exception):
    """Bad input from the user. The message is one line that says what to do."""


def fail(message, status=2):
    """Prints `message` as one line on stderr and exits with `status`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


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
