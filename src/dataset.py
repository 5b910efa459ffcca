"""Training data: token chunks from text or pre-encoded .npz files, and uniform windows over them.

`load_dataset` reads what nshepperd/gpt-2's fine-tuning fork read (a file, a directory, a glob;
text or encode.py's .npz) with two of its bugs fixed: documents are separated by the real
<|endoftext|> token, not its 13 characters spelled as ordinary tokens, and directories are read
in a fixed order. `TokenSampler` draws every window of a length with equal chance.
"""
import glob
import os
import zipfile
import zlib

import numpy as np
import regex
import tqdm

from errors import UserError

# Long documents are encoded this many characters at a time, so a 1 GB file needs little beyond
# its text and its tokens (4 bytes each), not ~100 bytes of Python objects per token.
PIECE_CHARS = 1 << 20
# A newline after a non-space character: the split pattern ends a word there whatever follows
# and never looks behind, so the text on each side splits into the same words as the whole.
SAFE_CUT = regex.compile(r"(?<=\S)\n")
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
        A non-empty list of file paths.

    Raises:
        UserError: Nothing matches.
    """
    path = os.path.expanduser(str(path))
    if os.path.isfile(path):
        return [path]
    matches = [path] if os.path.isdir(path) else glob.glob(path, recursive=True)
    files = sorted(f for m in matches for f in ([m] if os.path.isfile(m) else _walk(m)))
    if not files:
        raise UserError(f"no dataset files match '{path}': give a text or .npz file, a directory, "
                        f"or a quoted glob such as 'data/*.txt'")
    return files


def _walk(directory):
    files = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
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
        detail = f"byte {e.start}: {e.reason}" if isinstance(e, UnicodeDecodeError) else str(e)
        raise UserError(f"{name} is not valid {encoding} ({detail}): use encoding latin-1 (or the file's own), "
                        f"or convert it to {encoding}") from None
    # Universal newlines, as the fork's text-mode reads gave: Windows files train like the rest.
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _load_npz(name, n_vocab):
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


def _check_options(combine, encoding):
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

    `.npz` files (as encode.py writes) are loaded as they are; every other file is text in
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
        A list of int32 1-D arrays: each .npz file's arrays as it is reached, each text chunk as it fills.

    Raises:
        UserError: Nothing matches `path`, a file cannot be read or decoded, an .npz is not
            encode.py's, or the dataset holds no tokens at all.
    """
    _check_options(combine, encoding)
    files = dataset_files(path)
    chunks, documents, chars = [], [], 0
    # A context manager closes the bar before an error propagates, so the error gets its own line.
    with tqdm.tqdm(files, desc="loading dataset", unit="file", disable=None if progress else True) as bar:
        for name in bar:
            if name.lower().endswith(".npz"):
                chunks += _load_npz(name, enc.n_vocab)
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
        chunks: Token arrays, e.g. from `load_dataset`.
        seed: Seed of the numpy Generator; the same seed gives the same windows.

    Attributes:
        chunks: The chunks as int32 arrays.
        total_tokens: Tokens in all chunks.
    """

    def __init__(self, chunks, seed=None):
        self.chunks = [np.asarray(c, dtype=np.int32) for c in chunks]
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
        return np.stack([self.chunks[c][s:s + length] for c, s in zip(chunk, start)])

    def sample(self, length):
        """One window of `length` tokens: an int32 array [length]. See `batch`."""
        return self.batch(1, length)[0]
