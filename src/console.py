"""Printing samples in the reference's format, streaming the first row of each batch."""
import json
import sys


def sample_header(number):
    return "=" * 40 + " SAMPLE " + str(number) + " " + "=" * 40


def use_safe_stdout():
    """Characters a console cannot show print as '?' instead of crashing (Windows consoles)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def print_batch(pieces, numbers, after_row=None):
    """Prints one batch: each row under its SAMPLE header, in row order.

    Row 0 is printed as its pieces arrive; the other rows are generated at the same time and
    printed when the batch ends.

    Args:
        pieces: Iterable of (row, text) as `api.Model.stream` yields them.
        numbers: The sample number of each row.
        after_row: Optional function of the row index, returning a line to print after it.
    """
    texts = [""] * len(numbers)
    print(sample_header(numbers[0]), flush=True)
    for row, piece in pieces:
        if row == 0:
            print(piece, end="", flush=True)
        else:
            texts[row] += piece
    for row in range(len(numbers)):
        if row:
            print(sample_header(numbers[row]))
            print(texts[row], end="")
        print(flush=True)
        if after_row and after_row(row):
            print(after_row(row), flush=True)


def print_json(prompts, results):
    """Prints one JSON object a line per sample: `results` are `api.Model.generate`'s, texts or
    (with logprobs) dicts; `prompts` the prompt text of each."""
    for prompt, result in zip(prompts, results):
        record = result if isinstance(result, dict) else dict(prompt=prompt, text=result)
        print(json.dumps(record, ensure_ascii=False), flush=True)


def note_truncated(kept, length, prompt_number=None):
    """Says on stderr that only the last `kept` of a prompt's `length` tokens went in."""
    which = f"prompt {prompt_number}" if prompt_number is not None else "the prompt"
    print(f"note: {which} is {length} tokens, longer than the window: only its last {kept} go in (--truncate left)",
          file=sys.stderr, flush=True)
