"""A decode engine on LiteRT (TensorFlow Lite): the same transformer, converted once and cached.

The model's one program takes tokens [B, T] at position `pos` beside the cache, and returns the
last position's logits [B, V] and the new tokens' keys and values. The cache is the program's
inputs, written in place between calls through the interpreter's views of its input buffers,
so no step copies it; attention reads the cache and the new tokens' own keys separately.
"""
import contextlib
import glob
import hashlib
import json
import os
import sys
import weakref

import numpy as np

import checkpoint
import model
from errors import UserError
from model import attention_input, block_output, norm
from runtime import tf


def step_signature(hparams):
    """Input specs of the converted program: tokens, pos, pad, then each layer's keys
    [B, H, capacity, D] and values stored transposed [B, H, D, capacity]."""
    h, d = hparams.n_head, hparams.head_dim
    return ([tf.TensorSpec([None, None], tf.int32, name="tokens"), tf.TensorSpec([], tf.int32, name="pos"),
             tf.TensorSpec([None], tf.int32, name="pad")]
            + [tf.TensorSpec([None, h, None, d], tf.float32, name=f"keys_{i}") for i in range(hparams.n_layer)]
            + [tf.TensorSpec([None, h, d, None], tf.float32, name=f"values_{i}") for i in range(hparams.n_layer)])


def step_program(lm):
    """The function the converter takes: (tokens, pos, pad, *keys, *values) -> (logits [B, V],
    new keys [L, B, H, T, D], new values [L, B, H, T, D])."""
    hp = lm.hparams

    def run(tokens, pos, pad, *cache):
        keys, values = cache[:hp.n_layer], cache[hp.n_layer:]
        b, t = tf.shape(tokens)[0], tf.shape(tokens)[1]
        capacity = tf.shape(keys[0])[2]
        query_pos = pos + tf.range(t)  # [T]
        w = lm.read()
        x = model.embed(w, tokens, tf.maximum(query_pos[None, :] - pad[:, None], 0))
        x = tf.reshape(x, [b * t, hp.n_embd])  # rows, so each dense layer is one 2-D product
        # Keys before pos come from the cache, the rest are the new tokens' own.
        cached_pos = tf.range(capacity)
        keep_cached = tf.logical_and(cached_pos[None, None, :] < pos, cached_pos[None, None, :] >= pad[:, None, None])
        keep_cached = tf.broadcast_to(keep_cached, tf.stack([b, t, capacity]))  # [B, T, C]
        keep_new = tf.logical_and(query_pos[None, None, :] <= query_pos[None, :, None],
                                  query_pos[None, None, :] >= pad[:, None, None])  # [B, T, T]
        mask = model.Mask.of(tf.cast(tf.concat([keep_cached, keep_new], -1), tf.float32)[:, None])
        scale = tf.math.rsqrt(tf.constant(hp.head_dim, tf.float32))
        new_keys, new_values = [], []
        for i, p in enumerate(w.blocks):
            qkv = tf.reshape(attention_input(x, p), [b, t, 3, hp.n_head, hp.head_dim])
            q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))  # [B, H, T, D] each
            scores = tf.concat([tf.matmul(q, keys[i], transpose_b=True), tf.matmul(q, k, transpose_b=True)], -1)
            weights = model.softmax(scores * scale * mask.keep + mask.bias)  # [B, H, T, C + T]
            old, new = weights[..., :capacity], weights[..., capacity:]
            a = tf.matmul(old, values[i], transpose_b=True) + tf.matmul(new, v)  # [B, H, T, D]
            x = block_output(x, tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [b * t, hp.n_embd]), p)
            new_keys.append(k)
            new_values.append(v)
        last = tf.reshape(x, [b, t, hp.n_embd])[:, -1]
        logits = model.logits(norm(last, w.ln_f), w.wte)
        return logits, tf.stack(new_keys), tf.stack(new_values)

    return run


# Bumped whenever the converted program changes, so older conversions count as stale.
PROGRAM_VERSION = 1
DTYPES = ("float32", "int8")
# Where conversions are cached, inside the model's directory.
CACHE_DIR = "litert"


# A flatbuffer's offsets are 32-bit signed: a program holds at most 2 GiB.
FLATBUFFER_LIMIT = 2 ** 31


def fits(hparams, dtype):
    """Whether a model's converted program fits one flatbuffer (float32: up to 355M; int8: 774M)."""
    d = hparams.n_embd
    weights = (hparams.n_vocab + hparams.n_ctx) * d + hparams.n_layer * 12 * d * d
    return weights * (1 if dtype == "int8" else 4) < 0.95 * FLATBUFFER_LIMIT


