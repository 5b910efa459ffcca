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


# The prompt's pass runs in chunks of this many tokens (the last one padded at its end), so both
# programs have static time steps: no shapes are computed at run time, which made each new
# shape's first run cost up to seconds.
CHUNK = 32
# Each program holds two signatures over the same weights, one token a row and a chunk; the
# interpreter's primary subgraph, whose buffers the engine writes in place, is the first by name.
SIGNATURES = {"decode": 1, "prefill": CHUNK}


def step_signature(hparams, layers=None, t=1):
    """Input specs of a converted program holding `layers` (a range, all by default) for `t` new
    tokens a row: tokens [B, t] and their positions [B, t] for the first program, or the hidden
    state [B, t, d] before its first layer for a later one; the attention bias [B, 1, t, C + t]
    (0 to attend, -1e10 not, over the C cached positions then the new ones); the last
    program's `last`, which new token's logits to return; each layer's keys [B, H, C, D] and
    values stored transposed [B, H, D, C]."""
    h, d = hparams.n_head, hparams.head_dim
    layers = range(hparams.n_layer) if layers is None else layers
    inputs = ([tf.TensorSpec([None, t], tf.int32, name="tokens"), tf.TensorSpec([None, t], tf.int32, name="positions")]
              if layers.start == 0 else [tf.TensorSpec([None, t, hparams.n_embd], tf.float32, name="hidden")])
    inputs.append(tf.TensorSpec([None, 1, t, None], tf.float32, name="bias"))
    if layers.stop == hparams.n_layer:
        inputs.append(tf.TensorSpec([], tf.int32, name="last"))
    return (inputs + [tf.TensorSpec([None, h, None, d], tf.float32, name=f"keys_{i}") for i in layers]
            + [tf.TensorSpec([None, h, d, None], tf.float32, name=f"values_{i}") for i in layers])


def step_program(lm, layers=None, t=1):
    """The function the converter takes (inputs as `step_signature` says) -> (the logits [B, V]
    of new token `last` after the last layer, or the hidden state [B, t, d]; new keys
    [L, B, H, t, D]; new values [L, B, H, t, D])."""
    hp = lm.hparams
    layers = range(hp.n_layer) if layers is None else layers
    n_inputs = (2 if layers.start == 0 else 1) + 1 + (layers.stop == hp.n_layer)

    def run(*args):
        inputs, cache = args[:n_inputs], args[n_inputs:]
        keys, values = cache[:len(layers)], cache[len(layers):]
        w = lm.layers  # variables: a program reads, and so holds, only what it uses
        x = model.embed(w, inputs[0], inputs[1]) if layers.start == 0 else inputs[0]
        bias = inputs[2 if layers.start == 0 else 1]
        x = tf.reshape(x, [-1, hp.n_embd])  # rows, so each dense layer is one 2-D product
        scale = tf.math.rsqrt(tf.constant(hp.head_dim, tf.float32))
        new_keys, new_values = [], []
        for i, p in enumerate(lm.read_block(w.blocks[j]) for j in layers):
            qkv = tf.reshape(attention_input(x, p), [-1, t, 3, hp.n_head, hp.head_dim])
            q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))  # [B, H, t, D] each
            # Keys before the new tokens come from the cache, the rest are their own.
            scores = tf.concat([tf.matmul(q, keys[i], transpose_b=True), tf.matmul(q, k, transpose_b=True)], -1)
            old, new = tf.split(model.softmax(scores * scale + bias), [-1, t], axis=-1)  # the reference's mask
            a = tf.matmul(old, values[i], transpose_b=True) + tf.matmul(new, v)  # [B, H, t, D]
            x = block_output(x, tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [-1, hp.n_embd]), p)
            new_keys.append(k)
            new_values.append(v)
        x = tf.reshape(x, [-1, t, hp.n_embd])
        if layers.stop < hp.n_layer:
            return x, tf.stack(new_keys), tf.stack(new_values)
        last = tf.gather(x, inputs[-1], axis=1)
        return model.logits(norm(last, w.ln_f), w.wte), tf.stack(new_keys), tf.stack(new_values)

    return run


