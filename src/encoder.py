"""GPT-2's byte-level BPE: text <-> token ids, the same ids as the released encoder.

Text is split into words with `SPLIT_PATTERN`, each word's UTF-8 bytes are spelled in a
printable 256-character alphabet (`bytes_to_unicode`), and the characters are merged pairwise
in the order of `vocab.bpe`. Every byte is a token, so any string encodes and decodes back.

>>> enc = Encoder.from_dir(default_vocab_dir())
>>> enc.encode("Hello world")
[15496, 995]
>>> enc.decode([15496, 995])
'Hello world'
>>> enc.eot_token, enc.n_vocab
(50256, 50257)
"""
import functools
import heapq
import itertools
import json
import os

import regex

import hparams as hparams_lib
from errors import UserError

DEFAULT_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")
VOCAB_FILES = ("encoder.json", "vocab.bpe")
HF_VOCAB_FILES = ("vocab.json", "merges.txt")  # the same two files as Hugging Face names them
TOKENIZER_FILE = "tokenizer.json"  # Hugging Face's one-file form of them
END_OF_TEXT = "<|endoftext|>"
EOT_TOKEN = 50256  # END_OF_TEXT's id in the released vocabulary

# Contractions, letter runs, number runs, other-symbol runs (each with one leading space), and
# whitespace; `\s+(?!\S)` leaves the last space of a run to start the next word. Case-sensitive
# like the released encoder, so "'S" is not a contraction.
SPLIT_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# Words remembered with their ids. Bounded so a long-running process cannot grow without limit;
# 65536 words hold ~10 MB and cover the distinct words of several MB of text.
DEFAULT_CACHE_SIZE = 1 << 16


def default_vocab_dir():
    """The directory of the vocabulary bundled with this package.

    Returns:
        The path of `src/vocab`, which holds the released `encoder.json` and `vocab.bpe`.

    >>> sorted(os.listdir(default_vocab_dir()))
    ['encoder.json', 'vocab.bpe']
    """
    return DEFAULT_VOCAB_DIR


