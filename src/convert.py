#!/usr/bin/env python3
"""Converts a model directory between the released format and Hugging Face's, either way."""
import os
import shutil
import tempfile

import cli
import hf_format
import model_files
from errors import UserError


def convert_dir(source, out):
    """Writes `out`, a new model directory holding `source`'s model in the other format; returns
    the format written ('released' or 'huggingface').

    The output is written into a staging directory beside `out` and renamed into place at the
    end, so an interrupted conversion leaves nothing under `out`.
    """
    import numpy as np

    import checkpoint
    import encoder

    source, out = os.path.abspath(os.path.expanduser(source)), os.path.abspath(os.path.expanduser(out))
    if not os.path.isdir(source):
        raise UserError(f"'{source}' is not a directory: pass a model directory")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"out '{out}' already exists: choose a new directory")
    to_hf = not hf_format.is_hf_dir(source)
    hparams = model_files.load_hparams(source)
    weights = {name: np.asarray(w) for name, w in checkpoint.open_weights(source, hparams).items()}
    vocab = encoder.vocab_texts(source, hint=f"copy the vocabulary in from {encoder.DEFAULT_VOCAB_DIR}")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", dir=parent)
    try:
        written = os.path.join(staging, "model")
        if to_hf:
            os.mkdir(written)
            hf_format.write_files(written, hparams, weights, vocab)
        else:
            checkpoint.write_model_dir(written, hparams, weights, vocab_dir=source)
        os.replace(written, out)  # onto a missing or empty directory: one rename
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return "huggingface" if to_hf else "released"


@cli.documented(
    "Converts a model directory to the other format: a released-format directory (checkpoint, hparams.json, "
    "encoder.json, vocab.bpe) to a Hugging Face one (config.json, model.safetensors, vocab.json, merges.txt) "
    "that transformers' GPT2LMHeadModel.from_pretrained loads, or a Hugging Face one to the released format. "
    "The weights are copied exactly, as float32.",
    model_name="The model directory to convert, under models_dir; its format is told by its files.",
    out="The directory to write (a path); it must not exist yet, or be empty.")
def convert(model_name: str, out: str, models_dir: str = "models"):
    import hparams

    written = convert_dir(hparams.model_dir(model_name, models_dir), out)
    print(f"wrote {out} in the {'Hugging Face' if written == 'huggingface' else 'released'} format")


if __name__ == "__main__":
    cli.run(convert)
