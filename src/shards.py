"""Token shards: a directory of `.npy` token files that training reads memory-mapped.

The layout, which this module alone reads and writes:

    <dir>/shards.json        {"format": FORMAT, "version": 1, "n_vocab": ..., "dtype": ..., "tokens": ...,
                              "shards": ["shard-00000.npy", ...], "chunks": "chunks.npy"}
    <dir>/shard-00000.npy    1-D tokens (uint16 when the vocabulary fits, else int32), chunk after chunk
    <dir>/chunks.npy         int64 [chunks, 3]: (shard, first token, length) of each chunk, in order

A chunk lies inside one shard, so each is a plain slice of a memory-mapped file; the table gives
the chunks' order, which need not be the order of their bytes.
"""
import json
import os
import shutil

import numpy as np

from errors import UserError

INDEX = "shards.json"
CHUNKS = "chunks.npy"
FORMAT = "gpt-2 token shards"
VERSION = 1
# Shards close at the first chunk end past this many tokens (256 MB of uint16), so files stay a
# size that copies and memory-maps easily.
SHARD_TOKENS = 1 << 27
# An .npy header for a 1-D shape of up to 15 digits takes 128 bytes, so the real length can be
# written over the placeholder once the shard is complete.
HEADER_BYTES = 128


def is_shard_dir(path):
    """Whether `path` is a directory written by `ShardWriter`."""
    return os.path.isfile(os.path.join(path, INDEX))


def token_dtype(n_vocab):
    """uint16 when every id fits (GPT-2's 50257 do), halving disk and page cache; else int32."""
    return np.dtype("<u2") if n_vocab <= 1 << 16 else np.dtype("<i4")


def _write_header(f, dtype, length):
    f.seek(0)
    np.lib.format.write_array_header_1_0(f, {"descr": dtype.str, "fortran_order": False, "shape": (length,)})
    assert f.tell() == HEADER_BYTES, f.tell()


class ShardWriter:
    """Writes token chunks into the directory `path`, streaming: only the table of chunks stays in memory.

    Everything goes to `temp_path` (a new directory) until `finish` renames it to `path`, so
    `path` is never half-written; `abort` removes it.

    A chunk is either streamed (`add` its tokens piece by piece, then `end_chunk`) or given
    whole (`add_chunk`). Chunks are listed in the order they are complete, so a whole chunk
    given while one streams comes before it (its tokens are written after it ends).

    Args:
        path: The directory to create (an older shard directory there is replaced).
        temp_path: Where to write until `finish`; must not exist.
        n_vocab: Size of the vocabulary, which picks the token dtype.
        shard_tokens: A shard closes at the first chunk end past this many tokens.
    """

    def __init__(self, path, temp_path, n_vocab, shard_tokens=SHARD_TOKENS):
        self.path, self.temp_path, self.n_vocab = path, temp_path, n_vocab
        self.dtype = token_dtype(n_vocab)
        self.shard_tokens = shard_tokens
        self.tokens = 0
        self._table = []  # [shard, start, length] per chunk, in order
        self._shards = []
        self._file = None
        self._written = 0  # tokens in the open shard
        self._streaming = None  # the table row of the chunk being streamed
        self._deferred = []  # (table row, tokens) of whole chunks given while one streams
        os.makedirs(temp_path)

    def _open_shard(self):
        name = f"shard-{len(self._shards):05d}.npy"
        self._shards.append(name)
        self._file = open(os.path.join(self.temp_path, name), "wb")
        _write_header(self._file, self.dtype, 0)
        self._written = 0

    def _close_shard(self):
        _write_header(self._file, self.dtype, self._written)
        self._file.close()
        self._file = None

    def _append(self, tokens):
        self._file.write(np.asarray(tokens).astype(self.dtype, copy=False).tobytes())
        self._written += len(tokens)
        self.tokens += len(tokens)

    def _start_row(self):
        if self._file is None:
            self._open_shard()
        return [len(self._shards) - 1, self._written, 0]

    def _end_row(self, row):
        row[2] = self._written - row[1]
        if self._written >= self.shard_tokens:
            self._close_shard()

    def add(self, tokens):
        """Appends `tokens` (ids) to the chunk being streamed, starting one if none is."""
        if self._streaming is None:
            self._streaming = self._start_row()
        self._append(tokens)

    def add_file(self, path, first, count):
        """Appends `count` ids stored raw in this writer's dtype in the file `path`, from its id
        `first` on, to the chunk being streamed (starting one if none is); the kernel copies them."""
        if self._streaming is None:
            self._streaming = self._start_row()
        self._file.flush()
        size = self.dtype.itemsize
        with open(path, "rb") as source:
            _copy_bytes(source, self._file, first * size, count * size)
        self._file.seek(0, os.SEEK_END)  # the copy moved the descriptor's offset, not the buffer's idea of it
        self._written += count
        self.tokens += count

    def end_chunk(self):
        """Ends the streamed chunk (if one was started), then writes the whole chunks given meanwhile."""
        if self._streaming is not None:
            # Listed at its end, as load_dataset lists a text chunk once it fills.
            self._table.append(self._streaming)
            self._end_row(self._streaming)
            self._streaming = None
        deferred, self._deferred = self._deferred, []
        for placeholder, tokens in deferred:
            row = self._start_row()
            self._append(tokens)
            self._end_row(row)
            placeholder[:] = row

    def add_chunk(self, tokens):
        """A whole chunk. While one streams, it is ordered here and written after that one ends."""
        if self._streaming is None:
            row = self._start_row()
            self._table.append(row)
            self._append(tokens)
            self._end_row(row)
        else:
            placeholder = [-1, 0, 0]
            self._table.append(placeholder)
            self._deferred.append((placeholder, tokens))

    @property
    def chunk_count(self):
        return len(self._table)

    @property
    def shard_count(self):
        return len(self._shards)

    def finish(self):
        """Writes the index and renames the directory to `path`. Returns the number of chunks."""
        self.end_chunk()
        if self._file is not None:
            self._close_shard()
        np.save(os.path.join(self.temp_path, CHUNKS), np.array(self._table, np.int64).reshape(-1, 3))
        index = {"format": FORMAT, "version": VERSION, "n_vocab": self.n_vocab, "dtype": self.dtype.str,
                 "tokens": self.tokens, "shards": self._shards, "chunks": CHUNKS}
        with open(os.path.join(self.temp_path, INDEX), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        replace_dir(self.temp_path, self.path)
        return len(self._table)

    def abort(self):
        """Removes what was written, unless `finish` renamed it; `path` stays as it was."""
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.temp_path, ignore_errors=True)