@functools.lru_cache(maxsize=None)
def bytes_to_unicode():
    """The byte -> character table of the BPE alphabet.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (whitespace, controls)
    get chr(256 + n) in byte order, so merges never see a space or a control character.

    Returns:
        A dict from each byte value 0..255 to a one-character string.

    >>> bytes_to_unicode()[ord("A")], bytes_to_unicode()[ord(" ")]
    ('A', 'Ġ')
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in table)
    table.update((b, chr(256 + n)) for n, b in enumerate(others))
    return table


class Encoder:
    """Encodes text to GPT-2 token ids and back.

    Args:
        encoder: Token string (in the BPE alphabet) -> id, the contents of `encoder.json`.
        bpe_merges: Symbol pairs in merge order, the lines of `vocab.bpe` after its header.
        errors: How `decode` treats bytes that are not UTF-8, as in `bytes.decode`.
        cache_size: How many distinct words to remember; 0 turns the cache off.

    >>> enc = Encoder.from_dir(default_vocab_dir())
    >>> enc.encode(" don't")
    [836, 470]
    >>> enc.decode(enc.encode("naïve 日本"))
    'naïve 日本'
    """

    eot_token = EOT_TOKEN

    def __init__(self, encoder, bpe_merges, errors="replace", *, cache_size=DEFAULT_CACHE_SIZE):
        self.encoder = encoder
        self.errors = errors
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._bpe_merges = bpe_merges
        self.n_vocab = len(encoder)
        if END_OF_TEXT in encoder:
            self.eot_token = encoder[END_OF_TEXT]
        from_alphabet = {ord(c): b for b, c in self.byte_encoder.items()}
        # Each id's bytes, precomputed, so decoding is one join.
        self._token_bytes = {i: t.translate(from_alphabet).encode("latin-1") for t, i in encoder.items()}
        # Keyed by the raw word so a repeated word skips UTF-8 encoding and the alphabet too.
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._uncached_word_ids)

    # Built on first use: a process that only decodes (unconditional sampling) never needs the
    # ~10 MB of merge pairs, and holding them lazily kept the sampling scripts' peak memory down.
    @functools.cached_property
    def bpe_ranks(self):
        """Merge pair -> rank, lower merges first."""
        # A later duplicate of a pair wins, as in the released encoder's dict(zip(...)).
        ranks = {tuple(pair): rank for rank, pair in enumerate(self._bpe_merges)}
        self._bpe_merges = None
        return ranks

    @functools.cached_property
    def decoder(self):
        """Id -> token string, the released encoder's inverse table."""
        return {i: t for t, i in self.encoder.items()}

    @classmethod
    def from_files(cls, encoder_json_path, vocab_bpe_path, *, hint="download the model again with download_model.py",
                   **kwargs):
        """Loads an encoder from its two vocabulary files.

        Args:
            encoder_json_path: Path of `encoder.json` (token -> id).
            vocab_bpe_path: Path of `vocab.bpe` (a version line, then one merge pair a line).
            hint: What the user should do if a file is missing or malformed.
            **kwargs: Passed to `Encoder` (`errors`, `cache_size`).

        Returns:
            An `Encoder`.

        Raises:
            UserError: A file is missing, unreadable or not a GPT-2 vocabulary.

        >>> vocab = default_vocab_dir()
        >>> enc = Encoder.from_files(f"{vocab}/encoder.json", f"{vocab}/vocab.bpe")
        >>> enc.encode("hello world")
        [31373, 995]
        """
        try:
            with open(encoder_json_path, encoding="utf-8") as f:
                encoder = json.load(f)
            with open(vocab_bpe_path, encoding="utf-8") as f:
                merges_text = f.read()
        except FileNotFoundError as e:
            raise UserError(f"{e.filename} is missing: {hint}") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            # ValueError covers bad JSON, e.g. an HTML error page saved by an interrupted download.
            raise UserError(f"cannot read the vocabulary {encoder_json_path} / {vocab_bpe_path} ({e}): {hint}") from None
        # Blank lines (the final newline) hold no merge.
        merges = _MergeLines(merges_text)
        _check_vocabulary(encoder, merges, encoder_json_path, vocab_bpe_path, hint)
        return cls(encoder, merges, **kwargs)

    @classmethod
    def from_tokenizer_json(cls, path, *, hint="download it again", **kwargs):
        """Loads an encoder from a Hugging Face `tokenizer.json` holding GPT-2's byte-level BPE
        (what transformers 5 saves in place of vocab.json and merges.txt).

        Raises:
            UserError: The file is missing, unreadable or not a byte-level BPE vocabulary.
        """
        encoder, merges = _read_tokenizer_json(path, hint)
        _check_vocabulary(encoder, merges, path, path, hint)
        return cls(encoder, merges, **kwargs)

    @classmethod
    def from_dir(cls, path, **kwargs):
        """Loads `encoder.json` and `vocab.bpe` (or `vocab.json` and `merges.txt`) from one directory, e.g. a model's.

        Args:
            path: The directory.
            **kwargs: Passed to `from_files`.

        Returns:
            An `Encoder`.

        >>> Encoder.from_dir(default_vocab_dir()).n_vocab
        50257
        """
        tokenizer = os.path.join(path, TOKENIZER_FILE)
        if not any(map(os.path.exists, vocab_files(path))) and os.path.exists(tokenizer):
            return cls.from_tokenizer_json(tokenizer, **kwargs)
        return cls.from_files(*vocab_files(path), **kwargs)

    def _merge(self, word):
        """The BPE symbols of one word, a string in the BPE alphabet.

        Same result as the released encoder, which merges every occurrence of the lowest-ranked
        adjacent pair left to right and repeats; a heap over a linked list of symbols makes that
        O(n log n) instead of O(n^2), which matters for long unspaced runs (CJK, base64).
        """
        sym = list(word)
        n = len(sym)
        if n < 2:
            return sym
        rank_of = self.bpe_ranks.get
        nxt = list(range(1, n + 1))  # n marks the end
        prv = list(range(-1, n - 1))
        heap = [(r, i) for i, r in enumerate(map(rank_of, zip(sym, sym[1:]))) if r is not None]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            # Pop the whole rank first: it is one pair, and its occurrences merge left to right
            # before any pair that those merges create, exactly as in one pass of the reference.
            starts = []
            while heap and heap[0][0] == rank:
                starts.append(heapq.heappop(heap)[1])
            for i in starts:
                left = sym[i]
                j = nxt[i]
                # Entries go stale when a neighbour merges; the pair there now must still be this one.
                if left is None or j == n or rank_of((left, sym[j])) != rank:
                    continue
                merged = sym[i] = left + sym[j]
                sym[j] = None
                k = nxt[i] = nxt[j]
                if k < n:
                    prv[k] = i
                    r = rank_of((merged, sym[k]))
                    if r is not None:
                        heapq.heappush(heap, (r, i))
                p = prv[i]
                if p >= 0:
                    r = rank_of((sym[p], merged))
                    if r is not None:
                        heapq.heappush(heap, (r, p))
        return [s for s in sym if s is not None]

    def bpe(self, token):
        """The released encoder's `bpe`: merges one word given in the BPE alphabet.

        Args:
            token: One pre-split word, already spelled with `bytes_to_unicode`.

        Returns:
            Its BPE symbols joined by single spaces.

        >>> Encoder.from_dir(default_vocab_dir()).bpe("Ġworld")
        'Ġworld'
        """
        return " ".join(self._merge(token))

    def _uncached_word_ids(self, word):
        # Latin-1 turns each UTF-8 byte into the code point of the same value, which one C-level
        # translate then spells in the BPE alphabet.
        symbols = self._merge(word.encode("utf-8").decode("latin-1").translate(self.byte_encoder))
        return tuple(map(self.encoder.__getitem__, symbols))

    def encode(self, text):
        """Text -> token ids.

        A literal "<|endoftext|>" in the text is encoded as ordinary characters, as the
        released encoder does; append `eot_token` yourself to separate documents.

        Args:
            text: Any string.

        Returns:
            A list of token ids.

        >>> Encoder.from_dir(default_vocab_dir()).encode("<|endoftext|>")
        [27, 91, 437, 1659, 5239, 91, 29]
        """
        return list(itertools.chain.from_iterable(map(self._word_ids, SPLIT_PATTERN.findall(text))))

    def decode_bytes(self, tokens):
        """Token ids -> the bytes they stand for, which may end inside a UTF-8 character.

        Args:
            tokens: Token ids (ints, or NumPy integers).

        Returns:
            The concatenated bytes.

        Raises:
            ValueError: An id is not in the vocabulary.

        >>> Encoder.from_dir(default_vocab_dir()).decode_bytes([15496, 995])
        b'Hello world'
        """
        try:
            return b"".join(map(self._token_bytes.__getitem__, tokens))
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]!r} is not in the vocabulary (0..{self.n_vocab - 1})") from None

    def decode(self, tokens):
        """Token ids -> text.

        Args:
            tokens: Token ids (ints, or NumPy integers).

        Returns:
            The text; bytes that are not valid UTF-8 (e.g. half a character) become U+FFFD
            with the default `errors="replace"`.

        Raises:
            ValueError: An id is not in the vocabulary.

        >>> Encoder.from_dir(default_vocab_dir()).decode([31373, 995, 50256])
        'hello world<|endoftext|>'
        """
        return self.decode_bytes(tokens).decode("utf-8", errors=self.errors)


