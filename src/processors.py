"""Generation controls: logits processors applied to the raw next-token logits, before temperature,
top-k and top-p.

Each processor is a pure function on logits [batch, vocab]. `process` applies them in Hugging Face
transformers' order (its `_get_logits_processor`), with the OpenAI penalties, which it lacks,
beside its repetition penalty:

    logit_bias -> repetition_penalty -> presence_penalty, frequency_penalty -> bad_words -> min_length

`Controls` holds a stream's checked values; `tensors()` gives the form the compiled loop takes, so
one trace serves every value. `Tally` is what the loop keeps per row for them: counts of the
tokens generated, which tokens the prompt holds, and the last tokens, for multi-token bad words.
A batch whose rows each have their own (the server's) takes `row_tensors` and `Tally.fit`, and
`process` applies the same rules row by row.
"""
import math
from typing import NamedTuple

import numpy as np

from errors import UserError
from runtime import tf

# The reference's stand-in for minus infinity (as in sample.py); keeps softmax finite.
MASKED = -1e10
# A bias this low bans the token, as the OpenAI API's -100 does.
BAN_BIAS = -100.0
# Marks positions of a bad word's prefix that are left of its start, so they match any token.
ANY = -2
# Marks history positions before the prompt, so they match no token.
NONE = -1


def bias_logits(logits, bias):
    """Adds bias [vocab] to every row; a bias of BAN_BIAS or less bans its token (MASKED)."""
    return tf.where(bias <= BAN_BIAS, tf.cast(MASKED, logits.dtype), logits + bias)


def repetition_penalty_logits(logits, seen, penalty):
    """CTRL's repetition penalty (Keskar et al., 2019), as Hugging Face applies it: the logit of a
    token already seen (seen [batch, vocab] bool) is divided by `penalty` when positive and
    multiplied by it when negative; 1 changes nothing."""
    penalised = tf.where(logits < 0, logits * penalty, logits / penalty)
    return tf.where(seen, penalised, logits)


def presence_frequency_logits(logits, counts, presence, frequency):
    """The OpenAI API's penalties: each token's logit loses `frequency` for every time it was
    generated (counts [batch, vocab]) and `presence` once if it was generated at all."""
    counts = tf.cast(counts, logits.dtype)
    return logits - counts * frequency - tf.cast(counts > 0, logits.dtype) * presence


def bad_words_logits(logits, history, prefixes, last, word_rows=None):
    """Bans the last token of every bad word whose other tokens end the row's text.

    Args:
        logits: [batch, vocab].
        history: [batch, H] int32, each row's last H tokens (NONE before the prompt's first).
        prefixes: [n, H] int32, each bad word's tokens but its last, right-aligned, ANY before them.
        last: [n] int32, each bad word's last token.
        word_rows: [n] int32, the row each bad word is banned in; None bans every word in every row.
    """
    matches = tf.reduce_all(tf.logical_or(tf.equal(prefixes[None], history[:, None]), tf.equal(prefixes[None], ANY)),
                            axis=-1)  # [batch, n]
    if word_rows is not None:
        matches = tf.logical_and(matches, tf.equal(word_rows[None], tf.range(tf.shape(history)[0])[:, None]))
    where = tf.where(matches)  # [m, 2]: (row, bad word)
    banned = tf.stack([tf.cast(where[:, 0], tf.int32), tf.gather(last, where[:, 1])], axis=1)  # [m, 2]: (row, token)
    return tf.tensor_scatter_nd_update(logits, banned, tf.fill(tf.shape(banned)[:1], tf.cast(MASKED, logits.dtype)))


def min_length_logits(logits, new_tokens, min_length, eot_token):
    """Bans end-of-text while fewer than `min_length` new tokens are out (`new_tokens` of them):
    scalars for every row alike, or [batch, 1] for each row its own."""
    ban = tf.logical_and(new_tokens < min_length, tf.equal(tf.range(tf.shape(logits)[-1]), eot_token))
    return tf.where(ban, tf.cast(MASKED, logits.dtype), logits)


class Tally(NamedTuple):
    """What the loop keeps per row for the controls."""

    counts: tf.Tensor  # [batch, vocab] int32: times each token was generated
    in_prompt: tf.Tensor  # [batch, vocab] bool: tokens of the prompt (not its padding)
    history: tf.Tensor  # [batch, H] int32: the last H tokens, for multi-token bad words

    @staticmethod
    def spec(batch=None):
        return Tally(tf.TensorSpec([batch, None], tf.int32), tf.TensorSpec([batch, None], tf.bool),
                     tf.TensorSpec([batch, None], tf.int32))

    def fit(self, width, depth):
        """This tally with `width` vocabulary columns and `depth` history ones, as rows joining
        a batch take the batch's: a width that changes goes from none to the vocabulary or back,
        so it is only ever zeros or empty (every row's controls off); history keeps its last
        `depth` tokens, with NONE before."""
        rows = tf.shape(self.counts)[0]
        counts, in_prompt, history = self
        if counts.shape[1] != width:
            counts, in_prompt = tf.zeros([rows, width], tf.int32), tf.zeros([rows, width], tf.bool)
        held = history.shape[1]
        if held < depth:
            history = tf.concat([tf.fill([rows, depth - held], NONE), history], axis=1)
        return Tally(counts, in_prompt, history[:, held - depth:] if held > depth else history)


