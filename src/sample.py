"""Sampling: temperature, top-k and top-p filters, the draw, and the compiled decode loop.

Filters are pure logits -> logits functions; the generation controls (processors.py) run on the
raw logits before them. The loop runs inside one tf.function over an
engine (`decode.Decoder`, or a stub in tests) and hands tokens out in chunks, so the Python side
streams them without paying a call per token. The knobs are tensors: one trace serves every value.
"""
import os
from typing import NamedTuple

import numpy as np

import processors
from errors import UserError
from runtime import tf

# The reference's stand-in for minus infinity; keeps softmax finite.
MASKED = -1e10
# Values fetched past the k-th, so that ties with it are drawn among the best without a full pass.
TIE_ROOM = 8
# Seeds are 64-bit: the stateless draws take the whole value.
SEED_RANGE = (-2 ** 63, 2 ** 63)


def top_k_logits(logits, k):
    """Keeps the k largest logits per row (ties with the k-th kept), the rest set to MASKED.

    Args:
        logits: [batch, vocab] float32.
        k: int32 scalar; 0 turns the filter off.
    """
    k = tf.convert_to_tensor(k, tf.int32)

    def keep_top_k():
        kth = tf.math.top_k(logits, k=tf.minimum(k, tf.shape(logits)[-1])).values[:, -1:]
        return tf.where(logits < kth, tf.cast(MASKED, logits.dtype), logits)

    return tf.cond(k > 0, keep_top_k, lambda: logits)


def top_p_logits(logits, p):
    """Nucleus filter with the reference's rule: keeps the tokens whose cumulative probability,
    counted from the most likely, is <= p (always at least one); the token that crosses p is
    excluded. Holtzman et al. include it; we keep the reference's behaviour.

    Args:
        logits: [batch, vocab] float32.
        p: float32 scalar in (0, 1]; 1 turns the filter off.
    """
    p = tf.convert_to_tensor(p, tf.float32)

    def keep_nucleus():
        sorted_logits = tf.math.top_k(logits, k=tf.shape(logits)[-1]).values  # descending
        cumulative = tf.cumsum(tf.nn.softmax(sorted_logits, axis=-1), axis=-1)
        count = tf.reduce_sum(tf.cast(cumulative <= p, tf.int32), axis=-1, keepdims=True)
        threshold = tf.gather(sorted_logits, tf.maximum(count - 1, 0), batch_dims=1)  # [batch, 1]
        return tf.where(logits < threshold, tf.cast(MASKED, logits.dtype), logits)

    return tf.cond(p < 1, keep_nucleus, lambda: logits)


def greedy(logits):
    """The likeliest token of each row, [batch] int32."""
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def draw(logits, seed):
    """One token per row from softmax(logits), [batch] int32; seed int64 [2] makes it reproducible."""
    return tf.cast(tf.random.stateless_categorical(logits, 1, seed)[:, 0], tf.int32)


def draw_filtered(logits, knobs, seed):
    """A draw over the whole vocabulary after temperature, top-k and top-p."""
    return draw(top_p_logits(top_k_logits(logits / knobs.temperature, knobs.top_k), knobs.top_p), seed)


def token_logprobs(logits, token, n):
    """What a token's probability was: its natural log under softmax(logits) [batch], and the n
    likeliest tokens' log-probabilities [batch, n] (descending) with their ids [batch, n]."""
    logprobs = tf.nn.log_softmax(logits, axis=-1)
    top = tf.math.top_k(logprobs, k=tf.minimum(n, tf.shape(logprobs)[-1]))
    return tf.gather(logprobs, token, batch_dims=1), top.values, top.indices


def k_best(logits, k, temperature):
    """The k best logits of each row over temperature, with TIE_ROOM more fetched for ties.

    Returns:
        values [batch, k + TIE_ROOM] (those below the k-th set to MASKED), their token ids, and
        whether each row's values hold every logit tied with its k-th ([batch] bool).
    """
    vocab = tf.shape(logits)[-1]
    fetched = tf.minimum(k + TIE_ROOM, vocab)
    values, indices = tf.math.top_k(logits, k=fetched)
    values = values / temperature  # keeps the order, so the best before it are the best after
    kth = values[:, k - 1:k]
    complete = tf.logical_or(fetched >= vocab, tf.not_equal(values[:, -1], kth[:, 0]))
    return tf.where(values < kth, tf.cast(MASKED, values.dtype), values), indices, complete


