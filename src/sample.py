"""Sampling: temperature, top-k and top-p filters, and the compiled decode loop.

Filters are pure logits -> logits functions. The loop runs inside one tf.function and hands
tokens out in chunks, so the Python side can stream them without paying a call per token.
Knobs (temperature, top_k, top_p, seed) are tensors: one trace serves every value.
"""
import os

import numpy as np
import cli  # noqa: F401  (sets TensorFlow's environment before TensorFlow loads)
import tensorflow as tf

from cli import UserError

# The reference's stand-in for minus infinity; keeps softmax finite.
MASKED = -1e10
# Values fetched past the k-th, so that ties with it are drawn among the best without a full pass.
TIE_ROOM = 8


def top_k_logits(logits, k):
    """Keeps the k largest logits per row (ties with the k-th kept), the rest set to -1e10.

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


def sample_logits(logits, temperature, top_k, top_p, seed):
    """Draws one token per row: logits / temperature, then top-k, then top-p.

    Temperature 0 is greedy (argmax), which the reference could not do.

    Args:
        logits: [batch, vocab] float32, the next-token logits.
        seed: int32 [2], for a stateless draw: the same seed gives the same tokens.

    Returns:
        [batch] int32.
    """
    temperature = tf.convert_to_tensor(temperature, tf.float32)
    top_k = tf.convert_to_tensor(top_k, tf.int32)
    vocab = tf.shape(logits)[-1]

    def draw(x):
        return tf.cast(tf.random.stateless_categorical(x, 1, seed)[:, 0], tf.int32)

    def draw_filtered():
        x = logits / temperature
        x = top_k_logits(x, top_k)
        # The nucleus is taken over everything top-k kept, ties with the k-th included, as in
        # the reference; the k-best path below passes only the values it fetched.
        return draw(top_p_logits(x, top_p))

    def sample():
        # Only the k best can be drawn (with any tied with the k-th, which the reference keeps),
        # so drawing among them gives the same distribution without the passes over the whole
        # vocabulary (~3 ms a step at batch 8). Dividing by the temperature keeps the order, so
        # the best before it are the best after it. A few more than k are fetched, since bf16
        # logits tie often; only a row whose tie at the k-th place runs past them takes the
        # filters over the whole vocabulary, as top_k 0 does.
        k = tf.minimum(top_k, vocab)

        def k_best():
            fetched = tf.minimum(k + TIE_ROOM, vocab)
            values, indices = tf.math.top_k(logits, k=fetched)
            values = values / temperature
            kth = values[:, k - 1:k]
            tie_runs_past = tf.logical_and(fetched < vocab, tf.reduce_any(tf.equal(values[:, -1:], kth)))
            values = tf.where(values < kth, tf.cast(MASKED, values.dtype), values)
            return tf.logical_not(tie_runs_past), values, indices

        def none():
            rows = tf.shape(logits)[0]
            return tf.constant(False), tf.zeros([rows, 0]), tf.zeros([rows, 0], tf.int32)

        exact, values, indices = tf.cond(k > 0, k_best, none)

        def draw_among_k_best():
            return tf.gather(indices, draw(top_p_logits(values, top_p)), batch_dims=1)

        return tf.cond(exact, draw_among_k_best, draw_filtered)

    def greedy():
        return tf.argmax(logits, axis=-1, output_type=tf.int32)

    return tf.cond(temperature > 0, sample, greedy)


def check_knobs(temperature, top_k, top_p):
    """UserErrors for sampling settings outside their ranges."""
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 0:
        raise UserError(f"--top_k must be a whole number >= 0 (0 turns it off), got {top_k!r}")
    try:
        top_p = float(top_p)
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise UserError("--top_p and --temperature must be numbers") from None
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (1 turns it off), got {top_p}")
    if not temperature >= 0 or temperature == float("inf"):
        raise UserError(f"--temperature must be a number >= 0 (0 is greedy), got {temperature}")
    return float(temperature), int(top_k), float(top_p)


def new_seed(seed=None):
    """A seed for the stateless draws: the user's, or a fresh random one."""
    if seed is None:
        return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
        raise UserError(f"--seed must be a whole number, got {seed!r}")
    return int(seed) & 0x7FFFFFFF