def attention_bias(pad, pos, t, capacity):
    """The bias [B, 1, t, capacity + t] for `t` new tokens at positions pos.. after a cache of
    `capacity` slots, rows left-padded by `pad` [B]: a new token attends to the cached positions
    pad..pos-1 and to itself and the new tokens before it, past the padding."""
    cached = np.arange(capacity)[None, None, :]
    query, key = pos + np.arange(t)[None, :, None], pos + np.arange(t)[None, None, :]
    pad = np.asarray(pad)[:, None, None]
    keep = np.concatenate([np.broadcast_to((cached < pos) & (cached >= pad), (len(pad), t, capacity)),
                           (key <= query) & (key >= pad)], axis=-1)
    return np.where(keep, np.float32(0), np.float32(-1e10))[:, None]


def token_positions(pad, pos, t):
    """Each new token's position embedding index [B, t]: counted from the end of its padding."""
    return np.maximum(pos + np.arange(t)[None, :] - np.asarray(pad)[:, None], 0).astype(np.int32)


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


def cached_program(model_dir, dtype, load_lm, progress=True):
    """The paths of `model_dir`'s conversion to `dtype` (one program, or several when it does not
    fit one flatbuffer), converting it first if there is none for the current weights
    (`load_lm()` gives the float32 `model.GPT2`); stale ones are removed."""
    from tqdm import tqdm

    folder = os.path.join(model_dir, CACHE_DIR)
    pieces = split(checkpoint.load_hparams(model_dir), dtype)
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
    """The converted program of `layers` (all by default), its `SIGNATURES` sharing the weights,
    as flatbuffer bytes; int8 quantizes the weights (dynamic range)."""
    functions = []
    for name, t in SIGNATURES.items():
        run = step_program(lm, layers, t)
        run.__name__ = name  # the signature's key
        functions.append(tf.function(run, autograph=False, input_signature=step_signature(lm.hparams, layers, t))
                         .get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions(functions, lm)
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
    """One program of the model: its interpreter and the step signature's inputs and outputs (in
    the primary subgraph, whose buffers are written in place); `chunk` runs the prefill one."""

    def __init__(self, program, num_threads):
        from ai_edge_litert.interpreter import Interpreter

        source = dict(model_content=program) if isinstance(program, bytes) else dict(model_path=program)
        with quiet_stderr():  # the interpreter logs an INFO line as it applies its delegate
            self.it = Interpreter(**source, num_threads=num_threads)
            self.it.allocate_tensors()
        if not isinstance(program, bytes):
            release_mapped_pages(program)
        if sorted(self.it.get_signature_list()) != sorted(SIGNATURES):
            raise UserError("this LiteRT program is of an older version: delete the model's litert folder to "
                            "convert it again")
        step = self.it.get_signature_runner("decode")
        self.inputs = {name: d["index"] for name, d in step.get_input_details().items()}
        if not all(d["name"].startswith("decode_") for d in self.it.get_input_details()):
            raise UserError("this LiteRT program's primary signature is not decode: convert it again")
        outs = {name: d["index"] for name, d in step.get_output_details().items()}
        self.outputs = [outs[f"output_{i}"] for i in range(3)]  # logits or hidden, new keys, new values
        self.first, self.last = "tokens" in self.inputs, "last" in self.inputs
        self.layers = sorted(int(name[len("keys_"):]) for name in self.inputs if name.startswith("keys_"))

    def view(self, name):
        """A numpy view of a step input's buffer; the interpreter refuses to run while one is held."""
        return self.it.tensor(self.inputs[name])()

    def feeds(self, x, positions, bias, last):
        """The inputs besides the cache, by name, for this program's place in the model."""
        feeds = dict(tokens=x, positions=positions) if self.first else dict(hidden=x)
        feeds["bias"] = bias
        if self.last:
            feeds["last"] = np.int32(last)
        return feeds

    def chunk(self, **inputs):
        """Runs the chunk signature on inputs by name; its outputs by name, copied."""
        # A runner holds the interpreter, which then refuses to resize: it lives for this call only.
        outputs = self.it.get_signature_runner("prefill")(**inputs)
        return {name: value.copy() for name, value in outputs.items()}

    def step(self, x, positions, bias):
        it = self.it
        for name, value in self.feeds(x, positions, bias, 0).items():
            it.set_tensor(self.inputs[name], value)
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

    def _resize(self, batch, capacity):
        """Shapes the step signature's inputs for `batch` rows and `capacity` cached positions."""
        if self._shape == (batch, capacity):
            return
        h, d, e = self.hparams.n_head, self.hparams.head_dim, self.hparams.n_embd
        for piece in self._pieces:
            shapes = dict(tokens=[batch, 1], positions=[batch, 1], hidden=[batch, 1, e], bias=[batch, 1, 1, capacity + 1])
            shapes.update({f"keys_{i}": [batch, h, capacity, d] for i in piece.layers})
            shapes.update({f"values_{i}": [batch, h, d, capacity] for i in piece.layers})
            for name, index in piece.inputs.items():
                if name in shapes:
                    piece.it.resize_tensor_input(index, shapes[name])
            piece.it.allocate_tensors()
        self._shape = (batch, capacity)

    def _cache_views(self):
        """Views of the buffers: each layer's keys [B, H, C, D] and values [B, H, D, C]."""
        return [piece.view(k) for piece, k, _ in self._slots], [piece.view(v) for piece, _, v in self._slots]

    def _set_aside(self):
        """Copies the state in the buffers out of them, if anything still holds it."""
        current = self._current()
        if current is not None and current.saved is None:
            current.saved = tuple([view.copy() for view in views] for views in self._cache_views())
        self._current = lambda: None

    def _take_buffers(self, state):
        """Puts `state` in the buffers, if it is not there already."""
        if self._current() is state:
            return
        self._set_aside()
        self._resize(state.batch, state.capacity)
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
        # Chunk after chunk, the last padded at its end: what the padding writes past the prompt
        # is never read, and its positions stay inside the window.
        room = -(-t // CHUNK) * CHUNK
        tokens = np.pad(tokens, [(0, 0), (0, room - t)])
        h, d = self.hparams.n_head, self.hparams.head_dim
        keys = [np.zeros([batch, h, room, d], np.float32) for _ in self._slots]
        values = [np.zeros([batch, h, d, room], np.float32) for _ in self._slots]
        for start in range(0, room, CHUNK):
            x = tokens[:, start:start + CHUNK]
            positions = np.minimum(token_positions(pad, start, CHUNK), self.hparams.n_ctx - 1)
            bias = attention_bias(pad, start, CHUNK, room)
            layer = 0
            for piece in self._pieces:
                cache = {f"keys_{i}": keys[i] for i in piece.layers}
                cache.update({f"values_{i}": values[i] for i in piece.layers})
                out = piece.chunk(**piece.feeds(x, positions, bias, min(t - 1 - start, CHUNK - 1)), **cache)
                x = out["output_0"]
                for new_keys, new_values in zip(out["output_1"], out["output_2"]):
                    keys[layer][:, :, start:start + CHUNK] = new_keys
                    values[layer][..., start:start + CHUNK] = np.swapaxes(new_values, -1, -2)
                    layer += 1
        prompt = State(batch, t, ([k[:, :, :t] for k in keys], [v[..., :t] for v in values]))
        state = self.rearrange(prompt, batch, np.arange(batch), 0, capacity)
        self._take_buffers(state)
        return x, state

    def step(self, token, pos, pad, state):
        """One token per row, token [B] at position `pos`: next-token logits [B, V] and the state."""
        self._take_buffers(state)
        pos, pad = int(pos), np.asarray(pad, np.int32)
        x = np.asarray(token, np.int32)[:, None]
        positions, bias = token_positions(pad, pos, 1), attention_bias(pad, pos, 1, state.capacity)
        layer = 0
        for piece in self._pieces:
            x, new_keys, new_values = piece.step(x, positions, bias)
            for k, v in zip(new_keys, new_values):
                slot, keys, values = self._slots[layer]
                slot.view(keys)[:, :, pos] = k[:, :, 0]
                slot.view(values)[:, :, :, pos] = v[:, :, 0]
                layer += 1
        return x, state

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
