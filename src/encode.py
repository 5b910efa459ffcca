#!/usr/bin/env python3
"""Pre-encodes a text corpus to an .npz of token chunks, which train.py loads without encoding again."""
import os
import re

import cli
import dataset
import encoder
import hparams as hparams_lib


def load_encoder(model_name, models_dir):
    """The vocabulary of `models_dir/model_name` when that directory exists, else the bundled
    one: every released GPT-2 size shares one vocabulary, so none needs downloading."""
    models_dir = os.path.expanduser(os.path.expandvars(str(models_dir)))
    if os.path.isdir(os.path.join(models_dir, hparams_lib.resolve_model_name(model_name))):
        return encoder.get_encoder(model_name, models_dir)
    return encoder.Encoder.from_dir(encoder.default_vocab_dir())


def npz_path(out_npz):
    """(path, whether ".npz" was added): train.py reads only names ending in .npz as tokens."""
    out = os.path.expanduser(str(out_npz))
    if out.lower().endswith(".npz"):
        return out, False
    return out + ".npz", True


def write_npz(path, chunks):
    """Writes `chunks` as arr_0, arr_1, ... (the fork's layout) under a temporary name in the same
    directory, then renames it: `path` is never half-written. Temporary files that earlier,
    killed, runs left for `path` are removed."""
    import numpy as np

    parent, base = os.path.split(os.path.abspath(path))
    temp = os.path.join(parent, f".{base}.{os.getpid()}.tmp")
    leftover = re.compile(re.escape(f".{base}.") + r"\d+\.tmp$")
    try:
        os.makedirs(parent, exist_ok=True)
        for name in os.listdir(parent):
            if leftover.match(name):
                os.remove(os.path.join(parent, name))
        with open(temp, "wb") as f:
            np.savez_compressed(f, *chunks)
        os.replace(temp, path)
    except OSError as e:
        raise cli.UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)


@cli.documented(
    "Encodes a text corpus to an .npz of token chunks for train.py --dataset, then prints the "
    "number of chunks and tokens.\n\nFiles are documents, separated by the <|endoftext|> token; .npz "
    "files in the input are copied as they are. The output is written whole or not at all.",
    in_text="The corpus: a text file, a directory (read recursively in sorted order, hidden files skipped) "
            "or a quoted glob such as 'data/*.txt'.",
    out_npz="The output file; .npz is added to a name without it.",
    model_name="Model whose vocabulary to use; when models_dir has no such directory the bundled "
               "vocabulary is used, which all released GPT-2 sizes share.",
    combine="Documents are gathered into chunks of at least this many characters; 0 makes each "
            "document a chunk.",
    encoding="Encoding of the text files, a Python codec name (utf-8, latin-1, cp1252, ...).")
def encode(in_text: str, out_npz: str, model_name: str = "124M", models_dir: str = "models", combine: int = 50000,
           encoding: str = "utf-8"):
    out, added = npz_path(out_npz)
    if os.path.exists(out) and any(os.path.samefile(out, f) for f in dataset.dataset_files(in_text)):
        raise cli.UserError(f"{out} is part of the input {in_text}: write the output elsewhere")
    enc = load_encoder(model_name, models_dir)
    chunks = dataset.load_dataset(enc, in_text, combine=combine, encoding=encoding)
    write_npz(out, chunks)
    tokens = sum(len(c) for c in chunks)
    note = " (.npz added to the name)" if added else ""
    print(f"wrote {len(chunks)} chunk{'s' * (len(chunks) != 1)}, {tokens} tokens to {out}{note}")


if __name__ == "__main__":
    cli.run(encode)
