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


def step_signature(hparams, layers=None):
    """Input specs of a converted program holding `layers` (a range, all by default): tokens
    [B, T] for the first program or the hidden state [B, T, d] before its first layer for a
    later one, pos, pad, then each layer's keys and values [B, H, 1, capacity, D]."""
    h, d = hparams.n_head, hparams.head_dim
    layers = range(hparams.n_layer) if layers is None else layers
    first = (tf.TensorSpec([None, None], tf.int32, name="tokens") if layers.start == 0
             else tf.TensorSpec([None, None, hparams.n_embd], tf.float32, name="hidden"))
    return ([first, tf.TensorSpec([], tf.int32, name="pos"), tf.TensorSpec([None], tf.int32, name="pad")]
            + [tf.TensorSpec([None, h, 1, None, d], tf.float32, name=f"{kind}_{i}")
               for kind in ("keys", "values") for i in layers])


def step_program(lm, layers=None):
    """The function the converter takes for `layers` (all by default): (tokens or hidden, pos,
    pad, *keys, *values) -> (logits [B, V] after the last layer or the hidden state [B, T, d],
    new keys [L, B, H, T, D], new values [L, B, H, T, D])."""
    hp = lm.hparams
    layers = range(hp.n_layer) if layers is None else layers
    n = len(layers)

    def run(inputs, pos, pad, *cache):
        keys, values = cache[:n], cache[n:]
        b, t = tf.shape(inputs)[0], tf.shape(inputs)[1]
        capacity = tf.shape(keys[0])[3]
        query_pos = pos + tf.range(t)  # [T]
        w = lm.layers  # variables: a program reads, and so holds, only what it uses
        x = model.embed(w, inputs, tf.maximum(query_pos[None, :] - pad[:, None], 0)) if layers.start == 0 else inputs
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
        for i, p in enumerate(lm.read_block(w.blocks[j]) for j in layers):
            qkv = tf.reshape(attention_input(x, p), [b, t, 3, hp.n_head, hp.head_dim])
            q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))  # [B, H, T, D] each
            # The cache's products as broadcast multiplies and sums over its 5-D layout, which
            # XNNPACK streams near memory speed: a batched product repacks the cache every call.
            cached_scores = tf.reduce_sum(tf.expand_dims(q, 3) * keys[i], -1)  # [B, H, T, C]
            scores = tf.concat([cached_scores, tf.matmul(q, k, transpose_b=True)], -1)
            weights = model.softmax(scores * scale * mask.keep + mask.bias)  # [B, H, T, C + T]
            old, new = weights[..., :capacity], weights[..., capacity:]
            a = tf.reduce_sum(tf.expand_dims(old, -1) * values[i], 3) + tf.matmul(new, v)  # [B, H, T, D]
            x = block_output(x, tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [b * t, hp.n_embd]), p)
            new_keys.append(k)
            new_values.append(v)
        x = tf.reshape(x, [b, t, hp.n_embd])
        if layers.stop < hp.n_layer:
            return x, tf.stack(new_keys), tf.stack(new_values)
        return model.logits(norm(x[:, -1], w.ln_f), w.wte), tf.stack(new_keys), tf.stack(new_values)

    return run


# Bumped whenever the converted program changes, so older conversions count as stale.
PROGRAM_VERSION = 3
DTYPES = ("float32", "int8")
# Where conversions are cached, inside the model's directory.
CACHE_DIR = "litert"


# A flatbuffer's offsets are 32-bit signed: a program holds at most 2 GiB.
FLATBUFFER_LIMIT = 2 ** 31