def record(tally, token):
    """The tally after each row generated `token` [batch]."""
    rows = tf.range(tf.shape(token)[0])
    counts = tf.tensor_scatter_nd_add(tally.counts, tf.stack([rows, token], axis=1), tf.ones_like(token))
    history = tf.concat([tally.history, token[:, None]], axis=1)[:, 1:]  # keeps H columns, H = 0 included
    return Tally(counts, tally.in_prompt, history)


def process(logits, controls, tally, new_tokens, eot_token, word_rows=None):
    """All the processors, in the order of the module's docstring.

    Args:
        logits: [batch, vocab] float32, the model's raw next-token logits.
        controls: `ControlTensors` of one stream, or of each row its own (`ControlTensors.rows`).
        tally: `Tally` of the rows so far.
        new_tokens: int32, how many new tokens each row has already: a scalar, or [batch, 1].
        eot_token: the end-of-text id.
        word_rows: each bad word's row, for rows' own controls (see `bad_words_logits`).
    """
    logits = bias_logits(logits, controls.logit_bias)
    seen = tf.logical_or(tally.in_prompt, tally.counts > 0)
    logits = repetition_penalty_logits(logits, seen, controls.repetition_penalty)
    logits = presence_frequency_logits(logits, tally.counts, controls.presence_penalty, controls.frequency_penalty)
    logits = bad_words_logits(logits, tally.history, controls.bad_prefixes, controls.bad_last, word_rows)
    return min_length_logits(logits, new_tokens, controls.min_length, eot_token)


def _number(name, value, rule, low, high):
    """A finite number within [low, high] (above low when low is 0), else a UserError naming `rule`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    inside = low < number <= high if low == 0 else low <= number <= high
    if isinstance(value, bool) or not inside or not math.isfinite(number):
        raise UserError(f"{name} must be a number {rule}, got {value!r}")
    return number


def _token_id(name, value, n_vocab):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value < n_vocab:
        raise UserError(f"{name} must hold token ids from 0 to {n_vocab - 1}, got {value!r}")
    return int(value)


class Controls(NamedTuple):
    """A stream's generation controls, checked once by `Controls.check`; all off by default."""

    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple = ()  # ((token id, bias), ...)
    bad_words: tuple = ()  # (token ids, ...), each a sequence never generated
    min_length: int = 0

    @classmethod
    def check(cls, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None,
              bad_words=None, min_length=0, *, n_vocab=None):
        """Controls from user values (token ids, not text), raising UserError for a bad one.

        Args:
            logit_bias: {token id: bias from -100 (bans) to 100}.
            bad_words: token-id sequences, each of one token or more.
            n_vocab: the vocabulary's size; None checks everything but the tokens, and takes
                strings for them, as the command line does before the encoder is loaded.
        """
        repetition_penalty = _number("repetition_penalty", repetition_penalty, "> 0 (1 turns it off)", 0, math.inf)
        presence_penalty = _number("presence_penalty", presence_penalty, "from -2 to 2 (0 turns it off)", -2, 2)
        frequency_penalty = _number("frequency_penalty", frequency_penalty, "from -2 to 2 (0 turns it off)", -2, 2)
        if isinstance(min_length, bool) or not isinstance(min_length, (int, np.integer)) or min_length < 0:
            raise UserError(f"min_length must be a whole number >= 0, got {min_length!r}")
        text_too = n_vocab is None  # before the encoder: text is taken, to be encoded later

        def token(name, t):
            return t if text_too and isinstance(t, str) else _token_id(name, t, n_vocab or 2 ** 31)

        if logit_bias is None:
            logit_bias = {}
        if not isinstance(logit_bias, dict):
            raise UserError("logit_bias must map token ids to numbers, like {50256: -100}")
        rule = "from -100 (bans) to 100"
        biases = tuple((token("logit_bias", t), _number("logit_bias", b, rule, BAN_BIAS, 100))
                       for t, b in logit_bias.items())
        if isinstance(bad_words, (str, int, np.integer)):
            bad_words = [bad_words]
        if bad_words is not None and not isinstance(bad_words, (list, tuple)):
            raise UserError("bad_words must be a list of token-id lists")
        words = []
        for given in bad_words or ():
            word = [given] if isinstance(given, (int, np.integer, str)) and given != "" else given
            if not isinstance(word, (list, tuple, np.ndarray)) or len(word) == 0:
                raise UserError(f"bad_words must be strings or token-id lists of one token or more, got {given!r}")
            words.append(tuple(token("bad_words", t) for t in word))
        return cls(repetition_penalty, presence_penalty, frequency_penalty, biases, tuple(words), int(min_length))

    @property
    def on(self):
        return self != Controls()

    @property
    def depth(self):
        """The history the bad words need: the longest one's tokens but its last."""
        return max((len(w) for w in self.bad_words), default=1) - 1

    def arrays(self, width, depth):
        """The bias [width] (width 0 when every control is off, else the vocabulary's) and the
        bad words as prefixes [n, depth] (depth >= `self.depth`) and last tokens [n], as numpy."""
        bias = np.zeros([width], np.float32)
        for token, value in self.logit_bias:
            bias[token] = value
        prefixes = np.full([len(self.bad_words), depth], ANY, np.int32)
        for i, word in enumerate(self.bad_words):
            if len(word) > 1:
                prefixes[i, depth - len(word) + 1:] = word[:-1]
        last = np.array([w[-1] for w in self.bad_words], np.int32)
        return bias, prefixes, last

    def tensors(self, n_vocab):
        """The loop's form: scalars, the bias [vocab] and the bad words as prefixes [n, H] and
        last tokens [n]; everything empty when off, so nothing is built for it."""
        bias, prefixes, last = self.arrays(n_vocab if self.on else 0, self.depth)
        return ControlTensors(tf.constant(self.on), tf.constant(self.repetition_penalty, tf.float32),
                              tf.constant(self.presence_penalty, tf.float32),
                              tf.constant(self.frequency_penalty, tf.float32), tf.constant(bias),
                              tf.constant(prefixes), tf.constant(last), tf.constant(self.min_length, tf.int32))

    def tally(self, contexts, n_vocab):
        """The `Tally` of rows starting from `contexts` (token lists, unpadded)."""
        width = n_vocab if self.on else 0
        depth = self.depth
        in_prompt = np.zeros([len(contexts), width], bool)
        history = np.full([len(contexts), depth], NONE, np.int32)
        for row, context in enumerate(contexts):
            if width:
                in_prompt[row, context] = True
            tail = context[max(0, len(context) - depth):] if depth else []
            history[row, depth - len(tail):] = tail
        return Tally(tf.zeros([len(contexts), width], tf.int32), tf.constant(in_prompt), tf.constant(history))