def vocab_files(directory):
    """The paths of a directory's two vocabulary files: `encoder.json` and `vocab.bpe`, or, in a
    Hugging Face directory without them, `vocab.json` and `merges.txt`."""
    names = VOCAB_FILES
    if not os.path.exists(os.path.join(directory, VOCAB_FILES[0])) and os.path.exists(
            os.path.join(directory, HF_VOCAB_FILES[0])):
        names = HF_VOCAB_FILES
    return tuple(os.path.join(directory, name) for name in names)


def write_vocab(directory, texts, names=VOCAB_FILES):
    """Writes `vocab_texts`' two texts into `directory` under `names` (the released ones, or
    Hugging Face's `HF_VOCAB_FILES`)."""
    for text, name in zip(texts, names):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)


def vocab_texts(directory, hint="download the model again with download_model.py"):
    """The texts of a directory's `encoder.json` and `vocab.bpe`, as they are in its two
    vocabulary files, or made from its tokenizer.json when it has only that."""
    tokenizer = os.path.join(directory, TOKENIZER_FILE)
    if not any(map(os.path.exists, vocab_files(directory))) and os.path.exists(tokenizer):
        encoder, merges = _read_tokenizer_json(tokenizer, hint)
        return json.dumps(encoder), "\n".join(["#version: 0.2", *(" ".join(pair) for pair in merges)]) + "\n"
    texts = []
    for path in vocab_files(directory):
        try:
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
        except FileNotFoundError:
            raise UserError(f"{path} is missing: {hint}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path} ({e}): {hint}") from None
    return tuple(texts)


