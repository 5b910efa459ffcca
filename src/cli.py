"""What every command-line entry point shares: its --help, the reading of its command line before
any work, and one-line errors instead of tracebacks."""
import difflib
import inspect
import json as json_lib
import os
import re
import sys
import typing

from errors import UserError


# Flags the sampling scripts share, documented once; `documented` builds each script's --help.
SHARED_ARGS = {
    "model_name": "Model directory under models_dir: 124M, 355M, 774M, 1558M (117M, 345M: legacy names), or one "
                  "in Hugging Face's format (config.json, model.safetensors, vocab.json, merges.txt).",
    "seed": "Integer seed; the same seed (and prompts) give the same samples run after run.",
    "batch_size": "Samples generated at once; nsamples must be a multiple of it.",
    "temperature": "Randomness: logits are divided by it; 0 is greedy (always the likeliest token).",
    "top_k": "Sample only from the k likeliest tokens; 0 turns it off (40 is a good value).",
    "top_p": "Sample only from the smallest set of likeliest tokens whose probability stays within top_p "
             "(the reference's nucleus rule); 1 turns it off.",
    "models_dir": "Directory holding the model directories (~ and $VARS are expanded).",
    "stop_at_eot": "End a sample at <|endoftext|>.",
    "stop": "A string, or a list like '[\"\\n\\n\", \"THE END\"]', that ends a sample when generated.",
    "dtype": "float32 (default, exact), bfloat16 (weights and matrix products in bf16: for GPUs and "
             "CPUs with AVX-512 BF16) or int8 (weights quantized, LiteRT engine only).",
    "engine": "auto (default: LiteRT on a CPU when installed and the model fits, TensorFlow on a GPU and for "
              "bfloat16), tf or litert (converted once into the model's litert/ folder).",
    "repetition_penalty": "Tokens already in the prompt or the output: a positive logit is divided by it, a "
                          "negative one multiplied (CTRL's penalty, as Hugging Face's); 1 turns it off.",
    "presence_penalty": "Subtracted from the logit of every token generated so far (the OpenAI API's, -2 to 2); "
                        "0 turns it off.",
    "frequency_penalty": "Subtracted from a token's logit once per time it was generated (the OpenAI API's, -2 to "
                         "2); 0 turns it off.",
    "logit_bias": "JSON mapping token ids or one-token strings to a bias added to their logits (-100 to 100; -100 "
                  "bans), like '{\"50256\": -100, \" the\": 2}'.",
    "bad_words": "A string, or a list like '[\"foo\", \"bar baz\"]', never generated (as it encodes, and after a "
                 "space).",
    "min_length": "No <|endoftext|> before this many new tokens.",
    "truncate": "A prompt longer than the window: error (the default) stops with an error; left keeps its last "
                "tokens, with a note on stderr.",
    "json": "Print one JSON object per sample, {\"prompt\": ..., \"text\": ...}, a line each, instead of the "
            "SAMPLE blocks.",
    "logprobs": "With --json, add \"tokens\": each token's id, text, natural-log probability under the model "
                "(before the controls and filters) and the N likeliest alternatives (0: none).",
}


def check_logprobs(json, logprobs):
    """UserError unless --logprobs, if given, comes with --json."""
    if logprobs is not None and not json:
        raise UserError("--logprobs needs --json: the log-probabilities are printed as JSON lines")

def sampling_controls(temperature, top_k, top_p, repetition_penalty, presence_penalty, frequency_penalty,
                      logit_bias, bad_words, min_length, json=False, logprobs=None):
    """Checks a sampling script's knobs, generation controls and log-prob flags, before the model
    loads; returns the controls as the API takes them: --logit_bias's JSON read, its keys that
    are whole numbers as token ids and the others as text."""
    import processors
    import sample

    sample.Knobs.check(temperature, top_k, top_p)
    if logit_bias is not None:
        try:
            bias = json_lib.loads(logit_bias)
        except json_lib.JSONDecodeError:
            bias = None
        if not isinstance(bias, dict):
            raise UserError(f"--logit_bias must be a JSON object like '{{\"50256\": -100}}', got {logit_bias!r}")
        logit_bias = {int(k) if re.fullmatch("[0-9]+", k) else k: v for k, v in bias.items()}
    controls = dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, logit_bias=logit_bias, bad_words=bad_words,
                    min_length=min_length)
    processors.Controls.check(**controls)
    check_logprobs(json, logprobs)
    sample.Knobs.check(logprobs=logprobs)
    return controls


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


# Annotation for a flag that is a string, or a list of strings when written as one: '["\n\n", "THE END"]'.
str_or_list = typing.Union[str, typing.List[str]]


def _kind(param):
    """What a parameter's text becomes: its annotation, else the type of a bool or str default."""
    if param.annotation is not param.empty:
        return param.annotation
    return type(param.default) if isinstance(param.default, (bool, str)) else None


