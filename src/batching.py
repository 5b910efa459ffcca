"""Continuous batching: rows of many requests share each decode step, joining and leaving the
running batch between steps.

A `Batcher` runs in one thread over an engine (`decode.Decoder`): rows waiting are prefilled and
join between steps, finished or cancelled rows leave, and every row in the batch makes one token
a step. Rows share one position, each with its own left padding, as the engine's interface
has them; when rows join (or half the batch has ended), the engine's `rearrange` and `concat`
move the cache so that the padding is as small as it can be and the cache holds just the
positions the rows will still write; an ended row answers at once and idles till then. Each row
draws with its own knobs, generation controls and seed, seeded by its own token count, and its
penalties count its own tokens (a `processors.Tally` row that moves with it), so it gets the
tokens it would get alone (and the ones `api.generate` gives for its seed and controls).
"""
import collections
import threading
from typing import NamedTuple

import processors
import sample
from errors import UserError
from runtime import tf


class Draw(NamedTuple):
    """A step's tokens [B] and, when asked for, their log-probabilities [B] and the likeliest
    tokens' [B, n] with ids [B, n]."""

    token: tf.Tensor
    logprob: tf.Tensor
    top: tf.Tensor
    top_ids: tf.Tensor


class RowKnobs(NamedTuple):
    """Per-row sampling settings as the compiled step takes them: one entry per row."""

    temperature: tf.Tensor  # [B] float32
    top_k: tf.Tensor  # [B] int32
    top_p: tf.Tensor  # [B] float32
    seed: tf.Tensor  # [B] int64
    index: tf.Tensor  # [B] int32: how many tokens each row has drawn (its draws' second seed word)

    @staticmethod
    def spec():
        return RowKnobs(*(tf.TensorSpec([None], d) for d in (tf.float32, tf.int32, tf.float32, tf.int64, tf.int32)))


class RowTensors(NamedTuple):
    """What the compiled functions take of the rows besides their tokens and tally: built when
    rows join or leave, not every step."""

    knobs: RowKnobs
    n_logprobs: tf.Tensor  # int32 scalar: the most likeliest tokens any row reports; -1 none
    controls: processors.ControlTensors  # each row's own (`processors.row_tensors`)
    word_rows: tf.Tensor  # [n] int32: the row of each bad word
    pad: tf.Tensor  # [B] int32: each row's left padding in the cache


def draw_rows(logits, knobs, n_logprobs, controls, word_rows, tally, eot_token):
    """One token per row: the generation controls on the raw logits, each row with its own values
    and tally (`processors.process`), then `sample.sample_logits` on that row alone with its own
    knobs and seed, so a row draws the same token in any batch. n_logprobs -1 reports nothing;
    the log-probabilities are the model's own, before the controls, as `sample.Sampler` reports.

    Returns:
        The `Draw` and the tally with the tokens counted.
    """
    raw = logits
    # With every row's controls off the processors are skipped and the tally is empty.
    logits = tf.cond(controls.on, lambda: processors.process(logits, controls, tally, knobs.index[:, None], eot_token,
                                                             word_rows), lambda: logits)

    def one(args):
        row, temperature, top_k, top_p, seed, index = args
        row_knobs = sample.Knobs(temperature, top_k, top_p, seed, tf.constant(False), tf.constant(-1))
        return sample.sample_logits(row[None], row_knobs, tf.stack([seed, tf.cast(index, tf.int64)]))[0]

    token = tf.map_fn(one, (logits, *knobs), fn_output_signature=tf.int32)
    tally = tf.cond(controls.on, lambda: processors.record(tally, token), lambda: tally)
    rows = tf.shape(token)[0]
    report = tf.cond(n_logprobs >= 0, lambda: sample.token_logprobs(raw, token, tf.maximum(n_logprobs, 0)),
                     lambda: (tf.zeros([rows]), tf.zeros([rows, 0]), tf.zeros([rows, 0], tf.int32)))
    return Draw(token, *report), tally


def _gather(tally, rows):
    return processors.Tally(*(tf.gather(t, rows) for t in tally))


