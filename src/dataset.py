"""Training data: token chunks from text, pre-encoded .npz files or shard directories, and uniform
windows over them.

`load_dataset` reads what nshepperd/gpt-2's fine-tuning fork read (a file, a directory, a glob;
text or encode.py's .npz) with two of its bugs fixed: documents are separated by the real
<|endoftext|> token, not its 13 characters spelled as ordinary tokens, and directories are read
in a fixed order; encode.py's shard directories it memory-maps. `stream_document` gives a text
file's pieces as it reads them, for encode.py. `TokenSampler` draws every window of a length
with equal chance.
"""
import codecs
import glob
import os
import zipfile
import zlib

import numpy as np
import regex
import tqdm

import shards
from errors import UserError

# Long documents are encoded this many characters at a time, so a 1 GB file needs little beyond
# its text and its tokens (4 bytes each), not ~100 bytes of Python objects per token.
PIECE_CHARS = 1 << 20
# Whitespace after a non-space character: the split pattern ends a word there whatever follows
# and never looks behind, so the text on each side splits into the same words as the whole.
SAFE_CUT = regex.compile(r"(?<=\S)(?=\s)")
# Bytes read from a file at a time when streaming it.
READ_BYTES = 1 << 22
EOT_TEXT = "<|endoftext|>"
# What a corrupt or foreign .npz raises while it is opened or read.
NPZ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def dataset_files(path):
    """The files a dataset path names, in sorted order.

    Args:
        path: A file, a directory (walked recursively, skipping hidden files and directories,
            such as .git or .DS_Store) or a glob (`**` reaches into subdirectories; directories
            it matches are walked). `~` is expanded.

    Returns:
        A non-empty list of file paths; a shard directory written by encode.py is one entry,
        not walked.

    Raises:
        UserError: Nothing matches.
    """
    path = os.path.expanduser(str(path))
    if os.path.isfile(path) or shards.is_shard_dir(path):
        return [path]
    matches = [path] if os.path.isdir(path) else glob.glob(path, recursive=True)
    files = sorted(f for m in matches for f in ([m] if os.path.isfile(m) or shards.is_shard_dir(m) else _walk(m)))
    if not files:
        raise UserError(f"no dataset files match '{path}': give a text or .npz file, a directory, "
                        f"or a quoted glob such as 'data/*.txt'")
    return files


def _walk(directory):
    files = []
    for root, dirs, names in os.walk(directory):
        units = {d for d in dirs if not d.startswith(".") and shards.is_shard_dir(os.path.join(root, d))}
        files += [os.path.join(root, d) for d in units]
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in units]
        files += [os.path.join(root, n) for n in names if not n.startswith(".")]
    return files


def encode_document(enc, text, piece_chars=PIECE_CHARS):
    """Tokens of one document, equal to `enc.encode(text)`, as an int32 array; except that a
    literal "<|endoftext|>" in the text (how gpt-2-simple users separate documents within one
    file) becomes the real <|endoftext|> token, not 13 characters of ordinary tokens.

    Args:
        enc: An `encoder.Encoder`.
        text: The document.
        piece_chars: About how many characters to encode at a time (a memory bound).

    Returns:
        An int32 1-D array.
    """
    def tokens():
        for i, part in enumerate(text.split(EOT_TEXT)):
            if i:
                yield enc.eot_token
            for piece in _pieces(part, piece_chars):
                yield from enc.encode(piece)

    return np.fromiter(tokens(), dtype=np.int32)


def _pieces(text, size):
    """`text` in pieces of at least `size` characters (the last may be shorter), cut only at
    SAFE_CUT; a text with no such place stays whole."""
    start = 0
    while len(text) - start > size:
        cut = SAFE_CUT.search(text, start + size)
        if cut is None:
            break
        yield text[start:cut.start()]
        start = cut.start()
    yield text[start:]


