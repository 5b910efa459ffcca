#!/usr/bin/env python3
"""Exports a model for serving elsewhere; `--format` picks the form (one function per format)."""
import os
import re
import shutil

import cli
import runtime
from errors import UserError


def next_version(out):
    """The version directory TF Serving would take as newest next: one past the highest number in `out`."""
    taken = [int(name) for name in os.listdir(out) if re.fullmatch("[0-9]+", name)] if os.path.isdir(out) else []
    return max(taken, default=0) + 1


def export_saved_model(model_name, models_dir, out, dtype):
    """Writes `out/<version>/` in TF Serving's layout, written under a hidden name and renamed
    when whole, so a server watching `out` never loads half a model. Returns the directory."""
    import saved_model
    from runtime import tf

    module = saved_model.GenerateModule.load(model_name, models_dir, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    version = next_version(out)
    final = os.path.join(out, str(version))
    partial = os.path.join(out, f".{version}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        tf.saved_model.save(module, partial, signatures=module.signatures())
        os.rename(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def export_tflite(model_name, models_dir, out, dtype):
    """Writes the LiteRT program (float32, or int8 weights; several to run in turn when it does
    not fit one flatbuffer) with its hparams and vocabulary into `out`; README.md says what they
    take and return. Returns the programs' paths, a line each."""
    import hparams
    import litert_convert

    return "\n".join(litert_convert.export_tflite(hparams.model_dir(model_name, models_dir), out, dtype))


# --format -> the function writing it; each takes (model_name, models_dir, out, dtype) and returns the path.
FORMATS = {
    "saved_model": export_saved_model,
    "tflite": export_tflite,
}


@cli.documented(
    "Exports a model to --out in the form --format names, and prints where it went.\n\n"
    "saved_model: out/<version>/ for TF Serving, version one past the highest there; its serving_default "
    "signature generates (the whole sampling loop inside the graph).\n"
    "tflite: out/gpt2-<dtype>.tflite, the LiteRT program (float32, or int8 weights with --dtype int8), with "
    "hparams.json, encoder.json and vocab.bpe; a model past one flatbuffer's 2 GB (float32 774M and 1558M) "
    "is gpt2-<dtype>-1of<n>.tflite and on, run in turn.",
    format="What to write: " + ", ".join(FORMATS) + ".",
    out="Directory to write into (created if missing).")
def export(format: str = "saved_model", model_name: str = "124M", models_dir: str = "models", out: str = None,
           dtype: str = "float32"):
    if format not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if not out:
        raise UserError("give --out, the directory to export into")
    runtime.fast_start()
    print(FORMATS[format](model_name, os.path.expanduser(models_dir), os.path.expanduser(out), dtype))


if __name__ == "__main__":
    cli.run(export)
