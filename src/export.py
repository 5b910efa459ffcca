#!/usr/bin/env python3
"""Writes a model directory in another runtime's format (`--format tflite`: LiteRT)."""
import cli
import runtime


def _tflite(model_dir, out_dir, dtype):
    import litert_engine

    return litert_engine.export_tflite(model_dir, out_dir, dtype)


# Format name -> writer(model_dir, out_dir, dtype) returning the main file's path.
FORMATS = {"tflite": _tflite}


def export(model_name: str = "124M", models_dir: str = "models", format: str = "tflite", out_dir: str = None,
           dtype: str = "float32"):
    """Writes the model for another runtime; README.md says what the files take and return.

    Args:
        model_name: Model directory under models_dir (or a run directory's name).
        models_dir: Directory holding model directories.
        format: One of: tflite (a LiteRT program: float32, or int8 weights with --dtype int8).
        out_dir: Where to write (default: models_dir/model_name/export-<format>).
        dtype: float32 or int8 (tflite).
    """
    if format not in FORMATS:
        raise cli.UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    runtime.fast_start()
    import hparams

    model_dir = hparams.model_dir(model_name, models_dir)
    path = FORMATS[format](model_dir, out_dir or f"{model_dir}/export-{format}", dtype)
    print(path)


if __name__ == "__main__":
    cli.run(export)