def draw_top_k(logits, knobs, seed):
    """A draw with top_k > 0. Only the k best (and ties with the k-th) can be drawn, so drawing
    among them gives the same distribution without passes over the whole vocabulary; a row
    whose tie runs past the values fetched takes `draw_filtered`, decided row by row."""
    values, indices, complete = k_best(logits, tf.minimum(knobs.top_k, tf.shape(logits)[-1]), knobs.temperature)
    among_best = tf.gather(indices, draw(top_p_logits(values, knobs.top_p), seed), batch_dims=1)
    return tf.cond(tf.reduce_all(complete), lambda: among_best,
                   lambda: tf.where(complete, among_best, draw_filtered(logits, knobs, seed)))


def sample_logits(logits, knobs, seed):
    """Draws one token per row: logits / temperature, then top-k, then top-p; temperature 0 is
    greedy (argmax), which the reference could not do.

    Args:
        logits: [batch, vocab] float32, the next-token logits.
        knobs: `Knobs` of tensors (temperature, top_k, top_p are read).
        seed: int64 [2], for a stateless draw: the same seed gives the same tokens.

    Returns:
        [batch] int32.
    """
    def sample():
        return tf.cond(knobs.top_k > 0, lambda: draw_top_k(logits, knobs, seed),
                       lambda: draw_filtered(logits, knobs, seed))

    return tf.cond(knobs.temperature > 0, sample, lambda: greedy(logits))


def _whole(name, value, least):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
        raise UserError(f"{name} must be a whole number >= {least}, got {value!r}")
    return int(value)


class Knobs(NamedTuple):
    """A stream's sampling settings, checked once by `Knobs.check`; `tensors()` gives the form
    the compiled loop takes, so one trace serves every value."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eot: bool = False
    logprobs: int = -1  # likeliest alternatives reported per token; 0 only the token's own; -1 none

    @classmethod
    def check(cls, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop_at_eot=False, logprobs=None):
        """Knobs from user values, raising UserError for any out of range; seed None is random,
        logprobs None reports none."""
        top_k = _whole("top_k", top_k, 0)
        logprobs = -1 if logprobs is None else _whole("logprobs", logprobs, 0)
        try:
            top_p, temperature = float(top_p), float(temperature)
        except (TypeError, ValueError):
            raise UserError("top_p and temperature must be numbers") from None
        if not 0 < top_p <= 1:
            raise UserError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")
        if not temperature >= 0 or temperature == float("inf"):
            raise UserError(f"temperature must be a number >= 0 (0 is greedy), got {temperature}")
        return cls(temperature, top_k, top_p, new_seed(seed), bool(stop_at_eot), logprobs)

    DTYPES = (tf.float32, tf.int32, tf.float32, tf.int64, tf.bool, tf.int32)

    def tensors(self):
        return Knobs(*(tf.constant(v, d) for v, d in zip(self, self.DTYPES)))

    @staticmethod
    def spec():
        return Knobs(*(tf.TensorSpec([], d) for d in Knobs.DTYPES))


def new_seed(seed=None):
    """A seed for the stateless draws: the user's, or a fresh random one."""
    if seed is None:
        return int.from_bytes(os.urandom(8), "little") >> 1
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise UserError(f"seed must be a whole number from -2**63 to 2**63 - 1, got {seed!r}")
    return int(seed)


def batch_seed(seed, batch):
    """A distinct, reproducible seed for each batch of a run."""
    return (seed + 1000003 * batch + 2 ** 63) % 2 ** 64 - 2 ** 63


def check_length(length):
    return _whole("length", length, 1)


def check_room(n_ctx, prompt_length):
    """UserError unless a prompt of `prompt_length` tokens fits the window (new tokens past it
    slide the window: see `TokenStream`)."""
    over = prompt_length - n_ctx
    if over > 0:
        raise UserError(f"the prompt is {prompt_length} tokens and the window {n_ctx}: use a prompt {over} tokens "
                        f"shorter, or use truncate left to keep its last {n_ctx}")


TRUNCATE = ("error", "left")


def check_truncate(truncate):
    if truncate not in TRUNCATE:
        raise UserError(f"truncate must be error or left, not {truncate!r}")
    return truncate


