#!/usr/bin/env python3
"""Scores text under GPT-2: log-likelihood, perplexity and bits per byte, per file or stdin."""
import json as json_lib
import math
import sys

import cli
from errors import UserError


def windows(n_tokens, n_ctx, stride):
    """Sliding windows over a text of `n_tokens` (after a leading <|endoftext|>, at index 0).

    Each window is (start, end, first_scored): the model sees tokens[start:end] and scores
    predictions of tokens first_scored..end-1, so every text token is scored exactly once, with
    at least n_ctx - stride tokens of context after the first window (and always at least one).
    """
    total = n_tokens + 1
    out = []
    scored, start = 1, 0
    while scored < total:
        end = min(start + n_ctx, total)
        out.append((start, end, scored))
        scored = end
        start = min(start + stride, scored - 1)
    return out


def check_stride(stride, n_ctx):
    """A UserError unless stride is None (the default) or a whole number from 1 to n_ctx."""
    if stride is not None and (not isinstance(stride, int) or isinstance(stride, bool) or not 0 < stride <= n_ctx):
        raise UserError(f"stride must be a whole number from 1 to the window size {n_ctx}, got {stride!r}")


def score_tokens(lm, token_lists, eot_token, stride=None, batch_size=8, with_hits=False):
    """Log-probability of every token of each text, each given all the context a window allows.

    Returns:
        One list of natural-log probabilities per text, one per token (the first token is
        predicted from <|endoftext|>, as GPT-2 saw document starts in training). With
        `with_hits`, also one list of booleans per text: whether each token was the most
        likely one (what greedy decoding would have picked).
    """
    import numpy as np
    import tensorflow as tf

    n_ctx = lm.hparams.n_ctx
    check_stride(stride, n_ctx)
    stride = n_ctx // 2 if stride is None else stride
    jobs = []  # (text index, window tokens, first scored index within the window, target tokens)
    for i, tokens in enumerate(token_lists):
        full = [eot_token] + list(tokens)
        for start, end, first in windows(len(tokens), n_ctx, stride):
            jobs.append((i, full[start:end], first - start, full[first:end]))
    results = [[] for _ in token_lists]
    hits = [[] for _ in token_lists]
    for b in range(0, len(jobs), batch_size):
        batch = jobs[b:b + batch_size]
        width = max(len(w) for _, w, _, _ in batch)
        pad = [width - len(w) for _, w, _, _ in batch]
        padded = np.array([[eot_token] * p + w for (_, w, _, _), p in zip(batch, pad)], np.int32)
        logits = lm(padded, pad=pad)["logits"]
        logprobs = tf.nn.log_softmax(logits, axis=-1).numpy()
        for (i, w, first, targets), p, row in zip(batch, pad, logprobs):
            # The prediction of w[j] comes from position j - 1.
            positions = np.arange(first, len(w)) - 1 + p
            results[i].extend(row[positions, targets].tolist())
            if with_hits:
                hits[i].extend((row[positions].argmax(-1) == targets).tolist())
    return (results, hits) if with_hits else results


def summarize(text, tokens, logprobs):
    """Token count, mean NLL (nats/token), perplexity and bits per byte of one scored text."""
    nll = -sum(logprobs)
    n_bytes = len(text.encode("utf-8"))
    return {"tokens": len(tokens), "nll": nll / len(tokens), "perplexity": math.exp(nll / len(tokens)),
            "bits_per_byte": nll / math.log(2) / n_bytes}


def read_inputs(files):
    """(name, text) for each file, or for standard input when there is none; strict UTF-8."""
    sources = [(f, None) for f in files] or [("<stdin>", sys.stdin.buffer)]
    inputs = []
    for name, stream in sources:
        try:
            if stream is None:
                with open(name, "rb") as f:
                    data = f.read()
            else:
                data = stream.read()
        except OSError as e:
            raise UserError(f"cannot read {name}: {e.strerror}") from None
        if b"\0" in data:
            raise UserError(f"{name} looks binary (it holds NUL bytes): score text files")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{name} is not valid UTF-8 (byte {e.start}): convert it to UTF-8") from None
        if not text:
            raise UserError(f"{name} is empty: nothing to score")
        inputs.append((name, text))
    return inputs


@cli.documented(
    "Prints each input's token count, mean negative log-likelihood (nats/token), perplexity and "
    "bits per byte.\n\nTexts longer than the window are scored with a sliding window: every token "
    "once, with at least n_ctx - stride tokens of context after the first window.",
    files="Text files to score (UTF-8); standard input when none is given.",
    stride="Tokens the window moves by (default: half the window, 512); at most the window size.",
    batch_size="Windows run at once.",
    json="Print JSON with each token's id, text and log-probability.")
def score(*files: str, model_name: str = "124M", models_dir: str = "models", stride: int = None,
          batch_size: int = 8, json: bool = False, dtype: str = "float32"):
    import runtime

    runtime.fast_start()
    runtime.configure_devices()
    import encoder as encoder_lib
    import model as model_lib

    inputs = read_inputs([str(f) for f in files])
    lm = model_lib.load_model(model_name, models_dir, dtype=dtype)
    enc = encoder_lib.Encoder.from_dir(lm.path)
    check_stride(stride, lm.hparams.n_ctx)
    cli.check_whole("batch_size", batch_size, 1)
    token_lists = [enc.encode(text) for _, text in inputs]
    scored = score_tokens(lm, token_lists, enc.eot_token, stride=stride, batch_size=batch_size)
    reports = []
    for (name, text), tokens, logprobs in zip(inputs, token_lists, scored):
        report = {"input": name, **summarize(text, tokens, logprobs)}
        if json:
            report["token_logprobs"] = [{"id": t, "text": enc.decode([t]), "logprob": lp}
                                        for t, lp in zip(tokens, logprobs)]
        reports.append(report)
    if json:
        print(json_lib.dumps(reports if len(reports) > 1 else reports[0], indent=2, ensure_ascii=False))
    else:
        for r in reports:
            print(f"{r['input']}\ttokens {r['tokens']}\tnll {r['nll']:.4f}\tperplexity {r['perplexity']:.3f}\t"
                  f"bits/byte {r['bits_per_byte']:.4f}")


if __name__ == "__main__":
    cli.run(score, quick_exit=True)