def _read_text(name, encoding):
    try:
        with open(name, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read {name}: {e.strerror or e}") from None
    try:
        text = data.decode(encoding)
    except UnicodeError as e:
        raise _not_decodable(name, encoding, e, 0) from None
    return _universal_newlines(text)


def _universal_newlines(text):
    """As the fork's text-mode reads gave: Windows files train like the rest."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _not_decodable(name, encoding, e, offset):
    """The UserError for a UnicodeError `e` at `offset` bytes before the bytes it counts from."""
    detail = f"byte {offset + e.start}: {e.reason}" if isinstance(e, UnicodeDecodeError) else str(e)
    return UserError(f"{name} is not valid {encoding} ({detail}): use encoding latin-1 (or the file's own), "
                     f"or convert it to {encoding}")


def stream_document(name, encoding, piece_chars=PIECE_CHARS, read_bytes=READ_BYTES, start=0, end=None):
    """One text file as it is read, `read_bytes` at a time, in pieces of about `piece_chars`.

    The pieces are what `load_dataset` makes of the file, streamed: newlines normalized, and a
    literal "<|endoftext|>" yielded as None; so encoding each piece and putting `eot_token` for
    each None gives `encode_document(enc, text)`'s tokens. Cuts fall only at SAFE_CUT (or at a
    separator), so a long run with no whitespace is held whole until it ends.

    Args:
        name: The file.
        encoding: Its encoding, a Python codec name.
        piece_chars: About how many characters a piece holds (a memory bound).
        read_bytes: Bytes read at a time.
        start, end: Only the bytes [start, end) of the file (default: all of them), where `start`
            and `end` are offsets given by `cut_offset`: the ranges of consecutive offsets stream
            into the pieces of the whole file's text, cut at those offsets too.

    Yields:
        (piece, bytes): a str (empty ones only report bytes), or None for a separator; and how
        many bytes of the file were read since the last yield.

    Raises:
        UserError: The file cannot be read or is not valid `encoding`.
    """
    decoder = codecs.getincrementaldecoder(encoding)()
    held, carry, offset, unreported = "", "", start, 0
    try:
        f = open(name, "rb")
    except OSError as e:
        raise UserError(f"cannot read {name}: {e.strerror or e}") from None
    with f:
        f.seek(start)
        while True:
            try:
                data = f.read(read_bytes if end is None else min(read_bytes, end - offset))
            except OSError as e:
                raise UserError(f"cannot read {name}: {e.strerror or e}") from None
            final = not data
            pending = len(decoder.getstate()[0])
            try:
                text = carry + decoder.decode(data, final)
            except UnicodeError as e:
                raise _not_decodable(name, encoding, e, offset - pending) from None
            offset += len(data)
            unreported += len(data)
            # A final "\r" may be the first half of a "\r\n": it waits for the next read.
            carry = "\r" if text.endswith("\r") and not final else ""
            text = text[:len(text) - len(carry)]
            *parts, held = (held + _universal_newlines(text)).split(EOT_TEXT)
            for part in parts:
                for piece in _pieces(part, piece_chars):
                    if piece:
                        yield piece, unreported
                        unreported = 0
                yield None, unreported
                unreported = 0
            if final:
                for piece in _pieces(held, piece_chars):
                    yield piece, unreported
                    unreported = 0
                return
            *ready, held = _pieces(held, piece_chars)
            for piece in ready:
                yield piece, unreported
                unreported = 0


def cut_offset(name, offset, window=1 << 16):
    """The first byte offset at or after `offset` of the UTF-8 file `name` where its text may be cut
    (SAFE_CUT), or the file's size (for 0: 0). Consecutive such offsets bound ranges whose texts
    encode to the ids of the whole file's: a word, a "\r\n" or a literal "<|endoftext|>" is never
    cut in two. Anyone looking from the same `offset` finds the same cut."""
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if offset <= 0 or offset >= size:
                return min(max(offset, 0), size)
            # From 4 bytes back, so the character before any candidate is read whole (UTF-8's longest).
            begin = max(0, offset - 4)
            f.seek(begin)
            data = f.read(offset - begin + window)
            while True:
                # Invalid bytes (and a character split by the window's end) read as one non-space
                # character each, and encode back to the same bytes.
                text = data.decode("utf-8", "surrogateescape")
                for cut in SAFE_CUT.finditer(text):
                    position = begin + len(text[:cut.start()].encode("utf-8", "surrogateescape"))
                    if position >= offset:
                        return position
                if begin + len(data) >= size:
                    return size
                data += f.read(len(data))  # doubling: a long run without whitespace costs linear time
    except OSError as e:
        raise UserError(f"cannot read {name}: {e.strerror or e}") from None


def load_npz(name, n_vocab):
    """The non-empty token arrays of an .npz that encode.py wrote, as int32."""
    def reject(why):
        return UserError(f"{name} is not a token file written by encode.py ({why}): "
                         f"encode the text again with encode.py, or give the text itself")

    arrays = []
    try:
        npz = np.load(name, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise reject("it holds a single array, not a set of chunks")
        with npz:
            for key in npz.files:
                a = npz[key]
                if not isinstance(a, np.ndarray):
                    raise reject(f"'{key}' is not a numpy array")
                if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                    raise reject(f"'{key}' is {a.dtype} of shape {a.shape}, not a 1-D array of token ids")
                if a.size and (a.min() < 0 or a.max() >= n_vocab):
                    raise reject(f"'{key}' holds ids outside the vocabulary 0..{n_vocab - 1}")
                if a.size:
                    # The fork's files hold int64; one dtype keeps batches uniform and halves memory.
                    arrays.append(a.astype(np.int32, copy=False))
    except NPZ_ERRORS as e:
        raise reject(f"cannot read it: {e}".replace("\n", " ")) from None
    return arrays


def check_options(combine, encoding):
    if not isinstance(combine, int) or isinstance(combine, bool) or combine < 0:
        raise UserError(f"combine must be a whole number of characters >= 0, got {combine!r}")
    try:
        # Unlike codecs.lookup, decoding also rejects bytes-to-bytes codecs such as base64.
        b"\0\0\0\0".decode(encoding, "ignore")
    except (LookupError, TypeError, UnicodeError):
        raise UserError(f"encoding must be a text codec Python knows, such as utf-8, latin-1 or cp1252; "
                        f"got {encoding!r}") from None


def join_documents(documents, eot_token):
    """One chunk: the documents' tokens with one `eot_token` between each two."""
    separator = np.array([eot_token], np.int32)
    parts = [separator] * (2 * len(documents) - 1)
    parts[::2] = documents
    return np.concatenate(parts)