def _copy_bytes(source, target, offset, length):
    """Copies `length` bytes of the file `source` from `offset` to the end of the file `target`,
    inside the kernel (copy_file_range) where it can, else through a buffer."""
    try:
        while length:
            copied = os.copy_file_range(source.fileno(), target.fileno(), length, offset)
            if not copied:
                raise OSError(f"{source.name} ended early")
            offset += copied
            length -= copied
        return
    except (AttributeError, OSError):
        pass  # no copy_file_range here (or not between these files): copy what is left by hand
    target.seek(0, os.SEEK_END)
    source.seek(offset)
    while length:
        block = source.read(min(length, 1 << 22))
        if not block:
            raise OSError(f"{source.name} ended early")
        target.write(block)
        length -= len(block)


def replace_dir(new, path):
    """Renames the directory `new` to `path`; an older directory at `path` is moved aside first
    and removed after, so `path` is always either the old or the new one."""
    if not os.path.exists(path):
        os.replace(new, path)
        return
    old = f"{new}.old"
    os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def read_shards(path, n_vocab):
    """The chunks of a shard directory, in order, as read-only slices of memory-mapped files.

    Args:
        path: A directory written by `ShardWriter`.
        n_vocab: The model's vocabulary size; the shards must have been encoded within it.

    Returns:
        A list of 1-D integer arrays (uint16 or int32) backed by the files, not by memory.

    Raises:
        UserError: The directory is not a complete shard directory, or its vocabulary is larger.
    """
    def reject(why):
        return UserError(f"{path} is not a token shard directory written by encode.py ({why}): "
                         f"encode the text again with encode.py")

    try:
        with open(os.path.join(path, INDEX), encoding="utf-8") as f:
            index = json.load(f)
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
            raise reject(f"{INDEX} is not version {VERSION} of the format")
        if index["n_vocab"] > n_vocab:
            raise UserError(f"{path} was encoded with a vocabulary of {index['n_vocab']} tokens, larger than the "
                            f"model's {n_vocab}: encode it with this model's vocabulary (--model_name)")
        shards = [np.asarray(np.load(os.path.join(path, name), mmap_mode="r")) for name in index["shards"]]
        table = np.load(os.path.join(path, index["chunks"]), allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise reject(f"cannot read it: {e}".replace("\n", " ")) from None
    if any(s.ndim != 1 or s.dtype != np.dtype(index["dtype"]) for s in shards):
        raise reject(f"a shard is not a 1-D {index['dtype']} array")
    if table.ndim != 2 or table.shape[1] != 3 or table.dtype != np.int64:
        raise reject(f"{CHUNKS} is not an int64 table of (shard, start, length)")
    lengths = np.array([len(s) for s in shards], np.int64)
    shard, start, length = table.T
    if len(table) and (shard.min() < 0 or shard.max() >= len(shards) or start.min() < 0 or length.min() < 0
                       or np.any(start + length > lengths[shard])):
        raise reject(f"{CHUNKS} points outside the shards")
    return [shards[s][a:a + n] for s, a, n in table.tolist()]