class Row:
    """One sequence for the batcher: a prompt, how many tokens at most, its knobs and its
    generation controls (`processors.Controls`, checked against the model's vocabulary).

    From the batcher's thread, `on_token(row, token, report)` gets each token drawn (report:
    None, or its log-probability and [(id, log-probability)] of the likeliest) and returns True
    when the row should end there (a stop string); `on_end(row, reason)` is called once, reason
    "stop" (end-of-text or on_token's say), "length", "cancelled" or "error". `cancel()` may be
    called from any thread; the row leaves the batch before the next step.
    """

    def __init__(self, prompt, max_new_tokens, *, temperature=1.0, top_k=0, top_p=1.0, seed=None, logprobs=None,
                 controls=processors.Controls(), on_token=None, on_end=None):
        self.prompt = [int(t) for t in prompt]
        self.max_new_tokens = int(max_new_tokens)
        self.knobs = sample.Knobs.check(temperature, top_k, top_p, seed, True, logprobs)
        self.controls = controls
        self.on_token = on_token or (lambda row, token, report: False)
        self.on_end = on_end or (lambda row, reason: None)
        self.generated = 0
        self.pad = 0  # left padding in the batch's cache
        self.token = None  # the last token drawn, fed at the next step
        self.ended = None
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def left(self):
        """Tokens still to draw."""
        return self.max_new_tokens - self.generated