def load_dataset(enc, path, combine=50000, encoding="utf-8", progress=True):
    """Token chunks from `path`: a file, a directory (walked recursively, sorted), or a glob.

    `.npz` files (as encode.py writes) are loaded as they are, and shard directories (encode.py's
    default) memory-mapped, each chunk a slice of a file; every other file is text in
    `encoding` (newlines normalized to "\\n") and one document. Each document encodes exactly
    as `enc.encode(text)`, once. Documents are joined with the real <|endoftext|> token id
    (`enc.eot_token`, 50256), never its characters, and gathered in order into chunks of at
    least `combine` characters of text (the last chunk may be shorter); empty files add nothing.

    Args:
        enc: An `encoder.Encoder`.
        path: The dataset; see `dataset_files`.
        combine: Characters of text that close a chunk; 0 gives one chunk per document.
        encoding: The text files' encoding, a Python codec name.
        progress: Show a progress bar over files on standard error (when it is a terminal).

    Returns:
        A list of 1-D integer arrays: each .npz file's or shard directory's chunks as it is
        reached (int32, or the shards' own uint16), each text chunk (int32) as it fills.

    Raises:
        UserError: Nothing matches `path`, a file cannot be read or decoded, an .npz is not
            encode.py's, or the dataset holds no tokens at all.
    """
    check_options(combine, encoding)
    files = dataset_files(path)
    chunks, documents, chars = [], [], 0
    # A context manager closes the bar before an error propagates, so the error gets its own line.
    with tqdm.tqdm(files, desc="loading dataset", unit="file", disable=None if progress else True) as bar:
        for name in bar:
            if shards.is_shard_dir(name):
                chunks += shards.read_shards(name, enc.n_vocab)
                continue
            if name.lower().endswith(".npz"):
                chunks += load_npz(name, enc.n_vocab)
                continue
            text = _read_text(name, encoding)
            if not text:
                continue
            documents.append(encode_document(enc, text))
            chars += len(text)
            if chars >= combine:
                chunks.append(join_documents(documents, enc.eot_token))
                documents, chars = [], 0
    if documents:
        chunks.append(join_documents(documents, enc.eot_token))
    if not chunks:
        raise UserError(f"the dataset '{path}' holds no text (its files are empty): give files with text")
    return chunks


