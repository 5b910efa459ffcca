"""Reads and writes model directories in the released GPT-2 format, and owns its layout.

A model directory holds `checkpoint`, `model.ckpt.{index,data-00000-of-00001,meta}`,
`hparams.json`, `encoder.json` and `vocab.bpe`. Variables keep their TF1 names
(`model/h0/attn/c_attn/w`, ...), so loading is a name lookup and TF1 code reads ours. This
module alone knows those names, the dense weights' leading 1, and how a model holds its
matrices in each dtype; the model sees the typed structures below.
"""
import collections.abc
import os
import re
import shutil
import tempfile
from typing import NamedTuple

import numpy as np

import hf_format
from encoder import DEFAULT_VOCAB_DIR as VOCAB_DIR
from encoder import vocab_texts, write_vocab
from errors import UserError
from model_files import REDOWNLOAD, checkpoint_prefix
from runtime import tf


class Norm(NamedTuple):
    g: tf.Tensor  # [n_embd]
    b: tf.Tensor  # [n_embd]


class Dense(NamedTuple):
    w: tf.Tensor  # [in, out], or [out, in] for 16-bit products (see `is_transposed`)
    b: tf.Tensor  # [out]


class Block(NamedTuple):
    ln_1: Norm
    attn: Dense  # c_attn: n_embd -> 3 * n_embd (queries, keys, values)
    attn_proj: Dense  # attn/c_proj
    ln_2: Norm
    mlp_fc: Dense  # mlp/c_fc: n_embd -> 4 * n_embd
    mlp_proj: Dense  # mlp/c_proj


class Weights(NamedTuple):
    wte: tf.Tensor  # [n_vocab, n_embd], also the output projection
    wpe: tf.Tensor  # [n_ctx, n_embd]
    blocks: tuple  # of Block, one per layer
    ln_f: Norm


# Each Block field's scope under model/h{i}/ in the checkpoint.
BLOCK_SCOPES = dict(ln_1="ln_1", attn="attn/c_attn", attn_proj="attn/c_proj", ln_2="ln_2",
                    mlp_fc="mlp/c_fc", mlp_proj="mlp/c_proj")


def arrange(variables, n_layer):
    """The typed `Weights` of a mapping from checkpoint name to value."""
    def pair(kind, scope):
        return kind(variables[f"model/{scope}/{kind._fields[0]}"], variables[f"model/{scope}/b"])

    def block(i):
        kinds = {"ln_1": Norm, "ln_2": Norm}
        return Block(**{field: pair(kinds.get(field, Dense), f"h{i}/{scope}")
                        for field, scope in BLOCK_SCOPES.items()})

    return Weights(variables["model/wte"], variables["model/wpe"], tuple(block(i) for i in range(n_layer)),
                   pair(Norm, "ln_f"))


def variable_shapes(hparams):
    """Checkpoint name -> shape, in the released checkpoints' layout (conv1d weights are [1, in, out])."""
    d, v = hparams.n_embd, hparams.n_vocab
    shapes = {"model/wte": [v, d], "model/wpe": [hparams.n_ctx, d]}
    for i in range(hparams.n_layer):
        p = f"model/h{i}/"
        shapes.update({
            p + "ln_1/g": [d], p + "ln_1/b": [d],
            p + "attn/c_attn/w": [1, d, 3 * d], p + "attn/c_attn/b": [3 * d],
            p + "attn/c_proj/w": [1, d, d], p + "attn/c_proj/b": [d],
            p + "ln_2/g": [d], p + "ln_2/b": [d],
            p + "mlp/c_fc/w": [1, d, 4 * d], p + "mlp/c_fc/b": [4 * d],
            p + "mlp/c_proj/w": [1, 4 * d, d], p + "mlp/c_proj/b": [d],
        })
    shapes.update({"model/ln_f/g": [d], "model/ln_f/b": [d]})
    return shapes


def is_matrix(name):
    """Whether a variable is a matrix the model multiplies by (held in the product's dtype)."""
    return name.endswith("/w") or name == "model/wte"