class ControlTensors(NamedTuple):
    """`Controls` as the compiled loop takes them."""

    on: tf.Tensor
    repetition_penalty: tf.Tensor
    presence_penalty: tf.Tensor
    frequency_penalty: tf.Tensor
    logit_bias: tf.Tensor  # [vocab] float32
    bad_prefixes: tf.Tensor  # [n, H] int32
    bad_last: tf.Tensor  # [n] int32
    min_length: tf.Tensor

    @staticmethod
    def spec():
        scalar = tf.TensorSpec([], tf.float32)
        return ControlTensors(tf.TensorSpec([], tf.bool), scalar, scalar, scalar, tf.TensorSpec([None], tf.float32),
                              tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32),
                              tf.TensorSpec([], tf.int32))

    @staticmethod
    def row_spec():
        """The spec of `row_tensors`' form."""
        column = tf.TensorSpec([None, 1], tf.float32)
        return ControlTensors(tf.TensorSpec([], tf.bool), column, column, column,
                              tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None, None], tf.int32),
                              tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 1], tf.int32))


def rows_shape(controls, n_vocab):
    """The tally's width and depth for rows with these `Controls` (one each): the vocabulary if
    any row's are on, else none; the history the longest bad word needs."""
    return (n_vocab if any(c.on for c in controls) else 0), max(c.depth for c in controls)


def row_tensors(controls, n_vocab):
    """Rows with their own `Controls` (one each) as `process` takes them: `ControlTensors` of
    per-row values (the scalars [batch, 1], the bias [batch, vocab], every row's bad words in one
    table) and `word_rows` [n], the row of each bad word. With every row's off, as empty as
    `Controls.tensors` makes them."""
    width, depth = rows_shape(controls, n_vocab)
    bias, prefixes, last = zip(*(c.arrays(width, depth) for c in controls))

    def column(name, dtype):
        return tf.constant(np.array([getattr(c, name) for c in controls], dtype)[:, None])

    tensors = ControlTensors(tf.constant(width > 0), column("repetition_penalty", np.float32),
                             column("presence_penalty", np.float32), column("frequency_penalty", np.float32),
                             tf.constant(np.stack(bias)), tf.constant(np.concatenate(prefixes)),
                             tf.constant(np.concatenate(last)), column("min_length", np.int32))
    word_rows = np.repeat(np.arange(len(controls), dtype=np.int32), [len(c.bad_words) for c in controls])
    return tensors, tf.constant(word_rows)