def batch_seed(seed, batch):
    """A distinct, reproducible seed for each batch of a run."""
    return (seed + 1000003 * batch) & 0x7FFFFFFF


class Sampler:
    """The compiled decode loop for one model.

    `lm` needs `.hparams` (n_vocab, n_ctx), `prefill(tokens, pad, capacity)` returning
    (logits [B, V], state) and `decode_step(token, pos, pad, state)` returning
    (logits [B, V], state), where state is a list of tensors. `model.GPT2` is one; tests use a
    stub.
    """

    def __init__(self, lm, state_spec=None):
        self.lm = lm
        self.hparams = lm.hparams
        scalar = lambda dtype: tf.TensorSpec([], dtype)  # noqa: E731
        if state_spec is None:
            hp = lm.hparams
            dtype = getattr(lm, "compute_dtype", tf.float32)
            state_spec = [tf.TensorSpec([None, hp.head_dim], dtype) for _ in range(hp.n_layer)]
        knobs = [scalar(tf.float32), scalar(tf.int32), scalar(tf.float32), scalar(tf.int32)]
        # autograph=False: the loop is written with tf.while_loop already, and converting the
        # code would double the seconds spent tracing before the first token.
        self._prefill = tf.function(lm.prefill, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32), scalar(tf.int32)])
        self._run_chunk = tf.function(self._chunk, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.float32), state_spec, scalar(tf.int32),
            tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.bool), scalar(tf.int32),
            *knobs, scalar(tf.int32), scalar(tf.bool)])
        # Batch 1 gets its own trace, where static shapes let the model take its one-row path.
        self._run_chunk_one = tf.function(self._chunk, autograph=False, input_signature=[
            tf.TensorSpec([1, None], tf.float32), state_spec, scalar(tf.int32),
            tf.TensorSpec([1], tf.int32), tf.TensorSpec([1], tf.bool), scalar(tf.int32),
            *knobs, scalar(tf.int32), scalar(tf.bool)])
        self._sample_last = tf.function(self._last, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.bool),
            *knobs, scalar(tf.int32), scalar(tf.bool)])

    def _pick(self, logits, done, temperature, top_k, top_p, seed, step, stop_at_eot):
        eot = self.hparams.n_vocab - 1
        token = sample_logits(logits, temperature, top_k, top_p, tf.stack([seed, step]))
        # Finished rows keep emitting end-of-text so the batch stays rectangular.
        token = tf.where(done, eot, token)
        return token, tf.logical_or(done, tf.logical_and(stop_at_eot, tf.equal(token, eot)))

    def _chunk(self, logits, state, pos, pad, done, n_steps, temperature, top_k, top_p, seed, step,
               stop_at_eot):
        """Samples up to n_steps tokens, feeding each back; stops early once every row is done."""
        tokens = tf.TensorArray(tf.int32, size=0, dynamic_size=True)

        def body(j, logits, state, done, tokens):
            token, done = self._pick(logits, done, temperature, top_k, top_p, seed, step + j, stop_at_eot)
            tokens = tokens.write(j, token)
            logits, state = self.lm.decode_step(token, pos + j, pad, state)
            return j + 1, logits, state, done, tokens

        def more(j, logits, state, done, tokens):
            return tf.logical_and(j < n_steps, tf.logical_not(tf.reduce_all(done)))

        j, logits, state, done, tokens = tf.while_loop(
            more, body, [tf.constant(0), logits, state, done, tokens])
        # [j, B]; the caller transposes: oneDNN takes over int32 Transpose only to log an error
        # line and fall back to Eigen.
        out = tf.reshape(tokens.stack(), [j, tf.shape(logits)[0]])  # shape [0, B] when nothing ran
        return out, logits, state, done

    def _last(self, logits, done, temperature, top_k, top_p, seed, step, stop_at_eot):
        token, done = self._pick(logits, done, temperature, top_k, top_p, seed, step, stop_at_eot)
        return token[:, None], done

    def generate(self, contexts, length, *, temperature=1.0, top_k=0, top_p=1.0, seed=None,
                 stop_at_eot=False, max_chunk=32):
        """Samples `length` tokens after each context; see `TokenStream`."""
        return TokenStream(self, contexts, length, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop_at_eot=stop_at_eot, max_chunk=max_chunk)