def is_transposed(dtype):
    """Whether a model multiplying in `dtype` holds dense weights as [out, in] (x @ w^T, the
    fastest 16-bit form on oneDNN) rather than the released [in, out] (x @ w, float32's)."""
    return tf.as_dtype(dtype) != tf.float32


def to_model_layout(name, value, dtype=tf.float32):
    """A variable as the checkpoint holds it -> as a model multiplying in `dtype` holds it:
    dense weights, [1, in, out] in the checkpoint, become [in, out], or [out, in] for 16 bits."""
    if not name.endswith("/w"):
        return value
    value = tf.squeeze(value, 0)
    return tf.transpose(value) if is_transposed(dtype) else value


def to_checkpoint_layout(name, value, dtype=tf.float32):
    """The inverse of `to_model_layout`."""
    if not name.endswith("/w"):
        return value
    return (tf.transpose(value) if is_transposed(dtype) else value)[None]


def model_values(weights, hparams, compute_dtype, matrix_dtype):
    """Yields (name, value) for every variable, in the layout a model multiplying in
    `compute_dtype` holds, matrices stored in `matrix_dtype`; one value at a time, so a
    `CheckpointWeights` is never read whole.

    Args:
        weights: Checkpoint name -> tensor or array in the released layout.
    """
    found = getattr(weights, "shapes", None) or {n: list(w.shape) for n, w in weights.items()}
    if problem := compare_shapes(variable_shapes(hparams), found):
        raise ValueError(f"weights do not match hparams: {problem}")
    for name in variable_shapes(hparams):
        value = weights[name]
        dtype = matrix_dtype if is_matrix(name) else tf.float32
        if tf.as_dtype(getattr(value, "dtype", tf.float32)) != dtype:
            value = tf.cast(value, dtype)
        yield name, to_model_layout(name, value, compute_dtype)


def compare_shapes(expected, found):
    """A one-line description of how `found` differs from `expected` (name -> shape), or None."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    misshaped = [f"{n} {list(found[n])} (expected {list(expected[n])})"
                 for n in expected if n in found and list(found[n]) != list(expected[n])]
    problems = []
    for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", misshaped)):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            problems.append(f"{label}: {shown}")
    return "; ".join(problems) or None


class CheckpointWeights(collections.abc.Mapping):
    """A checkpoint's variables as a read-only mapping, checked against `hparams` when opened and
    read one at a time on lookup: a model built from it never holds two copies of its weights.

    `shapes` maps every name to its shape without reading anything.
    """

    def __init__(self, model_dir, hparams, dtype=tf.float32, prefix=None):
        self.prefix = prefix or checkpoint_prefix(model_dir)
        self.dtype = tf.as_dtype(dtype)
        try:
            found = tf.train.load_checkpoint(self.prefix).get_variable_to_shape_map()
        except (tf.errors.OpError, ValueError) as e:
            raise UserError(f"checkpoint {self.prefix} is unreadable ({_first_line(e)}): {REDOWNLOAD}") from None
        self.shapes = variable_shapes(hparams)
        problem = compare_shapes(self.shapes, found)
        if problem:
            raise UserError(f"checkpoint {self.prefix} does not match hparams.json: {problem}")

    def __getitem__(self, name):
        if name not in self.shapes:
            raise KeyError(name)
        try:
            # RestoreV2 yields a TF tensor directly: no second host copy through numpy.
            tensor = tf.raw_ops.RestoreV2(prefix=self.prefix, tensor_names=[name], shape_and_slices=[""],
                                          dtypes=[tf.float32])[0]
        except tf.errors.OpError as e:
            raise UserError(f"checkpoint {self.prefix} is corrupt or truncated ({_first_line(e)}): "
                            f"{REDOWNLOAD}") from None
        return tf.cast(tensor, self.dtype) if self.dtype != tf.float32 else tensor

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def read_weights(model_dir, hparams, dtype=tf.float32, prefix=None):
    """Reads every variable of the checkpoint in `model_dir` (or at `prefix`), checked against `hparams`.

    Returns:
        A dict from checkpoint name to a tensor of `dtype`.
    """
    return dict(CheckpointWeights(model_dir, hparams, dtype, prefix))


def _first_line(error):
    message = getattr(error, "message", None) or str(error)
    message = re.sub(r"\{\{[^}]*\}\}", "", message).strip()  # TensorFlow's {{function_node ...}} tags
    return message.splitlines()[0].strip() if message else type(error).__name__


def random_weights(hparams, seed=0, std=0.02):
    """Random weights of the released shapes: N(0, std) matrices, small random biases and norms."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in variable_shapes(hparams).items():
        leaf = name.rsplit("/", 1)[-1]
        if leaf == "g":
            value = 1 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
        elif leaf == "b":
            value = 0.1 * std * rng.standard_normal(shape, dtype=np.float32)
        else:
            value = std * rng.standard_normal(shape, dtype=np.float32)
        weights[name] = value.astype(np.float32, copy=False)
    return weights