def _source(name, kind, text):
    """The text of flag --`name` (or of the argument in its place) as fire should read it: as the
    Python literal of its value for strings and switches, which fire would turn into numbers and
    booleans; else as typed, for fire's own reading (Python literals, else the text)."""
    from fire.parser import DefaultParseValue

    if kind is str:
        return repr(text)
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise UserError(f"--{name} is a switch: give --{name} or --no{name}, not {text!r}")
        return repr(text.lower() == "true")
    value = DefaultParseValue(text)
    if kind is str_or_list:
        return repr(value if isinstance(value, list) and all(isinstance(v, str) for v in value) else text)
    if kind is int and value is not None and type(value) is not int:
        raise UserError(f"--{name} must be a whole number, got {text!r}")
    return text


def _is_flag(arg):
    """Whether fire reads `arg` as a flag: --name, or -x... (a dash and a letter; -1 is a value)."""
    return arg.startswith("--") or re.match("-[a-zA-Z]", arg) is not None


def command_line(fn, args):
    """`args` as fire should read them for `fn`: each flag written --name=value, and the text of
    string flags and arguments quoted so that fire keeps it as typed. Raises UserError, before any
    work is done, for a flag `fn` does not take or an argument too many (fire reported those only
    after `fn` had run), a flag without its value, and a value of the wrong kind.

    A parameter's kind is its annotation, else the type of a bool or str default. Flags are spelt
    as fire takes them: --name value, --name=value, --no<name> for a switch, hyphens for
    underscores, -x for the one flag starting with x. A switch takes a following True or False, and
    no other word. What follows the last `--` is fire's own (--trace...); with -h or --help
    anywhere, fire shows the help instead.
    """
    params = inspect.signature(fn).parameters
    if "-h" in args or "--help" in args or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return args
    cut = len(args) - 1 - args[::-1].index("--") if "--" in args else len(args)
    names = [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]
    switches = [n for n in names if _kind(params[n]) is bool]
    out, given, positional, rest = [], set(), [], args[:cut]
    while rest:
        arg, rest = rest[0], rest[1:]
        if not _is_flag(arg):
            positional.append(len(out))
            out.append(arg)
            continue
        flag, equals, value = arg.partition("=")
        name = flag.lstrip("-").replace("-", "_")
        starting = [n for n in names if n.startswith(name)]
        if len(name) == 1 and len(starting) == 1:
            name = starting[0]
        if name not in names and name.startswith("no") and name[2:] in switches:
            if equals:
                raise UserError(f"{flag} takes no value: give {flag} alone")
            name, equals, value = name[2:], "=", "False"
        if name not in names:
            close = difflib.get_close_matches(name, names + ["no" + n for n in switches], n=1)
            raise UserError(f"unknown flag {flag} ({f'did you mean --{close[0]}?' if close else '--help lists the flags'})")
        if not equals and name in switches:
            takes_word = bool(rest) and rest[0].lower() in ("true", "false")
            value, rest = (rest[0], rest[1:]) if takes_word else ("True", rest)
        elif not equals:
            if not rest or _is_flag(rest[0]):
                raise UserError(f"{flag} needs a value (write {flag}=VALUE for one that starts with -)")
            value, rest = rest[0], rest[1:]
        given.add(name)
        out.append(f"--{name}={_source(name, _kind(params[name]), value)}")
    # As fire binds them: arguments fill the parameters no flag gave, in order, then *args.
    slots = [p for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in given]
    star = [p for p in params.values() if p.kind is p.VAR_POSITIONAL]
    for i, index in enumerate(positional):
        if out[index] == "-":
            break  # fire's separator: what follows is not for `fn`
        param = slots[i] if i < len(slots) else star[0] if star else None
        if param is None:
            raise UserError(f"unexpected argument {out[index]!r} (flags start with --; --help lists them)")
        out[index] = _source(param.name, _kind(param), out[index])
    return out + args[cut:]


def _reader_gone(stream):
    """Points a stream whose pipe was closed (`| head`) at /dev/null, so that the interpreter's
    final flush does not raise and report it again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def as_flags(message, fn):
    """A library error in the command line's terms: a parameter of `fn` that "must" be something,
    or that the message says to "use", is named as its flag (`top_k must` -> `--top_k must`)."""
    names = "|".join(re.escape(p) for p in sorted(inspect.signature(fn).parameters, key=len, reverse=True))
    if not names:
        return message
    return re.sub(rf"(?<![\w-])({names})(?= (?:must|\(\d+\) must)\b)|(?<=\buse )({names})(?= )",
                  lambda m: "--" + (m.group(1) or m.group(2)), message)


def run(fn, quick_exit=False):
    """Runs `fn` as a fire CLI; a UserError becomes a one-line error and exit status 2.

    Ctrl-C ends it with status 130 and a newline. A reader that stops reading (`| head`) ends
    it quietly with status 141 (128 + SIGPIPE), as `yes | head` ends: the output was cut short.

    With `quick_exit` the process ends as soon as `fn` does, its output flushed, skipping the
    interpreter's teardown, in which TensorFlow takes longer than generating a few tokens.
    Only for entry points that leave no file open when `fn` returns.
    """
    import fire

    status = 0
    try:
        fire.Fire(fn, command=command_line(fn, sys.argv[1:]))
    except UserError as e:
        print(f"error: {as_flags(str(e), fn)}", file=sys.stderr, flush=True)
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