def _read_tokenizer_json(path, hint):
    """(token -> id, merge pairs) of a tokenizer.json, which must be byte-level BPE like GPT-2's."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        model, pre_tokenizer = data.get("model") or {}, data.get("pre_tokenizer") or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise UserError(f"cannot read {path} ({e}): {hint}") from None
    if model.get("type", "BPE") != "BPE" or pre_tokenizer.get("type") != "ByteLevel" or "vocab" not in model:
        raise UserError(f"{path} is not GPT-2's byte-level BPE (model {model.get('type')!r}, pre_tokenizer "
                        f"{pre_tokenizer.get('type')!r}): this project reads GPT-2's vocabulary only")
    # tokenizers writes a merge as "a b" or, since 0.20, as ["a", "b"].
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model["vocab"], merges


def _check_vocabulary(encoder, merges, encoder_name, merges_name, hint):
    problem = None
    if not isinstance(encoder, dict) or not all(isinstance(i, int) for i in encoder.values()):
        problem = f"{encoder_name} is not a token -> id table"
    elif any(len(pair) != 2 for pair in merges):
        problem = f"{merges_name} has a line that is not one merge pair"
    elif not all(c in encoder for c in bytes_to_unicode().values()):
        # Without a token for every byte some text could not be encoded at all.
        problem = f"{encoder_name} lacks tokens for single bytes"
    if problem:
        raise UserError(f"malformed vocabulary: {problem}: {hint}")


class _MergeLines:
    """The merge pairs of vocab.bpe's text, made one at a time on each pass: the text takes a
    twentieth of the memory of the pairs as tuples."""

    def __init__(self, text):
        self._text = text

    def __iter__(self):
        lines = self._text.split("\n")[1:]  # the first line is the "#version" header
        return (tuple(line.split()) for line in lines if line.strip())


def get_encoder(model_name, models_dir):
    """The encoder of a downloaded model.

    Args:
        model_name: A directory name in `models_dir`, e.g. "124M" (legacy "117M" works too).
        models_dir: The directory of models; `~` and `$VARS` are expanded.

    Returns:
        An `Encoder` read from `<models_dir>/<model_name>/{encoder.json,vocab.bpe}`.

    Raises:
        UserError: The model or one of its vocabulary files is missing or malformed; the
            message says how to download it.
    """
    # model_dir expands the path and says how to download a model that is not there at all.
    path = hparams_lib.model_dir(model_name, models_dir)
    name = hparams_lib.resolve_model_name(model_name)
    if name in hparams_lib.SIZES:
        hint = f"run: python download_model.py {name} --models_dir {os.path.dirname(path)}"
    else:
        # Not a released model: its vocabulary can come from any release or the bundled copy.
        hint = f"copy encoder.json and vocab.bpe into {path} from {DEFAULT_VOCAB_DIR} or from a released model " \
               f"(python download_model.py 124M)"
    return Encoder.from_dir(path, hint=hint)