def fit_prompt(tokens, n_ctx, truncate="error"):
    """The prompt's tokens as they go in: all of them, or with truncate "left" the last `n_ctx`
    of a longer one; else a UserError (`check_room`)."""
    if check_truncate(truncate) == "left":
        return list(tokens[-n_ctx:])
    check_room(n_ctx, len(tokens))
    return list(tokens)


def slide_keep(n_ctx):
    """How many of the last tokens stay in the window when it slides: half of it."""
    return max(1, n_ctx // 2)


# What stands for a host engine's state in the compiled loop, which never reads it.
HOST_STATE_SPEC = tf.TensorSpec([], tf.int32)


class Sampler:
    """The compiled decode loop over an engine (the interface in decode.py).

    Args:
        engine: `decode.Decoder(lm)`, or a stub with `hparams`, `state_spec`, `prefill` and `step`.
        eot_token: The end-of-text id (`encoder.eot_token`): what finished rows emit and what
            left padding is made of.
    """

    def __init__(self, engine, eot_token):
        self.engine = engine
        self.hparams = engine.hparams
        self.eot_token = eot_token
        # autograph=False: the loop is written with tf.while_loop already, and converting the
        # code would double the seconds spent tracing before the first token.
        self.host_loop = getattr(engine, "host_loop", False)
        if self.host_loop:
            # The same compiled loop, entering the engine through tf.numpy_function each step;
            # the engine's state stays on the host, in self._host_state, while a chunk runs.
            self.prefill = engine.prefill
            self._step = self._host_step
            self._host_state = None
            self._chunks = {None: tf.function(self._chunk, autograph=False,
                                              input_signature=self._chunk_signature(None, HOST_STATE_SPEC))}
        else:
            self.prefill = tf.function(engine.prefill, autograph=False, input_signature=[
                tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32)])
            self._step = engine.step
            # Batch 1 gets its own trace, where static shapes let the engine take its one-row path.
            self._chunks = {batch: tf.function(self._chunk, autograph=False,
                                               input_signature=self._chunk_signature(batch)) for batch in (None, 1)}
        self.sample_last = tf.function(self._last, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.bool), Knobs.spec(),
            processors.ControlTensors.spec(), processors.Tally.spec(), tf.TensorSpec([], tf.int32)])

    def _chunk_signature(self, batch, state_spec=None):
        scalar = tf.TensorSpec([], tf.int32)
        state_spec = self.engine.state_spec if state_spec is None else state_spec
        return [tf.TensorSpec([batch, None], tf.float32), state_spec, tf.TensorSpec([batch], tf.bool),
                scalar, tf.TensorSpec([batch], tf.int32), scalar, scalar, Knobs.spec(),
                processors.ControlTensors.spec(), processors.Tally.spec(batch)]

    def chunk_function(self, batch):
        """The compiled loop for a stream of `batch` rows: (logits, state, done, pos, pad,
        n_steps, step, knobs, controls, tally) -> (tokens [n, batch], logits, state, done, tally,
        report), report being `token_logprobs`' three as [n, batch, ...] (empty when not asked for)."""
        if self.host_loop:
            return self._host_chunk
        return self._chunks[1 if batch == 1 else None]

    def traces(self):
        """How many times each compiled function was traced (a retrace costs seconds)."""
        functions = {"chunk": self._chunks[None], "sample_last": self.sample_last}
        if not self.host_loop:
            functions.update(prefill=self.prefill, chunk_one_row=self._chunks[1])
        counts = {name: f.experimental_get_tracing_count() for name, f in functions.items()}
        engine_traces = getattr(self.engine, "traces", None)
        return dict(counts, **(engine_traces() if engine_traces else {}))

    def _pick(self, logits, done, knobs, controls, tally, step):
        raw = logits
        # With every control off the processors are skipped, not run as no-ops.
        logits = tf.cond(controls.on, lambda: processors.process(logits, controls, tally, step, self.eot_token),
                         lambda: logits)
        token = sample_logits(logits, knobs, tf.stack([knobs.seed, tf.cast(step, tf.int64)]))
        # Finished rows keep emitting end-of-text so the batch stays rectangular.
        token = tf.where(done, self.eot_token, token)
        tally = tf.cond(controls.on, lambda: processors.record(tally, token), lambda: tally)
        done = tf.logical_or(done, tf.logical_and(knobs.stop_at_eot, tf.equal(token, self.eot_token)))
        rows = tf.shape(token)[0]
        report = tf.cond(knobs.logprobs >= 0, lambda: token_logprobs(raw, token, tf.maximum(knobs.logprobs, 0)),
                         lambda: (tf.zeros([rows]), tf.zeros([rows, 0]), tf.zeros([rows, 0], tf.int32)))
        return token, done, tally, report

    def _chunk(self, logits, state, done, pos, pad, n_steps, step, knobs, controls, tally):
        """Samples up to n_steps tokens, feeding each back; stops early once every row is done."""
        out = [tf.TensorArray(d, size=0, dynamic_size=True) for d in (tf.int32, tf.float32, tf.float32, tf.int32)]

        def body(j, logits, state, done, tally, out):
            token, done, tally, report = self._pick(logits, done, knobs, controls, tally, step + j)
            logits, state = self._step(token, pos + j, pad, state)
            return j + 1, logits, state, done, tally, [a.write(j, v) for a, v in zip(out, (token,) + report)]

        def more(j, logits, state, done, tally, out):
            return tf.logical_and(j < n_steps, tf.logical_not(tf.reduce_all(done)))

        j, logits, state, done, tally, out = tf.while_loop(
            more, body, [tf.constant(0), logits, state, done, tally, out])
        # [j, B] for numpy to transpose: oneDNN takes over int32 Transpose only to log an error
        # line and fall back to Eigen.
        rows = tf.shape(logits)[0]
        width = tf.where(knobs.logprobs >= 0, tf.minimum(tf.maximum(knobs.logprobs, 0), tf.shape(logits)[1]), 0)
        tokens, own, top, top_ids = (tf.reshape(a.stack(), shape) for a, shape in zip(
            out, ([j, rows], [j, rows], [j, rows, width], [j, rows, width])))
        return tokens, logits, state, done, tally, (own, top, top_ids)

    def _host_chunk(self, logits, state, done, pos, pad, n_steps, step, knobs, controls, tally):
        """`_chunk` for a host-run engine: its state stays here while the compiled loop runs."""
        self._host_state = state
        try:
            tokens, logits, _, done, tally, report = self._chunks[None](
                tf.constant(logits), tf.zeros([], tf.int32), done, pos, pad, n_steps, step, knobs, controls, tally)
            return tokens, logits.numpy(), self._host_state, done, tally, report
        finally:
            self._host_state = None

    def _host_step(self, token, pos, pad, state):
        logits = tf.numpy_function(self._host_step_numpy, [token, pos, pad], tf.float32, stateful=True)
        logits.set_shape([token.shape[0], None])
        return logits, state

    def _host_step_numpy(self, token, pos, pad):
        logits, self._host_state = self.engine.step(token, int(pos), pad, self._host_state)
        return logits

    def _last(self, logits, done, knobs, controls, tally, step):
        token, done, tally, report = self._pick(logits, done, knobs, controls, tally, step)
        return token[:, None], done, tally, tuple(r[:, None] for r in report)

    def generate(self, contexts, length, *, temperature=1.0, top_k=0, top_p=1.0, seed=None, stop_at_eot=False,
                 logprobs=None, max_chunk=32, **controls):
        """Samples `length` tokens after each context (token lists); see `TokenStream`.

        `logprobs` N reports each token's log-probability and the N likeliest (0: none of
        those); `controls` are `processors.Controls.check`'s (repetition_penalty,
        presence_penalty, frequency_penalty, logit_bias, bad_words, min_length), as token ids.
        """
        knobs = Knobs.check(temperature, top_k, top_p, seed, stop_at_eot, logprobs)
        checked = processors.Controls.check(**controls, n_vocab=self.hparams.n_vocab)
        return TokenStream(self, contexts, length, knobs, max_chunk=max_chunk, controls=checked)