def split(hparams, dtype):
    """The layers of each program, as ranges: one program when the model fits a flatbuffer
    (float32 up to 355M, int8 every size), else as few as fit, the first holding the embeddings
    too and the last the output projection (the token embedding again)."""
    d, size = hparams.n_embd, 1 if dtype == "int8" else 4
    room = 0.95 * FLATBUFFER_LIMIT
    layer, embeddings = 12 * d * d * size, (hparams.n_vocab + hparams.n_ctx) * d * size
    if embeddings + hparams.n_layer * layer < room:
        return [range(hparams.n_layer)]
    if hparams.n_vocab * d * size + layer > room:
        raise UserError(f"a {dtype} layer and the embedding do not fit one LiteRT program: use engine tf")
    pieces, start, used = [], 0, embeddings
    for i in range(hparams.n_layer):
        if used + layer > room:
            pieces.append(range(start, i))
            start, used = i, 0
        used += layer
    if used + hparams.n_vocab * d * size > room:  # the last keeps one layer beside the projection
        pieces.append(range(start, hparams.n_layer - 1))
        start = hparams.n_layer - 1
    return pieces + [range(start, hparams.n_layer)]


def fits(hparams, dtype):
    """Whether a model's converted program fits one flatbuffer (float32: up to 355M; int8: all)."""
    return len(split(hparams, dtype)) == 1


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


def program_names(stem, pieces):
    """File names of a conversion in `pieces` programs: stem.tflite, or stem-1of3.tflite..."""
    if pieces == 1:
        return [f"{stem}.tflite"]
    return [f"{stem}-{k}of{pieces}.tflite" for k in range(1, pieces + 1)]


def cached_program(model_dir, hparams, dtype, load_lm, progress=True):
    """The paths of `model_dir`'s conversion to `dtype` (one program, or several when it does not
    fit one flatbuffer), converting it first if there is none for the current weights
    (`load_lm()` gives the float32 `model.GPT2`; `hparams` are its `HParams`); stale ones are removed."""
    from tqdm import tqdm

    folder = os.path.join(model_dir, CACHE_DIR)
    pieces = split(hparams, dtype)
    targets = [os.path.join(folder, name) for name in program_names(f"{dtype}-{cache_key(model_dir, dtype)}", len(pieces))]
    if all(map(os.path.exists, targets)):
        return targets
    with tqdm(total=1 + len(pieces), desc=f"converting to LiteRT {dtype} (once)", unit="stage",
              disable=None if progress else True) as bar:  # None: shown on a terminal only
        lm = load_lm()
        bar.update()
        for layers, target in zip(pieces, targets):
            program = convert(lm, int8=dtype == "int8", layers=layers)
            try:
                write_program(program, target)
            except OSError as e:
                raise UserError(f"cannot cache the LiteRT conversion in {folder} ({e.strerror}): make it writable, "
                                "or use engine tf") from None
            del program
            bar.update()
        for stale in glob.glob(os.path.join(glob.escape(folder), f"{dtype}-*.tflite")):
            if stale not in targets:
                os.remove(stale)
    return targets


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


def convert(lm, int8=False, layers=None):
    """The converted program of `layers` (all by default) as flatbuffer bytes; int8 quantizes
    the weights (dynamic range)."""
    fn = tf.function(step_program(lm, layers), autograph=False, input_signature=step_signature(lm.hparams, layers))
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


