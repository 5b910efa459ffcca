"""What every command-line entry point shares: its --help, and one-line errors instead of tracebacks."""
import difflib
import inspect
import os
import re
import sys

from errors import UserError  # noqa: F401  (cli.UserError, as the scripts spell it)
# Re-exported for the modules that still call cli.fast_start / cli.import_tensorflow.
from runtime import fast_start, import_tensorflow  # noqa: F401


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


def _is_flag(arg):
    """Whether fire reads `arg` as a flag: --name, or -x... (a dash and a letter; -1 is a value)."""
    return arg.startswith("--") or re.match("-[a-zA-Z]", arg) is not None


def check_flags(fn, args):
    """A UserError for the first flag in `args` that `fn` does not take, before any work is done
    (fire reports flags it could not use only after `fn` has run).

    Flags are spelt as fire takes them: --name value, --name=value, --no<name> for a switch,
    hyphens for underscores, -x for the one flag starting with x; what follows the last `--` is
    fire's own (--help, --trace...). With -h or --help anywhere, fire shows the help instead.
    """
    if "--" in args:
        args = args[:len(args) - 1 - args[::-1].index("--")]
    params = inspect.signature(fn).parameters
    if "-h" in args or "--help" in args or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]
    switches = [n for n in names if isinstance(params[n].default, bool)]
    for arg in filter(_is_flag, args):
        flag = arg.partition("=")[0]
        name = flag.lstrip("-").replace("-", "_")
        starting = [n for n in names if n.startswith(name)]
        if name in names or name[2:] in switches and name.startswith("no") or len(name) == 1 and len(starting) == 1:
            continue
        close = difflib.get_close_matches(name, names + ["no" + n for n in switches], n=1)
        hint = f"did you mean --{close[0]}?" if close else "--help lists the flags"
        raise UserError(f"unknown flag {flag} ({hint})")


def _reader_gone(stream):
    """Points a stream whose pipe was closed (`| head`) at /dev/null, so that the interpreter's
    final flush does not raise and report it again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def run(fn, quick_exit=False):
    """Runs `fn` as a fire CLI; a UserError becomes a one-line error and exit status 2.

    Ctrl-C ends it with status 130 and a newline. A reader that stops reading (`| head`) ends
    it quietly with status 141 (128 + SIGPIPE), as `yes | head` ends: the output was cut short.

    With `quick_exit` the process ends as soon as `fn` does, its output flushed, skipping the
    interpreter's teardown, in which TensorFlow took ~0.7 s: longer than generating 8 tokens.
    Only for entry points that leave no file open when `fn` returns.
    """
    import fire

    status = 0
    try:
        check_flags(fn, sys.argv[1:])
        fire.Fire(fn)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        status = 2
    except KeyboardInterrupt:
        # Ctrl-C is how users stop a run; it is not an error worth a traceback.
        print(file=sys.stderr)
        status = 130
    except BrokenPipeError:
        status = 141
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 141
            if not stream.closed:
                _reader_gone(stream)
    if quick_exit:
        os._exit(status)
    sys.exit(status)