class Batcher:
    """The decode loop of a server: `submit` rows from any thread, `run` in one thread (or
    `start` one), `stop` to end it once every row submitted has ended.

    Args:
        engine: `decode.Decoder(lm)`, or another engine with `prefill`, `step`, `rearrange`,
            `concat` and `cache_bytes_per_position` (`litert_engine.Engine`, run from the host).
        eot_token: End-of-text: it ends a row (as the OpenAI API ends completions) and pads prompts.
        max_rows: Rows in a batch at most; with the window, this bounds the cache's memory.
    """

    def __init__(self, engine, eot_token, max_rows=8):
        self.engine = engine
        self.n_ctx = engine.hparams.n_ctx
        self.n_vocab = engine.hparams.n_vocab
        self.eot_token = eot_token
        self.max_rows = max_rows
        self._waiting = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._thread = None
        self.rows = []  # the running batch, in the cache's row order
        self._reset()
        self.stats = collections.Counter()
        signature = [tf.TensorSpec([None, None], tf.float32), RowKnobs.spec(), tf.TensorSpec([], tf.int32),
                     processors.ControlTensors.row_spec(), tf.TensorSpec([None], tf.int32), processors.Tally.spec()]
        self._first = tf.function(self._draw, autograph=False, input_signature=signature)
        if getattr(engine, "host_loop", False):  # LiteRT: the step runs from Python, the draw compiled
            self._advance = self._host_step_and_draw
        else:
            self._advance = tf.function(self._step_and_draw, autograph=False, input_signature=[
                tf.TensorSpec([None], tf.int32), engine.state_spec, tf.TensorSpec([], tf.int32),
                tf.TensorSpec([None], tf.int32), *signature[1:]])

    def _reset(self):
        self.rows, self._state, self._pos = [], None, 0  # _pos: where the rows' pending tokens will be written
        self._tally = self._tensors = self._token = None  # the rows', built when they change

    def cache_bytes(self):
        """The most the running batch's cache holds: max_rows rows of the whole window."""
        return self.max_rows * self.n_ctx * self.engine.cache_bytes_per_position()

    def _draw(self, logits, knobs, n_logprobs, controls, word_rows, tally):
        return draw_rows(logits, knobs, n_logprobs, controls, word_rows, tally, self.eot_token)

    def _step_and_draw(self, token, state, pos, pad, knobs, n_logprobs, controls, word_rows, tally):
        logits, state = self.engine.step(token, pos, pad, state)
        draw, tally = self._draw(logits, knobs, n_logprobs, controls, word_rows, tally)
        return draw, state, tally, knobs.index + 1

    def _host_step_and_draw(self, token, state, pos, pad, knobs, n_logprobs, controls, word_rows, tally):
        logits, state = self.engine.step(token, pos, pad, state)
        draw, tally = self._first(tf.constant(logits), knobs, n_logprobs, controls, word_rows, tally)
        return draw, state, tally, knobs.index + 1

    def submit(self, rows):
        """Queues rows; they join the batch in order, between steps, as room allows."""
        for row in rows:
            if len(row.prompt) + row.max_new_tokens - 1 > self.n_ctx:
                raise UserError(f"a prompt of {len(row.prompt)} tokens and {row.max_new_tokens} new ones do not fit "
                                f"the window of {self.n_ctx}: the batch does not slide it")
        with self._changed:
            if self._stopping:
                raise RuntimeError("the batcher is stopping")
            self._waiting.extend(rows)
            self._changed.notify()

    def load(self):
        """Rows decoding (ended ones not counted) and rows waiting."""
        return len(self._live()), len(self._waiting)

    def _live(self):
        return [r for r in self.rows if not r.ended]

    def start(self):
        self._thread = threading.Thread(target=self.run, name="batcher", daemon=True)
        self._thread.start()

    def stop(self):
        """Ends `run` once the rows in flight have ended, and waits for it."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()

    def run(self):
        while True:
            with self._changed:
                while not self.rows and not self._waiting and not self._stopping:
                    self._changed.wait()
                if self._stopping and not self.rows and not self._waiting:
                    return
            try:
                self._end_rows()
                self._admit()
                if self._live():
                    self._step()
            except Exception:  # a failed step ends its rows, not the server
                import traceback

                traceback.print_exc()
                for row in self._live():
                    self._end(row, "error")
                self._reset()

    def _row_tensors(self, rows):
        # An ended row's controls are off: once the live rows' are, the processors are skipped.
        controls, word_rows = processors.row_tensors([processors.Controls() if r.ended else r.controls for r in rows],
                                                     self.n_vocab)
        knobs = RowKnobs(tf.constant([r.knobs.temperature for r in rows], tf.float32),
                         tf.constant([r.knobs.top_k for r in rows], tf.int32),
                         tf.constant([r.knobs.top_p for r in rows], tf.float32),
                         tf.constant([r.knobs.seed for r in rows], tf.int64),
                         tf.constant([r.generated for r in rows], tf.int32))
        return RowTensors(knobs, tf.constant(max(r.knobs.logprobs for r in rows), tf.int32), controls, word_rows,
                          tf.constant([r.pad for r in rows], tf.int32))

    def _fitted(self, rows, tallies):
        """The tallies (of `rows`, in order) as one, as wide and deep as the rows' controls need."""
        width, depth = processors.rows_shape([processors.Controls() if r.ended else r.controls for r in rows],
                                             self.n_vocab)
        return processors.Tally(*(tf.concat(parts, axis=0) for parts in zip(*(t.fit(width, depth) for t in tallies))))

    def _take(self, rows, draw):
        """Hands each row its token; a row that ends there is marked. Ended rows get none."""
        token, logprob, top, top_ids = (d.numpy() for d in draw)
        for i, row in enumerate(rows):
            if row.ended:
                continue
            row.token = int(token[i])
            row.generated += 1
            self.stats["tokens"] += 1
            report = None
            if row.knobs.logprobs >= 0:
                n = row.knobs.logprobs
                report = (float(logprob[i]), list(zip(top_ids[i, :n].tolist(), top[i, :n].tolist())))
            stops = row.on_token(row, row.token, report)
            if row.token == self.eot_token or stops:
                row.ended = "stop"
            elif row.left() == 0:
                row.ended = "length"
            if row.ended:
                self._end(row, row.ended)

    def _step(self):
        t = self._tensors
        draw, self._state, self._tally, index = self._advance(self._token, self._state, tf.constant(self._pos), t.pad,
                                                              t.knobs, t.n_logprobs, t.controls, t.word_rows,
                                                              self._tally)
        self._token = draw.token
        self._tensors = t._replace(knobs=t.knobs._replace(index=index))
        self._pos += 1
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self._live()))
        self._take(self.rows, draw)

    def _end(self, row, reason):
        row.ended = row.ended or reason
        self.stats[f"ended_{row.ended}"] += 1
        row.on_end(row, row.ended)

    def _end_rows(self):
        """Ends cancelled rows; compacts the cache when ended rows are half the batch and none is
        waiting (a row joining compacts it anyway): ended rows stay in it till then, as moving
        the cache costs more than a few steps' idle rows."""
        for row in self._live():
            if row.cancelled:
                self._end(row, "cancelled")
        live = self._live()
        if not live:
            self._reset()
        elif len(live) <= len(self.rows) // 2 and not self._waiting:
            pos, shift, capacity = self._layout(self._pos, [])
            state, tally = self._move_running(pos, shift, capacity)
            self._settle(state, pos - shift, [tally])

    def _move_running(self, pos, shift, capacity):
        """Drops the ended rows of the running batch and moves the others where `_layout` put
        them: the cache and tally of those left (None when none is)."""
        live = [i for i, r in enumerate(self.rows) if not r.ended]
        moved = None, None
        if live:
            moved = (self.engine.rearrange(self._state, len(self.rows), live, self._pos - pos + shift, capacity),
                     _gather(self._tally, live))
            for i in live:
                self.rows[i].pad += pos - self._pos - shift
        self.rows = [self.rows[i] for i in live]
        return moved

    def _settle(self, state, pos, tallies):
        """Makes `state` the running batch's cache, its rows' pending tokens written at `pos`, and
        builds what the steps take of the rows, `tallies` (theirs, in order) as one."""
        self._state, self._pos = state, pos
        self._tally = self._fitted(self.rows, tallies)
        self._tensors = self._row_tensors(self.rows)
        self._token = tf.constant([r.token for r in self.rows], tf.int32)

    def _layout(self, longest, joining):
        """Where the batch goes if `joining` rows, prefilled over `longest` positions, join it:
        every live row moves right to a shared position `pos`, then all left by `shift`, the
        smallest padding; and the capacity that leaves room for every row's tokens to come."""
        live = self._live()
        pos = max(self._pos, longest)
        pads = [r.pad + pos - self._pos for r in live] + [pos - len(r.prompt) for r in joining]
        shift = min(pads)
        # Joining rows draw their first token from the prefill; the last token is never fed back.
        left = [r.left() for r in live] + [r.max_new_tokens - max(r.generated, 1) for r in joining]
        return pos, shift, pos - shift + max(left)

    def _admissible(self):
        """The waiting rows that can join now, in order: the batch's size and the window bound them."""
        with self._changed:
            for row in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(row)
                self._end(row, "cancelled")
            joining, live = [], len(self._live())
            for row in self._waiting:
                if live + len(joining) >= self.max_rows:
                    break
                candidates = joining + [row]
                if self._layout(max(len(r.prompt) for r in candidates), candidates)[2] > self.n_ctx:
                    break
                joining = candidates
            for _ in joining:
                self._waiting.popleft()
            return joining

    def _admit(self):
        joining = self._admissible()
        if not joining:
            return
        longest = max(len(r.prompt) for r in joining)
        tokens = tf.constant([[self.eot_token] * (longest - len(r.prompt)) + r.prompt for r in joining], tf.int32)
        for row in joining:
            row.pad = longest - len(row.prompt)
        joined = self._row_tensors(joining)
        logits, state = self.engine.prefill(tokens, joined.pad, tf.constant(longest))
        self.stats["prefilled_rows"] += len(joining)
        tally = self._fitted(joining, [r.controls.tally([r.prompt], self.n_vocab) for r in joining])
        draw, tally = self._first(logits, joined.knobs, joined.n_logprobs, joined.controls, joined.word_rows, tally)
        self._take(joining, draw)
        staying = [i for i, r in enumerate(joining) if not r.ended]
        if not staying:
            return
        prefilled, joining = len(joining), [joining[i] for i in staying]
        pos, shift, capacity = self._layout(longest, joining)
        state = self.engine.rearrange(state, prefilled, staying, longest - pos + shift, capacity)
        for row in joining:
            row.pad += pos - longest - shift
        # Ended rows leave here too: the running rows are moved once either way.
        running, running_tally = self._move_running(pos, shift, capacity)
        tallies = [_gather(tally, staying)]
        if running is not None:
            state = self.engine.concat(running, state, capacity)
            tallies.insert(0, running_tally)
        self.rows += joining
        self._settle(state, pos - shift, tallies)