def installed():
    """Whether the LiteRT interpreter (package ai-edge-litert) can be imported."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


def cache_key(model_dir, dtype):
    """What a conversion depends on, hashed: the weights' files (names, sizes, times written) and
    hparams.json or config.json, the dtype, the program's version and the converter's and interpreter's versions."""
    from importlib import metadata

    files = checkpoint.weight_sources(model_dir)
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    parts = [PROGRAM_VERSION, dtype, tf.__version__, metadata.version("ai-edge-litert"), stats]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def cached_program(model_dir, dtype, load_lm, progress=True):
    """The path of `model_dir`'s conversion to `dtype`, converting it first if there is none for
    the current weights (`load_lm()` gives the float32 `model.GPT2`); stale ones are removed."""
    from tqdm import tqdm

    folder = os.path.join(model_dir, CACHE_DIR)
    target = os.path.join(folder, f"{dtype}-{cache_key(model_dir, dtype)}.tflite")
    if os.path.exists(target):
        return target
    with tqdm(total=3, desc=f"converting to LiteRT {dtype} (once)", unit="stage",
              disable=None if progress else True) as bar:  # None: shown on a terminal only
        lm = load_lm()
        bar.update()
        program = convert(lm, int8=dtype == "int8")
        del lm
        bar.update()
        try:
            write_program(program, target)
        except OSError as e:
            raise UserError(f"cannot cache the LiteRT conversion in {folder} ({e.strerror}): make it writable, "
                            "or use engine tf") from None
        for stale in glob.glob(os.path.join(glob.escape(folder), f"{dtype}-*.tflite")):
            if stale != target:
                os.remove(stale)
        bar.update()
    return target


def write_program(program, path):
    """Writes bytes (a flatbuffer) to `path` atomically: a temporary name, then a rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    try:
        with open(partial, "wb") as f:
            f.write(program)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def convert(lm, int8=False):
    """The converted program as flatbuffer bytes; int8 quantizes the weights (dynamic range)."""
    fn = tf.function(step_program(lm), autograph=False, input_signature=step_signature(lm.hparams))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], lm)
    if int8:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


@contextlib.contextmanager
def quiet_stderr():
    """Silences file descriptor 2, where native code logs, for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class State:
    """A stream's cache in the engine. The newest state stepped lives in the interpreter's input
    buffers, written in place; any other keeps its own copy (`saved`), which goes back into the
    buffers, once, when it is stepped again."""

    def __init__(self, batch, capacity, saved=None):
        self.batch, self.capacity = batch, capacity
        self.saved = saved  # (keys, values): per-layer arrays, or None while in the buffers


