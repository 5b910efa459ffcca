"""Cached decoding, the engine the sampler drives: the prompt's pass, then one step per token.

Keys and values live in a `KVCache` written in place, so a step costs the same at position 10
and at 1000, apart from attention itself. `Decoder` implements the engine interface, which a
second engine implements too: `hparams`, `state_spec`, `prefill(tokens, pad, capacity)` and
`step(token, pos, pad, state)`, each returning (logits [B, V] float32, state).

The forms chosen for speed on CPUs sit beside the model's plain ones, each with its reason;
DEVELOPERS.md has the figures and the commands that measure them.
"""
import functools
from typing import NamedTuple

import model
from model import attention_input, block_output, norm
from runtime import tf


def small_matmul(a, b, transpose_b=False):
    """Attention's batched products on decode rows. float32 goes through BatchMatMulV3, which
    oneDNN leaves to Eigen's kernel, faster on such small matrices; oneDNN is faster for 16 bits."""
    if a.dtype != tf.float32:
        return tf.matmul(a, b, transpose_b=transpose_b)
    return tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=tf.float32, adj_y=transpose_b)


def next_logits(h, wte):
    """Logits [B, V] for h [B, d]; float32 as (wte @ h^T)^T, faster than h @ wte^T at a few rows."""
    if wte.dtype != tf.float32:
        return model.logits(h, wte)
    return tf.transpose(tf.matmul(wte, h, transpose_b=True))


# One-row pieces for 16-bit weights, compiled with XLA, whose matrix-vector products stream
# bf16 weights faster than oneDNN's; weights are arguments, so every layer shares one program.
@functools.partial(tf.function, jit_compile=True, autograph=False)
def _row_first(x, p):
    return attention_input(x, p)


@functools.partial(tf.function, jit_compile=True, autograph=False)
def _row_block_then_next(x, a, p, next_p):
    x = block_output(x, a, p)
    return x, attention_input(x, next_p)


@functools.partial(tf.function, jit_compile=True, autograph=False)
def _row_block_then_logits(x, a, p, ln_f, wte):
    return model.logits(norm(block_output(x, a, p), ln_f), wte)


def _attention_part(p):
    return p._replace(attn_proj=None, ln_2=None, mlp_fc=None, mlp_proj=None)


def _rest_part(p):
    return p._replace(ln_1=None, attn=None)


class Slots(NamedTuple):
    """Where one step reads and writes every layer's cache, worked out once per step."""

    rows: tf.Tensor  # [2 * B * H * T] flat rows of the step's positions
    row_shape: tf.Tensor  # [-1, D]
    view_shape: tf.Tensor  # [2, B, H, capacity, D]
    capacity: tf.Tensor


class KVCache:
    """The decode cache's layout, the one place that knows it.

    Each layer's keys and values are one flat tensor [2 * B * H * capacity, D], viewed as
    [2, B, H, capacity, D], so one InplaceUpdate writes a step's rows into the same buffer:
    nothing may hold a layer's tensor across a step.
    """

    def __init__(self, hparams, dtype):
        self.n_layer, self.n_head, self.head_dim = hparams.n_layer, hparams.n_head, hparams.head_dim
        self.dtype = dtype

    def spec(self):
        """The state's `tf.TensorSpec`s, one per layer."""
        return [tf.TensorSpec([None, self.head_dim], self.dtype)] * self.n_layer

    def allocate(self, batch, capacity):
        rows = 2 * batch * self.n_head * capacity
        # Empty is stateful, so graph rewrites never merge the layers' caches into one buffer
        # (identical tf.zeros would be), which in-place updates would then share.
        return [tf.raw_ops.Empty(shape=tf.stack([rows, self.head_dim]), dtype=self.dtype, init=True)
                for _ in range(self.n_layer)]

    def slots(self, state, batch, positions):
        """The `Slots` of `positions` [T] in a state allocated for `batch` rows."""
        capacity = tf.shape(state[0])[0] // (2 * batch * self.n_head)
        rows = tf.reshape(tf.range(2 * batch * self.n_head)[:, None] * capacity + positions[None, :], [-1])
        view_shape = tf.stack([2, batch, self.n_head, capacity, self.head_dim])
        return Slots(rows, tf.constant([-1, self.head_dim]), view_shape, capacity)

    def write(self, layer, slots, kv):
        """Writes kv [2, B, H, T, D] into one layer's tensor; returns it, updated."""
        return tf.raw_ops.InplaceUpdate(x=layer, i=slots.rows, v=tf.cast(tf.reshape(kv, slots.row_shape), self.dtype))

    def view(self, layer, slots):
        """Keys and values [B, H, capacity, D] of one layer's tensor."""
        return tf.unstack(tf.reshape(layer, slots.view_shape))

    def rearrange(self, state, batch, rows, start, capacity):
        """A new state holding `rows` (indices into a state of `batch` rows), with each one's
        positions start..start+capacity-1 as 0..capacity-1: how a running batch drops rows,
        shifts its positions and grows or shrinks its room. Positions the old state lacked
        copy a neighbour's values: they are masked or written before any step reads them.

        One gather a layer: every flat row of the new state names the old row it copies.
        """
        old = state[0].shape[0] // (2 * batch * self.n_head)
        kv_head = tf.range(2)[:, None, None] * batch + tf.convert_to_tensor(rows)[None, :, None]  # [2, B', 1]
        kv_head = kv_head * self.n_head + tf.range(self.n_head)[None, None, :]  # [2, B', H]
        positions = tf.clip_by_value(tf.range(start, start + capacity), 0, old - 1)  # [capacity]
        flat = tf.reshape(kv_head[..., None] * old + positions, [-1])  # [2 * B' * H * capacity]
        return [tf.gather(layer, flat) for layer in state]

    def concat(self, first, second, capacity):
        """The rows of two states of `capacity` positions in one state, first's rows first."""
        def view(layer):
            return tf.reshape(layer, [2, -1, self.n_head, capacity, self.head_dim])  # [2, B, H, capacity, D]

        return [tf.reshape(tf.concat([view(a), view(b)], axis=1), [-1, self.head_dim]) for a, b in zip(first, second)]