# Tokens made one call each (chunks of one) before the chunks start to grow, so they stream at once.
FIRST_TOKENS = 8


class TokenStream:
    """Iterates over chunks of new tokens, [batch, n] int32 numpy arrays, as they are made.

    Rows shorter than the longest context are left-padded. With stop_at_eot a row ends at its
    first `<|endoftext|>` (included) and then repeats it; `stop(rows)` ends rows early, as a
    stop string does. Generation ends when `length` tokens are out or every row has ended.

    Any `length` may be asked for. When the window is full, it slides: the last
    `slide_keep(n_ctx)` tokens (half the window) are run through the model again as a new
    prompt, and generation goes on, so a token past the window sees between half a window
    and a whole one behind it. Each slide costs one prefill of that many tokens.

    With logprobs asked for, `logprobs` holds the last chunk's: each token's natural-log
    probability under the model's own distribution (before controls and filters) [batch, n],
    and the likeliest tokens' [batch, n, N] with their ids [batch, n, N]; else it is None.
    """

    def __init__(self, sampler, contexts, length, knobs, max_chunk=32, controls=processors.Controls()):
        length = check_length(length)
        contexts = [[int(t) for t in c] for c in contexts]
        if not contexts or any(len(c) == 0 for c in contexts):
            raise UserError("every prompt needs at least one token")
        longest = max(len(c) for c in contexts)
        check_room(sampler.hparams.n_ctx, longest)
        eot = sampler.eot_token
        self._sampler = sampler
        self._pad = np.array([longest - len(c) for c in contexts], np.int32)
        self._tokens = np.array([[eot] * (longest - len(c)) + c for c in contexts], np.int32)
        self._length = length
        self._knobs = knobs.tensors()
        self._controls = controls.tensors(sampler.hparams.n_vocab)
        self._tally = controls.tally(contexts, sampler.hparams.n_vocab)
        self._max_chunk = max(1, int(max_chunk))
        self._done = np.zeros([len(contexts)], bool)
        self._report = knobs.logprobs >= 0
        self.logprobs = None

    @property
    def done(self):
        """Which rows have ended (end-of-text or `stop`)."""
        return self._done.copy()

    def stop(self, rows):
        """Ends the given rows: they emit `<|endoftext|>` from the next chunk on."""
        self._done[np.asarray(rows, dtype=int)] = True

    def __iter__(self):
        s, n_ctx = self._sampler, self._sampler.hparams.n_ctx
        history = [self._tokens]  # every row's tokens so far, kept for sliding the window
        fed, pad = self._tokens.shape[1], tf.constant(self._pad)
        logits, state = s.prefill(tf.constant(self._tokens), pad, tf.constant(min(n_ctx, fed + self._length - 1)))
        produced, chunk = 0, FIRST_TOKENS
        run = s.chunk_function(len(self._done))
        while produced < self._length and not self._done.all():
            if produced == self._length - 1 or fed == n_ctx:
                # The last token, or the window is full: pick one without feeding it back.
                out, done, self._tally, report = s.sample_last(logits, tf.constant(self._done), self._knobs,
                                                               self._controls, self._tally, tf.constant(produced))
                self._done |= done.numpy()
                if self._report:
                    self.logprobs = tuple(r.numpy() for r in report)
                out = out.numpy()
                produced += 1
                yield out
                if produced == self._length or self._done.all():
                    return
                history.append(out)
                window = self._slide(history)
                pad, fed = tf.constant(self._pad), window.shape[1]
                logits, state = s.prefill(tf.constant(window), pad,
                                          tf.constant(min(n_ctx, fed + self._length - produced - 1)))
                continue
            if produced < FIRST_TOKENS:
                n = 1
            else:
                n = min(chunk, self._max_chunk, self._length - 1 - produced, n_ctx - fed)
                chunk *= 2
            out, logits, state, done, self._tally, report = run(
                logits, state, tf.constant(self._done), tf.constant(fed), pad, tf.constant(n),
                tf.constant(produced), self._knobs, self._controls, self._tally)
            self._done |= done.numpy()
            out = out.numpy().T
            if self._report:
                self.logprobs = tuple(np.swapaxes(r.numpy(), 0, 1) for r in report)
            produced += out.shape[1]
            fed += out.shape[1]
            if out.shape[1]:
                history.append(out)
                yield out
            if out.shape[1] < n:
                return

    def _slide(self, history):
        """Cuts `history` to every row's last `slide_keep` tokens and returns them [B, keep];
        the rows' left padding shrinks by what was cut."""
        tokens = np.concatenate(history, axis=1)
        keep = slide_keep(self._sampler.hparams.n_ctx)
        self._pad = np.maximum(self._pad - (tokens.shape[1] - keep), 0).astype(np.int32)
        history[:] = [tokens[:, -keep:]]
        return history[0]
