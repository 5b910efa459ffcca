"""A decode engine on LiteRT (TensorFlow Lite): runs the programs `litert_convert` writes.

The model's one program takes query rows, each a token at a position: one prompt's tokens, or
one new token per stream. Each row attends to the cache through one bias and to the rows of its
call through another, both given here, and the program returns the logits of the rows asked for
and the rows' keys and values. The cache is the program's inputs, written in place between calls
through the interpreter's views of its input buffers, so no step copies it.

Running needs no TensorFlow, so `preload` can pack a cached program's weights before it loads:
packing holds the packed copy beside the mapped file, and that peak then stays below
TensorFlow's share instead of on top of it.
"""
import contextlib
import glob
import hashlib
import json
import os
import sys
import weakref

import numpy as np

import hparams as hparams_lib
import model_files
from errors import UserError


# Bumped whenever the converted program changes, so older conversions count as stale.
PROGRAM_VERSION = 6
DTYPES = ("float32", "int8")
# The attention bias of a key a row must not see: the reference's masked score.
MASKED = -1e10
# Distinct prompts share a call (each attending to its own) up to this many tokens; a longer one runs alone.
PACKED_ROWS = 512
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

    files = model_files.weight_sources(model_dir)
    stats = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    parts = [PROGRAM_VERSION, dtype, converter_version(), metadata.version("ai-edge-litert"), stats]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def converter_version():
    """TensorFlow's version, from its package's record when it has one, so TensorFlow need not load."""
    from importlib import metadata

    for name in ("tensorflow", "tensorflow-cpu", "tf-nightly", "tf-nightly-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    import tensorflow  # installed under a name not listed above

    return tensorflow.__version__


def cached_paths(model_dir, hparams, dtype):
    """The paths a conversion of `model_dir` to `dtype` for its current weights is cached at."""
    names = program_names(f"{dtype}-{cache_key(model_dir, dtype)}", len(split(hparams, dtype)))
    return [os.path.join(model_dir, CACHE_DIR, name) for name in names]


def program_names(stem, pieces):
    """File names of a conversion in `pieces` programs: stem.tflite, or stem-1of3.tflite..."""
    if pieces == 1:
        return [f"{stem}.tflite"]
    return [f"{stem}-{k}of{pieces}.tflite" for k in range(1, pieces + 1)]


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


class MappedPages:
    """The read-only pages of a program file that one interpreter mapped. Once it has packed the
    weights for its kernels, it reads the file only for what they did not pack (the embedding
    rows a step looks up), yet each page it touches stays resident: `release` drops them from
    this process's memory, and the kernel reads any page touched again back from the file, so
    nothing changes but the memory held (Linux only; elsewhere it does nothing).

    Only the mappings `opened_by` saw appear count: another interpreter's mapping of the same
    file may be unmapped, and its addresses reused, while this one lives."""

    def __init__(self, ranges):
        import ctypes

        self.ranges = sorted(ranges)
        try:
            self._madvise = ctypes.CDLL(None, use_errno=True).madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            self.ranges = []

    @classmethod
    def opened_by(cls, path, open_mapping):
        """Runs `open_mapping()`: its result, and the `MappedPages` of the mappings of `path` it made."""
        path = os.path.realpath(path)
        before = cls._ranges(path)
        opened = open_mapping()
        return opened, cls(cls._ranges(path) - before)

    @staticmethod
    def _ranges(path):
        try:
            with open("/proc/self/maps") as f:
                maps = f.read().splitlines()
        except OSError:
            return set()
        found = set()
        for line in maps:
            fields = line.split(maxsplit=5)  # address, perms, offset, dev, inode, path
            if len(fields) == 6 and fields[5] == path and "w" not in fields[1]:  # never a page it wrote
                start, end = (int(a, 16) for a in fields[0].split("-"))
                found.add((start, end - start))
        return found

    def release(self):
        for start, length in self.ranges:
            self._madvise(start, length, MADV_DONTNEED)


MADV_DONTNEED = 4


class Piece:
    """One program of the model: its interpreter and the indices of its inputs and outputs."""

    def __init__(self, program, num_threads):
        from ai_edge_litert.interpreter import Interpreter

        def open_interpreter():
            source = dict(model_content=program) if isinstance(program, bytes) else dict(model_path=program)
            with quiet_stderr():  # the interpreter logs an INFO line as it applies its delegate
                it = Interpreter(**source, num_threads=num_threads)
                it.allocate_tensors()
            return it

        if isinstance(program, bytes):
            self.it, self.pages = open_interpreter(), None
        else:
            self.it, self.pages = MappedPages.opened_by(program, open_interpreter)
        self.release_pages()
        runner = self.it.get_signature_runner()
        self.inputs = {name: d["index"] for name, d in runner.get_input_details().items()}
        outs = {name: d["index"] for name, d in runner.get_output_details().items()}
        self.outputs = [outs[f"output_{i}"] for i in range(3)]  # logits or hidden, new keys, new values
        self.first = "tokens" in self.inputs
        self.layers = sorted(int(name[len("keys_"):]) for name in self.inputs if name.startswith("keys_"))

    def release_pages(self):
        if self.pages is not None:
            self.pages.release()

    def view(self, name):
        """A numpy view of an input buffer; the interpreter refuses to run while one is held."""
        return self.it.tensor(self.inputs[name])()

    def run(self, x, feeds):
        """Runs on `x` (tokens, or the hidden state) and whichever of `feeds` (positions,
        cache_bias, own_bias, out_rows) this program takes."""
        it = self.it
        it.set_tensor(self.inputs["tokens" if self.first else "hidden"], x)
        for name, value in feeds.items():
            if name in self.inputs:
                it.set_tensor(self.inputs[name], value)
        it.invoke()
        self.release_pages()  # the embedding rows just read: some microseconds, where they would add up to MiBs
        return [it.get_tensor(i) for i in self.outputs]


# Interpreters `preload` built, by program path, for the next `Engine` of that program.
_PRELOADED = {}


def preload(model_name, models_dir, dtype, engine):
    """Builds the interpreters of a model's cached conversion before TensorFlow loads, when the
    engine will be LiteRT's as far as can be told without TensorFlow (no GPU device file for
    'auto'); the next `Engine` of those programs takes them. Anything amiss is left for
    `api.load` to report, and a script that ends up on TensorFlow calls `discard_preloaded`."""
    if ("tensorflow" in sys.modules or engine not in ("litert", "auto") or dtype not in ("float32", "fp32", "int8")
            or not installed()):  # the cache's key needs LiteRT's version; api.load says how to install it
        return
    dtype = "float32" if dtype == "fp32" else dtype
    if engine == "auto" and dtype == "float32" and gpu_device_files():
        return
    try:
        path = hparams_lib.model_dir(model_name, models_dir)
        hparams = model_files.load_hparams(path)
        if engine == "auto" and not fits(hparams, dtype):
            return
        programs = cached_paths(path, hparams, dtype)
    except (UserError, OSError, ValueError):
        return
    if all(map(os.path.exists, programs)):
        threads = len(os.sched_getaffinity(0))
        _PRELOADED.update((program, Piece(program, threads)) for program in programs)


def discard_preloaded():
    """Frees the interpreters `preload` built that no `Engine` took."""
    _PRELOADED.clear()


def gpu_device_files():
    """The device files of NVIDIA GPUs (or WSL's GPU bridge): where TensorFlow may find a GPU."""
    return glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/dxg")


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
        self._pieces = [(_PRELOADED.pop(program, None) if isinstance(program, str) and not num_threads else None)
                        or Piece(program, threads) for program in programs]
        # Each layer's cache buffers, as (piece, keys name, values name).
        self._slots = [(piece, f"keys_{i}", f"values_{i}") for piece in self._pieces for i in piece.layers]
        if [int(k[len("keys_"):]) for _, k, _ in self._slots] != list(range(hparams.n_layer)):
            raise UserError(f"the LiteRT programs do not hold the model's {hparams.n_layer} layers in order: "
                            "convert it again (delete its litert folder)")
        self._shape = None
        self._current = lambda: None  # a weak reference to the state in the buffers

    def _resize(self, rows, capacity, cache_rows, out_rows):
        """Shapes the inputs for `rows` query rows over a cache of `capacity` slots that has
        `cache_rows` rows (one per query row, or one they share), returning `out_rows` logits."""
        shape = (rows, capacity, cache_rows, out_rows)
        if self._shape == shape:
            return
        h, d, e = self.hparams.n_head, self.hparams.head_dim, self.hparams.n_embd
        for piece in self._pieces:
            sizes = {"tokens": [rows], "positions": [rows], "hidden": [rows, e], "cache_bias": [rows, 1, 1, capacity],
                     "own_bias": [rows, rows], "out_rows": [out_rows]}
            sizes.update({f"{kind}_{i}": [cache_rows, h, d, capacity] for i in piece.layers for kind in ("keys", "values")})
            for name, index in piece.inputs.items():
                piece.it.resize_tensor_input(index, sizes[name])
            piece.it.allocate_tensors()
        self._shape = shape

    def _cache_views(self):
        """Views of the buffers (held slots last, [B, H, D, C]): each layer's keys and values [B, H, C, D]."""
        return ([piece.view(k).transpose(0, 1, 3, 2) for piece, k, _ in self._slots],
                [piece.view(v).transpose(0, 1, 3, 2) for piece, _, v in self._slots])

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
        self._resize(state.batch, state.capacity, state.batch, state.batch)
        self._fill(state.saved)
        state.saved = None
        self._current = weakref.ref(state)

    def _fill(self, saved):
        # The views die on return: the interpreter refuses to run while one is held.
        for views, arrays in zip(self._cache_views(), saved):
            for view, array in zip(views, arrays):
                view[...] = array

    def _clear_cache(self):
        """Zeros the cache buffers: a masked slot still enters the sum, and 0 times garbage may be NaN."""
        self._fill(([0] * len(self._slots), [0] * len(self._slots)))

    def _arrays(self, state):
        """A state's keys and values per layer, wherever they are (the buffers' are views)."""
        return state.saved if state.saved is not None else self._cache_views()

    def _run(self, tokens, feeds):
        """Every program in turn: the logits [M, V] and each layer's new keys and values [N, H, D]."""
        x, keys, values = tokens, [], []
        for piece in self._pieces:
            x, new_keys, new_values = piece.run(x, feeds)
            keys.extend(new_keys)
            values.extend(new_values)
        return x, keys, values

    def _prompts(self, prompts):
        """Prompts' tokens (lists of [T]) from position 0 in one call, each attending only to its
        own: per prompt, the logits [V] after its last token and each layer's keys and values
        [H, T, D]."""
        lengths = [len(p) for p in prompts]
        rows = sum(lengths)
        owner = np.repeat(np.arange(len(prompts)), lengths)
        positions = np.concatenate([np.arange(n, dtype=np.int32) for n in lengths])
        own = (owner[:, None] == owner[None, :]) & (positions[None, :] <= positions[:, None])  # causal, per prompt
        ends = np.cumsum(lengths)
        self._resize(rows, 1, 1, len(prompts))  # a one-slot cache, masked out
        self._clear_cache()
        logits, keys, values = self._run(np.concatenate(prompts), dict(
            positions=positions, cache_bias=np.full([rows, 1, 1, 1], MASKED, np.float32),
            own_bias=np.where(own, 0, MASKED).astype(np.float32), out_rows=(ends - 1).astype(np.int32)))
        return [(logits[i], [k[end - n:end].transpose(1, 0, 2) for k in keys],
                 [v[end - n:end].transpose(1, 0, 2) for v in values]) for i, (n, end) in enumerate(zip(lengths, ends))]

    def prefill(self, tokens, pad, capacity):
        """Runs prompts tokens [B, T], left-padded by `pad` [B], into a new cache of `capacity`
        positions (at most n_ctx); the last position's logits [B, V] and the state. Each distinct
        prompt runs once, on its own tokens, so padding is never computed; short ones share calls."""
        tokens, pad = np.asarray(tokens, np.int32), np.asarray(pad, np.int32)
        batch, t = tokens.shape
        capacity = int(capacity)
        if np.any(pad >= t):
            raise UserError("every prompt needs at least one token")
        self._set_aside()
        prompts = [tokens[row, pad[row]:] for row in range(batch)]
        distinct = {prompt.tobytes(): prompt for prompt in prompts}
        groups = [[]]
        for prompt in distinct.values():
            if groups[-1] and sum(map(len, groups[-1])) + len(prompt) > PACKED_ROWS:
                groups.append([])
            groups[-1].append(prompt)
        # Resizing reallocates the inputs, so the prompts' keys and values are kept aside meanwhile.
        done = {}
        for group in groups:
            done.update(zip((prompt.tobytes() for prompt in group), self._prompts(group)))
        self._resize(batch, capacity, batch, batch)
        self._clear_cache()
        cached_keys, cached_values = self._cache_views()
        logits = []
        for row, prompt in enumerate(prompts):
            row_logits, keys, values = done[prompt.tobytes()]
            for i in range(len(self._slots)):
                cached_keys[i][row, :, pad[row]:t] = keys[i]
                cached_values[i][row, :, pad[row]:t] = values[i]
            logits.append(row_logits)
        del cached_keys, cached_values
        state = State(batch, capacity)
        self._current = weakref.ref(state)
        return np.stack(logits), state

    def step(self, token, pos, pad, state):
        """One token per row, token [B] at position `pos`: next-token logits [B, V] and the state."""
        self._take_buffers(state)
        pos, pad = int(pos), np.asarray(pad, np.int32)
        batch = state.batch
        slots = np.arange(state.capacity)
        seen = (slots[None, :] >= pad[:, None]) & (slots[None, :] < pos)  # [B, C]: each row's cached tokens
        logits, keys, values = self._run(np.asarray(token, np.int32), dict(
            positions=np.maximum(pos - pad, 0).astype(np.int32),
            cache_bias=np.where(seen, 0, MASKED).astype(np.float32)[:, None, None, :],
            own_bias=np.where(np.eye(batch, dtype=bool), 0, MASKED).astype(np.float32),
            out_rows=np.arange(batch, dtype=np.int32)))
        for (piece, k, v), new_keys, new_values in zip(self._slots, keys, values):
            piece.view(k)[..., pos] = new_keys
            piece.view(v)[..., pos] = new_values
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