def write_model_dir(path, hparams, weights, vocab_dir=VOCAB_DIR):
    """Writes a complete model directory in the released format.

    The files are written into a temporary directory beside `path` and moved into place, so a
    crash leaves either the old files or the new ones, never a mix of half-written files.

    Args:
        path: The model directory to create or replace.
        hparams: The model's HParams.
        weights: Checkpoint name -> array (numpy or tensor), with the released shapes.
        vocab_dir: Where to copy `encoder.json` and `vocab.bpe` from.
    """
    expected = variable_shapes(hparams)
    problem = compare_shapes(expected, {n: list(np.shape(w)) for n, w in weights.items()})
    if problem:
        raise ValueError(f"weights do not match hparams: {problem}")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", dir=parent)
    try:
        _save_tf1_checkpoint(os.path.join(staging, "model.ckpt"), expected, weights)
        with open(os.path.join(staging, "checkpoint"), "w", encoding="utf-8") as f:
            f.write('model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n')
        with open(os.path.join(staging, "hparams.json"), "w", encoding="utf-8") as f:
            f.write(hparams.to_json())
        write_vocab(staging, vocab_texts(vocab_dir))
        os.makedirs(path, exist_ok=True)
        # `checkpoint` goes last: until it is replaced, readers see the previous complete set.
        names = sorted(os.listdir(staging), key=lambda n: n == "checkpoint")
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _save_tf1_checkpoint(prefix, shapes, weights):
    """Saves with TF1's Saver, which writes the .index/.data pair and the .meta graph."""
    graph = tf.Graph()
    with graph.as_default():
        feeds, variables = {}, {}
        for name, shape in shapes.items():
            # Fed through placeholders so the .meta graph stays small (no weights baked in).
            placeholder = tf.compat.v1.placeholder(tf.float32, shape)
            variables[name] = tf.compat.v1.Variable(placeholder, name=name)
            feeds[placeholder] = np.asarray(weights[name], dtype=np.float32)
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            session.run(tf.compat.v1.global_variables_initializer(), feed_dict=feeds)
            saver.save(session, prefix, write_state=False)


def write_random_model(path, hparams, seed=0, std=0.02):
    """Writes a random-weight model of `hparams`' shape in the released format; returns `path`."""
    return write_model_dir(path, hparams, random_weights(hparams, seed=seed, std=std))


def open_weights(model_dir, hparams, prefix=None):
    """The weights of a model directory, read one variable at a time and checked against `hparams`:
    a `CheckpointWeights`, or for a Hugging Face directory its tensors in the released names and layout."""
    if prefix is not None or not hf_format.is_hf_dir(model_dir):
        return CheckpointWeights(model_dir, hparams, prefix=prefix)
    weights = hf_format.HFWeights(model_dir)
    problem = compare_shapes(variable_shapes(hparams), weights.shapes)
    if problem:
        raise UserError(f"{weights.path} does not match {hf_format.CONFIG_FILE}: {problem}")
    return weights
