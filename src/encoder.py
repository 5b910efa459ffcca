"""GPT-2's byte-level BPE: text <-> token ids, exactly as the released vocabulary was trained.

>>> enc = Encoder.from_dir(DEFAULT_VOCAB_DIR)
>>> enc.encode("Hello world")
[15496, 995]
>>> enc.decode([15496, 995])
'Hello world'
"""
import functools
import json
import os

import regex

import hparams as hparams_lib
from cli import UserError

DEFAULT_VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vocab")
END_OF_TEXT = "<|endoftext|>"

# Contractions, letter runs, number runs, other-symbol runs (each with one leading space), and
# whitespace; `\s+(?!\S)` leaves the last space of a run to start the next word.
SPLIT_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode():
    """Byte -> printable character: printable Latin-1 bytes map to themselves, the other 68 bytes
    to chr(256 + n) in order, so BPE never sees whitespace or control characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class Encoder:
    """Encodes text to GPT-2 token ids and back.

    Args:
        encoder: token string -> id, from `encoder.json`.
        bpe_merges: merge pairs in priority order, from `vocab.bpe`.
    """

    def __init__(self, encoder, bpe_merges, errors="replace"):
        self.encoder = encoder
        self.decoder = {v: k for k, v in encoder.items()}
        self.errors = errors
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(bpe_merges)}
        self.cache = {}
        # str.translate tables: a Latin-1 view of the bytes <-> the BPE alphabet, in C.
        self._to_bpe_alphabet = {b: c for b, c in self.byte_encoder.items()}
        from_bpe_alphabet = {ord(c): b for b, c in self.byte_encoder.items()}
        # Each id's bytes, precomputed: decoding is then one join.
        self._token_bytes = {i: t.translate(from_bpe_alphabet).encode("latin-1") for t, i in encoder.items()}
        self.eot_token = encoder.get(END_OF_TEXT, len(encoder) - 1)
        self.n_vocab = len(encoder)

    @classmethod
    def from_dir(cls, path):
        """Loads `encoder.json` and `vocab.bpe` from a model directory."""
        hint = "download the model again with download_model.py"
        try:
            with open(os.path.join(path, "encoder.json"), encoding="utf-8") as f:
                encoder = json.load(f)
            with open(os.path.join(path, "vocab.bpe"), encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError as e:
            raise UserError(f"{e.filename} is missing: {hint}") from None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"cannot read the vocabulary in {path} ({e}): {hint}") from None
        # The first line is a version header; the file ends with an empty line.
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        if not isinstance(encoder, dict) or any(len(m) != 2 for m in merges):
            raise UserError(f"the vocabulary in {path} is malformed: {hint}")
        return cls(encoder, merges)

    def bpe(self, token):
        """Merges the characters of one pre-split token by rank; returns space-joined pieces."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = list(token)
        ranks = self.bpe_ranks
        while len(word) > 1:
            best_rank, best = None, None
            for pair in zip(word, word[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best = rank, pair
            if best is None:
                break
            first, second = best
            merged = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text):
        """Text -> token ids. A literal `<|endoftext|>` in the text is encoded as ordinary
        characters, as the reference does; use `eot_token` for the real separator."""
        ids = []
        encoder = self.encoder
        for piece in SPLIT_PATTERN.findall(text):
            token = piece.encode("utf-8").decode("latin-1").translate(self._to_bpe_alphabet)
            ids.extend(encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return ids

    def decode_bytes(self, tokens):
        """Token ids -> the raw bytes they stand for (possibly a partial UTF-8 character)."""
        try:
            return b"".join(map(self._token_bytes.__getitem__, tokens))
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary (0..{self.n_vocab - 1})") from None

    def decode(self, tokens):
        """Token ids -> text; byte sequences that are not UTF-8 become U+FFFD."""
        return self.decode_bytes(tokens).decode("utf-8", errors=self.errors)


def get_encoder(model_name, models_dir):
    """The encoder of a model directory: `<models_dir>/<model_name>/{encoder.json,vocab.bpe}`."""
    return Encoder.from_dir(hparams_lib.model_dir(model_name, models_dir))