class Decoder:
    """Cached decoding of a `model.GPT2` (the engine interface above)."""

    def __init__(self, lm):
        self.lm = lm
        self.hparams = lm.hparams
        self.cache = KVCache(lm.hparams, lm.compute_dtype)
        self.state_spec = self.cache.spec()
        # One trace serves every prompt length; 16-bit single rows get their own, whose static
        # shapes let the step take the compiled one-row pieces.
        self._one_row = tf.function(self._run, autograph=False, input_signature=self._signature(1))
        self._any = tf.function(self._run, autograph=False, input_signature=self._signature(None))

    def _signature(self, batch):
        tokens = [batch, 1] if batch else [None, None]
        return [tf.TensorSpec(tokens, tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([batch], tf.int32),
                self.state_spec]

    def prefill(self, tokens, pad, capacity):
        """Runs prompts tokens [B, T], left-padded by `pad` [B], into a new cache of `capacity`
        positions (prompt plus new tokens, at most n_ctx); the last position's logits and the state."""
        state = self.cache.allocate(tf.shape(tokens)[0], capacity)
        return self._any(tokens, tf.constant(0), pad, state)

    def step(self, token, pos, pad, state):
        """One token per row, token [B] at position `pos`: next-token logits [B, V] and the state."""
        one_row = self.lm.compute_dtype != tf.float32 and token.shape[0] == 1
        return (self._one_row if one_row else self._any)(token[:, None], pos, pad, state)

    def rearrange(self, state, batch, rows, start, capacity):
        """`KVCache.rearrange`: the state of some rows, their positions moved by `start`."""
        return self.cache.rearrange(state, batch, rows, start, capacity)

    def concat(self, first, second, capacity):
        """`KVCache.concat`: two states' rows in one."""
        return self.cache.concat(first, second, capacity)

    def cache_bytes_per_position(self):
        """What one row's cache takes per position: keys and values of every layer."""
        return 2 * self.hparams.n_layer * self.hparams.n_embd * self.cache.dtype.size

    def traces(self):
        """How many times each step function was traced (a retrace costs seconds)."""
        return {"step": self._any.experimental_get_tracing_count(),
                "step_one_row": self._one_row.experimental_get_tracing_count()}

    def _run(self, tokens, pos, pad, state):
        """tokens [B, T] at positions pos..pos+T-1: writes their keys and values into the state
        and returns the last position's logits [B, V] and the state."""
        hp, cache = self.hparams, self.cache
        b, t = tf.shape(tokens)[0], tf.shape(tokens)[1]
        query_pos = pos + tf.range(t)  # [T]
        slots = cache.slots(state, b, query_pos)
        mask = model.Mask.of(model.keep_mask(query_pos, slots.capacity, pad))
        w = self.lm.read()
        x = model.embed(w, tokens, tf.maximum(query_pos[None, :] - pad[:, None], 0))
        x = tf.reshape(x, [b * t, hp.n_embd])  # rows, so each dense layer is one 2-D product
        # Shapes built once, not once per layer: every node costs time on each step.
        qkv_shape = tf.stack([b, t, 3, hp.n_head, hp.head_dim])
        rows_shape = tf.stack([b * t, hp.n_embd])
        to_heads, from_heads = tf.constant([2, 0, 3, 1, 4]), tf.constant([0, 2, 1, 3])

        def attention(qkv, layer):
            # Split along the outer axis, which takes views instead of copies.
            q, kv = tf.split(tf.transpose(tf.reshape(qkv, qkv_shape), to_heads), [1, 2])  # [3, B, H, T, D]
            layer = cache.write(layer, slots, kv)
            k, v = cache.view(layer, slots)
            a = model.attend(tf.squeeze(q, 0), k, v, mask, dtype=self.lm.compute_dtype, matmul=small_matmul)
            return tf.reshape(tf.transpose(a, from_heads), rows_shape), layer

        one_row = self.lm.compute_dtype != tf.float32 and tokens.shape[0] == 1 and tokens.shape[1] == 1
        blocks, new_state = w.blocks, []
        # The compiled pieces get only the weights they read: every argument costs a little per call.
        qkv = _row_first(x, _attention_part(blocks[0])) if one_row else None
        for i, p in enumerate(blocks):
            if not one_row:
                qkv = attention_input(x, p)
            a, layer = attention(qkv, state[i])
            new_state.append(layer)
            if not one_row:
                x = block_output(x, a, p)
            elif i + 1 < len(blocks):
                x, qkv = _row_block_then_next(x, a, _rest_part(p), _attention_part(blocks[i + 1]))
            else:
                logits = _row_block_then_logits(x, a, _rest_part(p), w.ln_f, w.wte)
        if not one_row:
            logits = next_logits(norm(tf.reshape(x, tf.stack([b, t, hp.n_embd]))[:, -1], w.ln_f), w.wte)  # [B, V]
        return logits, new_state