def release_mapped_pages(path):
    """Drops from this process's memory the pages of a program file the interpreter mapped, once
    it has packed the weights for its kernels and reads them no more: the kernel reads any page
    touched again back from the file, so nothing changes but the memory held (Linux only)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            maps = f.read().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    path = os.path.realpath(path)
    for line in maps:
        fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode, path
        if len(fields) == 6 and fields[5] == path and "w" not in fields[1]:  # never a page it wrote
            start, end = (int(a, 16) for a in fields[0].split("-"))
            madvise(start, end - start, MADV_DONTNEED)


MADV_DONTNEED = 4


class Piece:
    """One program of the model: its interpreter and the indices of its inputs and outputs."""

    def __init__(self, program, num_threads):
        from ai_edge_litert.interpreter import Interpreter

        source = dict(model_content=program) if isinstance(program, bytes) else dict(model_path=program)
        with quiet_stderr():  # the interpreter logs an INFO line as it applies its delegate
            self.it = Interpreter(**source, num_threads=num_threads)
            self.it.allocate_tensors()
        if not isinstance(program, bytes):
            release_mapped_pages(program)
        runner = self.it.get_signature_runner()
        self.inputs = {name: d["index"] for name, d in runner.get_input_details().items()}
        outs = {name: d["index"] for name, d in runner.get_output_details().items()}
        self.outputs = [outs[f"output_{i}"] for i in range(3)]  # logits or hidden, new keys, new values
        self.first = "tokens" in self.inputs
        self.layers = sorted(int(name[len("keys_"):]) for name in self.inputs if name.startswith("keys_"))

    def view(self, name):
        """A numpy view of an input buffer; the interpreter refuses to run while one is held."""
        return self.it.tensor(self.inputs[name])()

    def run(self, inputs, pos, pad):
        it = self.it
        it.set_tensor(self.inputs["tokens" if self.first else "hidden"], inputs)
        it.set_tensor(self.inputs["pos"], np.int32(pos))
        if pad is not None:
            it.set_tensor(self.inputs["pad"], pad)
        it.invoke()
        return [it.get_tensor(i) for i in self.outputs]


class Engine:
    """Cached decoding on LiteRT interpreters, with `decode.Decoder`'s interface run from the
    host: `prefill`, `step`, `rearrange` and `concat` take and return numpy arrays, and
    `host_loop` tells the sampler and the batcher so. A model too large for one flatbuffer runs
    as several programs in turn, each holding some layers and their cache.

    Args:
        programs: Flatbuffer bytes or a path from `convert`, or a list of them in layer order.
        hparams: The model's `HParams`.
    """

    host_loop = True

    def __init__(self, programs, hparams, num_threads=None):
        self.hparams = hparams
        self.state_spec = None
        programs = programs if isinstance(programs, (list, tuple)) else [programs]
        threads = num_threads or len(os.sched_getaffinity(0))
        self._pieces = [Piece(program, threads) for program in programs]
        # Each layer's cache buffers, as (piece, keys name, values name).
        self._slots = [(piece, f"keys_{i}", f"values_{i}") for piece in self._pieces for i in piece.layers]
        if [int(k[len("keys_"):]) for _, k, _ in self._slots] != list(range(hparams.n_layer)):
            raise UserError(f"the LiteRT programs do not hold the model's {hparams.n_layer} layers in order: "
                            "convert it again (delete its litert folder)")
        self._shape = None
        self._current = lambda: None  # a weak reference to the state in the buffers

    def _resize(self, batch, t, capacity):
        if self._shape == (batch, t, capacity):
            return
        h, d, e = self.hparams.n_head, self.hparams.head_dim, self.hparams.n_embd
        for piece in self._pieces:
            it = piece.it
            it.resize_tensor_input(piece.inputs["tokens"] if piece.first else piece.inputs["hidden"],
                                   [batch, t] if piece.first else [batch, t, e])
            it.resize_tensor_input(piece.inputs["pad"], [batch])
            for i in piece.layers:
                for kind in ("keys", "values"):
                    it.resize_tensor_input(piece.inputs[f"{kind}_{i}"], [batch, h, 1, capacity, d])
            it.allocate_tensors()
        self._shape = (batch, t, capacity)

    def _cache_views(self):
        """Views of the buffers: each layer's keys and values [B, H, C, D]."""
        return ([piece.view(k)[:, :, 0] for piece, k, _ in self._slots],
                [piece.view(v)[:, :, 0] for piece, _, v in self._slots])

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
        for piece in self._pieces:
            piece.it.set_tensor(piece.inputs["pad"], np.asarray(pad, np.int32))
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

    def _run(self, tokens, pos, pad):
        """Every program in turn: the logits [B, V] and each layer's new keys and values [B, H, T, D]."""
        x, keys, values = tokens, [], []
        for piece in self._pieces:
            x, new_keys, new_values = piece.run(x, pos, pad)
            keys.extend(new_keys)
            values.extend(new_values)
        return x, keys, values

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
        self._fill(([0] * len(self._slots), [0] * len(self._slots)))
        logits, keys, values = self._run(tokens, 0, pad)
        self._resize(batch, 1, capacity)
        for piece in self._pieces:
            piece.it.set_tensor(piece.inputs["pad"], pad)
        self._fill(([0] * len(self._slots), [0] * len(self._slots)))
        cached_keys, cached_values = self._cache_views()
        for i in range(len(self._slots)):
            cached_keys[i][:, :, :t] = keys[i]
            cached_values[i][:, :, :t] = values[i]
        del cached_keys, cached_values
        state = State(batch, capacity)
        self._current = weakref.ref(state)
        return logits, state

    def step(self, token, pos, pad, state):
        """One token per row, token [B] at position `pos`: next-token logits [B, V] and the state."""
        self._take_buffers(state, pad)
        pos = int(pos)
        logits, keys, values = self._run(np.asarray(token, np.int32)[:, None], pos, None)
        for (piece, k, v), new_keys, new_values in zip(self._slots, keys, values):
            piece.view(k)[:, :, 0, pos] = new_keys[:, :, 0]
            piece.view(v)[:, :, 0, pos] = new_values[:, :, 0]
        return logits, state

    def rearrange(self, state, batch, rows, start, capacity):
        """`decode.KVCache.rearrange` on the host: a new state of `rows` of `state`, positions
        start..start+capacity-1 as 0..capacity-1 (those it lacks copy a neighbour's, masked or
        written before they are read)."""
        rows = np.asarray(rows, np.int64)
        positions = np.clip(np.arange(int(start), int(start) + int(capacity)), 0, state.capacity - 1)
        keys, values = self._arrays(state)
        return State(len(rows), int(capacity), ([k[rows][:, :, positions] for k in keys],
                                                [v[rows][:, :, positions] for v in values]))

    def concat(self, first, second, capacity):
        """The rows of two states of `capacity` positions in one, first's rows first."""
        (k1, v1), (k2, v2) = self._arrays(first), self._arrays(second)
        return State(first.batch + second.batch, int(capacity),
                     ([np.concatenate(pair) for pair in zip(k1, k2)], [np.concatenate(pair) for pair in zip(v1, v2)]))

    def cache_bytes_per_position(self):
        """What one row's cache takes per position: keys and values of every layer, float32."""
        return 2 * self.hparams.n_layer * self.hparams.n_embd * 4

    def traces(self):
        return {}


