"""Where a model directory keeps its files, in the released format or Hugging Face's: its
hyperparameters, its checkpoint's prefix and the files its weights come from.

It reads no tensors, so it needs no TensorFlow: the LiteRT engine finds its cached programs
through it before TensorFlow loads.
"""
import os
import re

import hf_format
from errors import UserError
from hparams import HParams

REDOWNLOAD = "download the model again with download_model.py"


def load_hparams(model_dir):
    """The HParams of a model directory: its hparams.json, or a Hugging Face directory's config.json."""
    if hf_format.is_hf_dir(model_dir):
        return hf_format.read_hparams(model_dir)
    path = os.path.join(model_dir, "hparams.json")
    if os.path.isdir(model_dir) and not os.path.exists(path):
        raise UserError(f"'{model_dir}' holds neither hparams.json (the released format) nor {hf_format.CONFIG_FILE} "
                        f"(Hugging Face's): {REDOWNLOAD}, or pass a Hugging Face model directory")
    return HParams.from_json(path)


def checkpoint_prefix(model_dir):
    """The checkpoint prefix that `model_dir/checkpoint` names, inside `model_dir` itself.

    TF1 savers may write an absolute path into `checkpoint`, which tf.train.latest_checkpoint
    follows: a copied directory would read the original's weights. So only the named file's
    place inside this directory counts (a directory without `checkpoint` falls back to model.ckpt).
    """
    named = "model.ckpt"
    state_file = os.path.join(model_dir, "checkpoint")
    if os.path.exists(state_file):
        try:
            with open(state_file, encoding="utf-8") as f:
                found = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', f.read(), re.MULTILINE)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {state_file} ({e}): {REDOWNLOAD}") from None
        if not found:
            raise UserError(f"{state_file} names no checkpoint: {REDOWNLOAD}")
        named = found.group(1)
    inside = os.path.basename(named) if os.path.isabs(named) else os.path.normpath(named)
    prefix = os.path.join(model_dir, inside)
    if inside.startswith(os.pardir) or not os.path.exists(prefix + ".index"):
        raise UserError(f"no checkpoint {inside!r} in '{model_dir}': {REDOWNLOAD}")
    return prefix


def weight_sources(model_dir):
    """The files a model directory's weights and shape are read from, in either format."""
    if hf_format.is_hf_dir(model_dir):
        names = [hf_format.CONFIG_FILE] + sorted(
            f for f in os.listdir(model_dir) if f.endswith(".safetensors") or f in (hf_format.INDEX_FILE,
                                                                                    hf_format.PICKLE_FILE))
        return [os.path.join(model_dir, f) for f in names]
    prefix = checkpoint_prefix(model_dir)
    data = sorted(os.path.join(model_dir, f) for f in os.listdir(model_dir)
                  if os.path.join(model_dir, f).startswith(prefix + "."))
    return data + [os.path.join(model_dir, "hparams.json")]