def check_room(n_ctx, prompt_length, length):
    """UserError unless a prompt of `prompt_length` tokens plus `length` new ones fit the window.

    The last new token is never fed back, so they need prompt_length + length - 1 positions.
    """
    if length > n_ctx:
        raise UserError(f"Can't get samples longer than window size: {n_ctx} (use --length {n_ctx} or less)")
    if prompt_length + length - 1 > n_ctx:
        room = n_ctx - prompt_length + 1
        if room < 1:
            raise UserError(f"the prompt is {prompt_length} tokens but the model's window is {n_ctx}: "
                            f"shorten the prompt by {prompt_length - n_ctx} tokens or more")
        raise UserError(f"the prompt is {prompt_length} tokens, which leaves room for {room} new tokens "
                        f"in the {n_ctx}-token window: use --length {room} or less, or a shorter prompt")


# Tokens made one call each (chunks of one) before the chunks start to grow, so they stream at once.
FIRST_TOKENS = 8


class TokenStream:
    """Iterates over chunks of new tokens, [batch, n] int32 numpy arrays, as they are made.

    Rows shorter than the longest context are left-padded. With stop_at_eot a row ends at its
    first `<|endoftext|>` (included) and then repeats it; `stop(rows)` ends rows early, as a
    stop string does. Generation ends when `length` tokens are out or every row has ended.
    """

    def __init__(self, sampler, contexts, length, *, temperature, top_k, top_p, seed, stop_at_eot,
                 max_chunk):
        temperature, top_k, top_p = check_knobs(temperature, top_k, top_p)
        hp = sampler.hparams
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool) or length < 1:
            raise UserError(f"--length must be a whole number >= 1, got {length!r}")
        contexts = [list(c) for c in contexts]
        if not contexts or any(len(c) == 0 for c in contexts):
            raise UserError("every prompt needs at least one token")
        longest = max(len(c) for c in contexts)
        check_room(hp.n_ctx, longest, int(length))
        eot = hp.n_vocab - 1
        tokens = np.array([[eot] * (longest - len(c)) + c for c in contexts], np.int32)
        self._sampler = sampler
        self._pad = tf.constant([longest - len(c) for c in contexts], tf.int32)
        self._tokens = tf.constant(tokens)
        self._length = int(length)
        self._prompt_length = longest
        self._knobs = (tf.constant(temperature, tf.float32), tf.constant(top_k, tf.int32),
                       tf.constant(top_p, tf.float32), tf.constant(new_seed(seed), tf.int32))
        self._stop_at_eot = tf.constant(bool(stop_at_eot))
        self._max_chunk = max(1, int(max_chunk))
        self._done = np.zeros([len(contexts)], bool)

    @property
    def done(self):
        """Which rows have ended (end-of-text or `stop`)."""
        return self._done.copy()

    def stop(self, rows):
        """Ends the given rows: they emit `<|endoftext|>` from the next chunk on."""
        self._done[np.asarray(rows, dtype=int)] = True

    def __iter__(self):
        s = self._sampler
        capacity = self._prompt_length + self._length - 1
        logits, state = s._prefill(self._tokens, self._pad, tf.constant(capacity))
        produced, chunk = 0, FIRST_TOKENS
        run = s._run_chunk_one if len(self._done) == 1 else s._run_chunk
        # Every token comes from the one compiled loop: a separate one-token function for the
        # first tokens traced 0.16 s faster but held ~19 MiB more in every longer run.
        while produced < self._length - 1 and not self._done.all():
            if produced < FIRST_TOKENS:
                n = 1
            else:
                n = min(chunk, self._max_chunk, self._length - 1 - produced)
                chunk *= 2
            out, logits, state, done = run(
                logits, state, tf.constant(self._prompt_length + produced), self._pad,
                tf.constant(self._done), tf.constant(n), *self._knobs, tf.constant(produced),
                self._stop_at_eot)
            self._done |= done.numpy()
            out = out.numpy().T
            produced += out.shape[1]
            if out.shape[1]:
                yield out
            if out.shape[1] < n:
                return
        if produced == self._length - 1 and not self._done.all():
            out, done = s._sample_last(logits, tf.constant(self._done), *self._knobs,
                                       tf.constant(produced), self._stop_at_eot)
            self._done |= done.numpy()
            yield out.numpy()