class TokenSampler:
    """Random training windows, each a contiguous slice of one chunk.

    Every window of a length that lies inside one chunk is equally likely: a uniform draw over
    the windows themselves, not the fork's rejection sampling over the concatenation (which
    could never draw a window ending at a chunk's last token, and asserted the mean chunk was
    longer than the window). Chunks shorter than the window are never used.

    Args:
        chunks: Token arrays, e.g. from `load_dataset`; memory-mapped ones stay on disk, since
            only the windows drawn are read.
        seed: Seed of the numpy Generator; the same seed gives the same windows.

    Attributes:
        chunks: The chunks, as integer arrays of their own dtype.
        total_tokens: Tokens in all chunks.
    """

    def __init__(self, chunks, seed=None):
        self.chunks = [np.asarray(c) for c in chunks]
        if not all(np.issubdtype(c.dtype, np.integer) for c in self.chunks):
            raise ValueError("chunks must hold integer token ids")
        self.lengths = np.array([len(c) for c in self.chunks], dtype=np.int64)
        self.total_tokens = int(self.lengths.sum())
        self.rng = np.random.default_rng(seed)
        self._windows_before = {}  # window length -> (windows in chunks before each chunk, total)

    def window_length(self, n_ctx):
        """The training window: `min(n_ctx, longest chunk)`.

        Small datasets then train on shorter windows instead of failing.

        Args:
            n_ctx: The model's context length.

        Returns:
            The window length, from 2 to `n_ctx`.

        Raises:
            UserError: No chunk has 2 tokens (one to predict from, one to predict).
        """
        longest = int(self.lengths.max(initial=0))
        if longest < 2:
            raise UserError(f"too little text to train on: the dataset has {self.total_tokens} token(s) and "
                            f"training needs at least 2 in one chunk: give more text")
        return min(n_ctx, longest)

    def _windows(self, length):
        if length not in self._windows_before:
            counts = np.maximum(self.lengths - length + 1, 0)
            ends = np.cumsum(counts)
            self._windows_before[length] = (ends - counts, int(ends[-1]) if len(ends) else 0)
        return self._windows_before[length]

    def batch(self, batch_size, length):
        """`batch_size` windows of `length` tokens, drawn independently.

        Args:
            batch_size: Windows to draw, >= 1.
            length: Tokens per window, >= 1.

        Returns:
            An int32 array [batch_size, length], a copy (the chunks stay untouched).

        Raises:
            UserError: No chunk holds `length` tokens.
        """
        if length < 1 or batch_size < 1:
            raise ValueError(f"length and batch_size must be >= 1, got {length} and {batch_size}")
        before, total = self._windows(length)
        if not total:
            raise UserError(f"no chunk of the dataset holds {length} tokens (the longest has "
                            f"{int(self.lengths.max(initial=0))}): use windows of at most that length")
        picks = self.rng.integers(total, size=batch_size)
        chunk = np.searchsorted(before, picks, side="right") - 1
        start = picks - before[chunk]
        return np.stack([self.chunks[c][s:s + length] for c, s in zip(chunk, start)]).astype(np.int32, copy=False)

    def sample(self, length):
        """One window of `length` tokens: an int32 array [length]. See `batch`."""
        return self.batch(1, length)[0]