class Engine:
    """Cached decoding on a LiteRT interpreter, with `decode.Decoder`'s interface run from the
    host: `prefill`, `step`, `rearrange` and `concat` take and return numpy arrays, and
    `host_loop` tells the sampler and the batcher so.

    Args:
        program: Flatbuffer bytes or a path, from `convert`.
        hparams: The model's `HParams`.
    """

    host_loop = True

    def __init__(self, program, hparams, num_threads=None):
        from ai_edge_litert.interpreter import Interpreter

        self.hparams = hparams
        self.state_spec = None
        source = dict(model_content=program) if isinstance(program, bytes) else dict(model_path=program)
        with quiet_stderr():  # the interpreter logs an INFO line as it applies its delegate
            self._it = Interpreter(**source, num_threads=num_threads or len(os.sched_getaffinity(0)))
            self._it.allocate_tensors()
        runner = self._it.get_signature_runner()
        self._in = {name: d["index"] for name, d in runner.get_input_details().items()}
        outs = {name: d["index"] for name, d in runner.get_output_details().items()}
        self._logits, self._new_keys, self._new_values = (outs[f"output_{i}"] for i in range(3))
        self._layers = range(hparams.n_layer)
        self._shape = None
        self._current = lambda: None  # a weak reference to the state in the buffers

    def _resize(self, batch, t, capacity):
        if self._shape == (batch, t, capacity):
            return
        h, d = self.hparams.n_head, self.hparams.head_dim
        it = self._it
        it.resize_tensor_input(self._in["tokens"], [batch, t])
        it.resize_tensor_input(self._in["pad"], [batch])
        for i in self._layers:
            it.resize_tensor_input(self._in[f"keys_{i}"], [batch, h, capacity, d])
            it.resize_tensor_input(self._in[f"values_{i}"], [batch, h, d, capacity])
        it.allocate_tensors()
        self._shape = (batch, t, capacity)

    def _write(self, name, value):
        self._it.tensor(self._in[name])()[...] = value

    def _cache_views(self):
        """Views of the buffers: each layer's keys [B, H, C, D] and values [B, H, D, C]."""
        return ([self._it.tensor(self._in[f"keys_{i}"])() for i in self._layers],
                [self._it.tensor(self._in[f"values_{i}"])() for i in self._layers])

    def _set_aside(self):
        """Copies the state in the buffers out of them, if anything still holds it."""
        current = self._current()
        if current is not None and current.saved is None:
            current.saved = tuple([view.copy() for view in views] for views in self._cache_views())
        self._current = lambda: None

    def _take_buffers(self, state, pad):
        """Puts `state` (and its rows' padding) in the buffers, if it is not there already."""
        if self._current() is state:
            return
        self._set_aside()
        self._resize(state.batch, 1, state.capacity)
        self._it.set_tensor(self._in["pad"], np.asarray(pad, np.int32))
        self._fill(state.saved)
        state.saved = None
        self._current = weakref.ref(state)

    def _fill(self, saved):
        # The views die on return: the interpreter refuses to run while one is held.
        for views, arrays in zip(self._cache_views(), saved):
            for view, array in zip(views, arrays):
                view[...] = array

    def _arrays(self, state):
        """A state's keys and values per layer, wherever they are (the buffers' are views)."""
        return state.saved if state.saved is not None else self._cache_views()

    def prefill(self, tokens, pad, capacity):
        """Runs prompts tokens [B, T], left-padded by `pad` [B], into a new cache of `capacity`
        positions (at most n_ctx); the last position's logits [B, V] and the state."""
        tokens, pad = np.asarray(tokens, np.int32), np.asarray(pad, np.int32)
        batch, t = tokens.shape
        capacity = int(capacity)
        self._set_aside()
        # The prompt runs beside an empty one-slot cache (masked out at pos 0), then the cache
        # takes the step's shapes; resizing reallocates the inputs, so their values are kept aside.
        self._resize(batch, t, 1)
        for i in self._layers:
            self._write(f"keys_{i}", 0)
            self._write(f"values_{i}", 0)
        logits, keys, values = self._run(tokens, 0, pad)
        keys, values = keys.copy(), values.copy()
        self._resize(batch, 1, capacity)
        self._it.set_tensor(self._in["pad"], pad)
        cached_keys, cached_values = self._cache_views()
        for i in self._layers:
            cached_keys[i][...] = 0
            cached_keys[i][:, :, :t] = keys[i]
            cached_values[i][...] = 0
            cached_values[i][:, :, :, :t] = np.swapaxes(values[i], -1, -2)
        del cached_keys, cached_values
        state = State(batch, capacity)
        self._current = weakref.ref(state)
        return logits, state

    def step(self, token, pos, pad, state):
        """One token per row, token [B] at position `pos`: next-token logits [B, V] and the state."""
        self._take_buffers(state, pad)
        pos = int(pos)
        logits, keys, values = self._run(np.asarray(token, np.int32)[:, None], pos, None)
        for i in self._layers:
            self._it.tensor(self._in[f"keys_{i}"])()[:, :, pos] = keys[i, :, :, 0]
            self._it.tensor(self._in[f"values_{i}"])()[:, :, :, pos] = values[i, :, :, 0]
        return logits, state

    def rearrange(self, state, batch, rows, start, capacity):
        """`decode.KVCache.rearrange` on the host: a new state of `rows` of `state`, positions
        start..start+capacity-1 as 0..capacity-1 (those it lacks copy a neighbour's, masked or
        written before they are read)."""
        rows = np.asarray(rows, np.int64)
        positions = np.clip(np.arange(int(start), int(start) + int(capacity)), 0, state.capacity - 1)
        keys, values = self._arrays(state)
        return State(len(rows), int(capacity), ([k[rows][:, :, positions] for k in keys],
                                                [v[rows][..., positions] for v in values]))

    def concat(self, first, second, capacity):
        """The rows of two states of `capacity` positions in one, first's rows first."""
        (k1, v1), (k2, v2) = self._arrays(first), self._arrays(second)
        return State(first.batch + second.batch, int(capacity),
                     ([np.concatenate(pair) for pair in zip(k1, k2)], [np.concatenate(pair) for pair in zip(v1, v2)]))

    def cache_bytes_per_position(self):
        """What one row's cache takes per position: keys and values of every layer, float32."""
        return 2 * self.hparams.n_layer * self.hparams.n_embd * 4

    def _run(self, tokens, pos, pad):
        it = self._it
        it.set_tensor(self._in["tokens"], tokens)
        it.set_tensor(self._in["pos"], np.int32(pos))
        if pad is not None:
            it.set_tensor(self._in["pad"], pad)
        it.invoke()
        return it.get_tensor(self._logits), it.get_tensor(self._new_keys), it.get_tensor(self._new_values)

    def traces(self):
        return {}


def export_tflite(model_dir, out_dir, dtype="float32"):
    """Writes `model_dir`'s converted program as `out_dir/gpt2-<dtype>.tflite`, with hparams.json,
    encoder.json and vocab.bpe beside it, for LiteRT users; returns the program's path."""
    import encoder

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)} for tflite, got {dtype!r}")
    models_dir, name = os.path.split(os.path.normpath(model_dir))
    program = convert(model.load_model(name, models_dir or "."), int8=dtype == "int8")
    target = os.path.join(out_dir, f"gpt2-{dtype}.tflite")
    write_program(program, target)
    has_vocab = any(map(os.path.exists, encoder.vocab_files(model_dir))) or os.path.exists(
        os.path.join(model_dir, encoder.TOKENIZER_FILE))
    texts = encoder.vocab_texts(model_dir if has_vocab else encoder.default_vocab_dir())
    # Released or Hugging Face directory alike, the export holds the released hparams and vocabulary.
    files = dict(zip(encoder.VOCAB_FILES, texts), **{"hparams.json": checkpoint.load_hparams(model_dir).to_json()})
    for name, text in files.items():
        write_program(text.encode("utf-8"), os.path.join(out_dir, name))
    return target