def export_tflite(model_dir, out_dir, dtype="float32"):
    """Writes `model_dir`'s converted program as `out_dir/gpt2-<dtype>.tflite` (or, when it does
    not fit one flatbuffer, `gpt2-<dtype>-1of<n>.tflite`... to run in turn), with hparams.json,
    encoder.json and vocab.bpe beside it, for LiteRT users; returns the programs' paths."""
    import encoder

    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)} for tflite, got {dtype!r}")
    models_dir, name = os.path.split(os.path.normpath(model_dir))
    lm = model.load_model(name, models_dir or ".")
    pieces = split(lm.hparams, dtype)
    targets = [os.path.join(out_dir, f) for f in program_names(f"gpt2-{dtype}", len(pieces))]
    for layers, target in zip(pieces, targets):
        write_program(convert(lm, int8=dtype == "int8", layers=layers), target)
    has_vocab = any(map(os.path.exists, encoder.vocab_files(model_dir))) or os.path.exists(
        os.path.join(model_dir, encoder.TOKENIZER_FILE))
    texts = encoder.vocab_texts(model_dir if has_vocab else encoder.default_vocab_dir())
    # Released or Hugging Face directory alike, the export holds the released hparams and vocabulary.
    files = dict(zip(encoder.VOCAB_FILES, texts), **{"hparams.json": checkpoint.load_hparams(model_dir).to_json()})
    for name, text in files.items():
        write_program(text.encode("utf-8"), os.path.join(out_dir, name))
    return targets
