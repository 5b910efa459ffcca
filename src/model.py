"""The GPT-2 transformer on TensorFlow 2, reading the released checkpoints unchanged.

Two ways in:
- `lm(tokens, past=None)` is the reference's `model()`: logits for every position and the
  `present` keys/values, `[batch, n_layer, 2, n_head, sequence, head_dim]`, to pass back as `past`.
- `prefill` / `decode_step` serve the sampler: keys/values live in a preallocated cache per layer
  that each step updates in place, so a decode step costs the same at position 10 and 1000
  apart from attention itself.
"""
import collections
import functools
import math

import cli  # noqa: F401  (sets TensorFlow's environment before TensorFlow loads)
import tensorflow as tf

import checkpoint
import hparams as hparams_lib
from hparams import HParams  # noqa: F401  (re-exported: model.HParams is the config users know)


def norm(x, g, b, epsilon=1e-5):
    """LayerNorm over the last axis with the biased variance, as the reference computes it."""
    centered = x - tf.reduce_mean(x, axis=-1, keepdims=True)
    s = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
    return centered * tf.math.rsqrt(s + epsilon) * g + b


def gelu(x):
    """The tanh approximation GPT-2 was trained with."""
    return 0.5 * x * (1 + tf.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * (x * x * x))))


def dense(x, w, b, compute_dtype, transposed):
    """x [N, in] float32 times the dense weight w ([out, in] if transposed, else [in, out]) plus
    bias b, with the product in compute_dtype; float32 [N, out]."""
    y = tf.matmul(tf.cast(x, compute_dtype), tf.cast(w, compute_dtype), transpose_b=transposed)
    return tf.cast(y, tf.float32) + b


# One-row decode pieces for 16-bit weights, compiled with XLA. On one row XLA's bfloat16
# matrix-vector products stream the weights ~1.8x faster than TensorFlow's oneDNN kernels
# (batch-1 bf16 decoding 72 -> 113 tok/s on a 2-core AVX-512 BF16 EPYC); for float32 they are
# level, and at 8 rows XLA is 2-4x slower, so other shapes stay on TensorFlow's kernels.
# Weights come in as arguments, so all layers share one compiled program per piece. The decode
# step at other shapes runs the same two functions uncompiled.
def _attention_input(x, ln, attn, compute_dtype, transposed):
    return dense(norm(x, *ln), *attn, compute_dtype, transposed)


def _block_rest(x, a, proj, ln_2, fc, fc_proj, compute_dtype, transposed):
    x = x + dense(a, *proj, compute_dtype, transposed)
    return x + dense(gelu(dense(norm(x, *ln_2), *fc, compute_dtype, transposed)), *fc_proj, compute_dtype, transposed)


@functools.partial(tf.function, jit_compile=True, autograph=False)
def _row_first(x, ln, attn, compute_dtype, transposed):
    return _attention_input(x, ln, attn, compute_dtype, transposed)


@functools.partial(tf.function, jit_compile=True, autograph=False)
def _row_block_then_next(x, a, block, next_ln, next_attn, compute_dtype, transposed):
    x = _block_rest(x, a, *block, compute_dtype, transposed)
    return x, _attention_input(x, next_ln, next_attn, compute_dtype, transposed)


@functools.partial(tf.function, jit_compile=True, autograph=False)
def _row_block_then_logits(x, a, block, ln_f, wte, compute_dtype, transposed):
    x = norm(_block_rest(x, a, *block, compute_dtype, transposed), *ln_f)
    return tf.cast(tf.matmul(tf.cast(x, compute_dtype), tf.cast(wte, compute_dtype), transpose_b=True), tf.float32)


def keep_mask(query_pos, n_keys, pad):
    """Which keys each query may attend to: earlier or same positions, not left padding.

    Returns:
        float32 [B, 1, T, S], 1 to keep; query_pos [T], pad [B], S = n_keys.
    """
    key_pos = tf.range(n_keys)
    keep = tf.logical_and(key_pos[None, None, :] <= query_pos[None, :, None],  # causal [1, T, S]
                          key_pos[None, None, :] >= pad[:, None, None])  # not padding [B, 1, S]
    return tf.cast(keep, tf.float32)[:, None]


class Mask(collections.namedtuple("Mask", "keep bias")):
    """The reference's attention mask, `w * keep - 1e10 * (1 - keep)`, split so the second term
    is computed once per pass instead of once per layer (w * keep + bias rounds the same)."""

    @classmethod
    def of(cls, keep):
        return cls(keep, -1e10 * (1 - keep))


def small_matmul(a, b, transpose_b=False):
    """Batched product for attention's many small matrices. float32 goes through BatchMatMulV3,
    which oneDNN does not take over: Eigen's kernel is ~2x faster on decode rows (0.03 against
    0.06 ms a layer at batch 1, 160 keys). oneDNN stays faster for bfloat16."""
    if a.dtype != tf.float32:
        return tf.matmul(a, b, transpose_b=transpose_b)
    return tf.raw_ops.BatchMatMulV3(x=a, y=b, Tout=tf.float32, adj_y=transpose_b)


def softmax(x):
    """The reference's own softmax. Bit-for-bit the reference's, and on a decode step's small
    rows faster than tf.nn.softmax, whose oneDNN kernel costs ~0.1 ms a call on CPU."""
    e = tf.exp(x - tf.reduce_max(x, axis=-1, keepdims=True))
    return e / tf.reduce_sum(e, axis=-1, keepdims=True)


def is_matrix(name):
    """Whether a variable is a matrix the model multiplies by (stored in the compute dtype)."""
    return name.endswith("/w") or name == "model/wte"


def is_transposed(dtype):
    """Whether dense weights stored in `dtype` are held as [out, in] (16-bit) rather than in the
    released [in, out] (float32). Measured on a decode step's chain of products at 1 and 8 rows
    (2-core AVX-512 BF16 EPYC, oneDNN): float32 is fastest as x @ w on [in, out]; bfloat16 as
    x @ w^T on [out, in], 1.2-1.4x faster than bfloat16 x @ w and than float32."""
    return tf.as_dtype(dtype) != tf.float32


def to_model_layout(name, value, dtype=tf.float32):
    """A variable as the checkpoint holds it -> as a model storing matrices in `dtype` holds it:
    dense weights, [1, in, out] in the checkpoint, become [in, out], or [out, in] for 16 bits."""
    if not name.endswith("/w"):
        return value
    value = tf.squeeze(value, 0)
    return tf.transpose(value) if is_transposed(dtype) else value


def to_checkpoint_layout(name, value, dtype=tf.float32):
    """The inverse of `to_model_layout`."""
    if not name.endswith("/w"):
        return value
    return (tf.transpose(value) if is_transposed(dtype) else value)[None]


class GPT2(tf.Module):
    """GPT-2 with its variables under the released checkpoint names and shapes, less the dense
    weights' leading 1, and transposed when stored in 16 bits (see `is_transposed`;
    `checkpoint_weights()` gives the released layout).

    Args:
        hparams: An `HParams`.
        weights: Checkpoint name -> tensor or array in the released layout, as
            `checkpoint.read_weights` returns; a `checkpoint.CheckpointWeights` reads them one at
            a time, so the model never holds two copies.
        compute_dtype: tf.float32 (exact), or tf.bfloat16 (or tf.float16) for the matrix
            products, with norms, softmax and logits kept in float32.
        float32_variables: Keep every variable in float32 and cast matrices to `compute_dtype`
            where they are used (mixed-precision training); by default matrices are stored in
            `compute_dtype`, which halves inference memory.
    """

    def __init__(self, hparams, weights, compute_dtype=tf.float32, float32_variables=False):
        super().__init__(name="model")
        self.hparams = hparams
        self.compute_dtype = tf.as_dtype(compute_dtype)
        found = getattr(weights, "shapes", None) or {n: list(w.shape) for n, w in weights.items()}
        problem = checkpoint.compare_shapes(checkpoint.variable_shapes(hparams), found)
        if problem:
            raise ValueError(f"weights do not match hparams: {problem}")
        # Matrices are stored in the compute dtype; norms and biases stay float32.
        self.matrix_dtype = tf.float32 if float32_variables else self.compute_dtype
        self.transposed = is_transposed(self.matrix_dtype)
        self.weights = {}
        for name in checkpoint.variable_shapes(hparams):
            value = weights[name]
            dtype = self.matrix_dtype if is_matrix(name) else tf.float32
            if tf.as_dtype(getattr(value, "dtype", tf.float32)) != dtype:
                value = tf.cast(value, dtype)
            self.weights[name] = tf.Variable(to_model_layout(name, value, self.matrix_dtype), trainable=True,
                                             name=name)
        self._hidden_states = tf.function(
            lambda tokens, pad: self._forward(tokens, pad, return_hidden=True), autograph=False,
            input_signature=[tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)])
        cache_spec = [tf.TensorSpec([None, hparams.head_dim], self.compute_dtype)] * hparams.n_layer
        self.step = tf.function(self._step, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([None], tf.int32),
            cache_spec])
        self._step_one = tf.function(self._step, autograph=False, input_signature=[
            tf.TensorSpec([1, 1], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([1], tf.int32),
            cache_spec])
        self._forward_no_past = tf.function(self._forward, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)])
        self._forward_with_past = tf.function(self._forward_past, autograph=False, input_signature=[
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None, hparams.n_layer, 2, hparams.n_head, None, hparams.head_dim], tf.float32),
            tf.TensorSpec([None], tf.int32)])

    def __call__(self, tokens, past=None):
        """The reference's `model()`: logits and presents for `tokens` [batch, sequence] int32."""
        tokens = tf.convert_to_tensor(tokens, tf.int32)
        pad = tf.zeros([tf.shape(tokens)[0]], tf.int32)
        if past is None:
            logits, present = self._forward_no_past(tokens, pad)
        else:
            logits, present = self._forward_with_past(tokens, tf.convert_to_tensor(past, tf.float32), pad)
        return {"logits": logits, "present": present}

    def checkpoint_weights(self):
        """Checkpoint name -> tensor in the released layout, what a checkpoint of this model holds."""
        return {name: to_checkpoint_layout(name, v, self.matrix_dtype) for name, v in self.weights.items()}

    # --- shared pieces -------------------------------------------------------------------

    def _w(self, name):
        return self.weights["model/" + name]

    def _linear(self, x, scope):
        """x [..., in] times the dense weight plus bias."""
        w = self._w(scope + "/w")
        n_out, n_in = w.shape if self.transposed else reversed(w.shape)
        flat = x if x.shape.rank == 2 else tf.reshape(x, [-1, n_in])
        y = dense(flat, w, self._w(scope + "/b"), self.compute_dtype, self.transposed)
        return y if x.shape.rank == 2 else tf.reshape(y, tf.concat([tf.shape(x)[:-1], [n_out]], 0))

    def _norm(self, x, scope):
        return norm(x, self._w(scope + "/g"), self._w(scope + "/b"))

    def _mlp(self, x, layer):
        h = gelu(self._linear(self._norm(x, f"h{layer}/ln_2"), f"h{layer}/mlp/c_fc"))
        return self._linear(h, f"h{layer}/mlp/c_proj")

    def _embed(self, tokens, positions):
        # Gather from dense reads: a gather on the variable itself (ResourceGather) switches it
        # to copy-on-read, after which every dense read copies the whole matrix.
        wte, wpe = (tf.convert_to_tensor(self._w(n)) for n in ("wte", "wpe"))
        return tf.cast(tf.gather(wte, tokens), tf.float32) + tf.gather(wpe, positions)

    def _logits(self, h):
        """Output logits through the tied embedding, [..., n_vocab] float32."""
        wte = tf.cast(self._w("wte"), self.compute_dtype)
        flat = tf.reshape(tf.cast(h, self.compute_dtype), [-1, self.hparams.n_embd])
        logits = tf.cast(tf.matmul(flat, wte, transpose_b=True), tf.float32)
        return tf.reshape(logits, tf.concat([tf.shape(h)[:-1], [self.hparams.n_vocab]], 0))

    def _attend(self, q, k, v, mask, decoding=False):
        """Masked softmax attention. q [B, H, T, D], k/v [B, H, S, D], mask a `Mask` broadcastable to
        [B, H, T, S]. The full pass and training keep tf.nn.softmax, whose gradient is one kernel;
        decode steps take the forms measured faster on their few query rows (see `small_matmul`)."""
        dtype = self.compute_dtype
        matmul = small_matmul if decoding else tf.matmul
        w = matmul(tf.cast(q, dtype), tf.cast(k, dtype), transpose_b=True)
        w = tf.cast(w, tf.float32) * tf.math.rsqrt(tf.constant(self.hparams.head_dim, tf.float32))
        # The reference's masking, so masked positions get exactly zero weight.
        w = w * mask.keep + mask.bias
        w = softmax(w) if decoding else tf.nn.softmax(w, axis=-1)
        return tf.cast(matmul(tf.cast(w, dtype), tf.cast(v, dtype)), tf.float32)

    def _split_heads(self, x):
        hp = self.hparams
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        return tf.transpose(tf.reshape(x, [b, t, hp.n_head, hp.head_dim]), [0, 2, 1, 3])  # [B, H, T, D]

    def _merge_heads(self, x):
        b, t = tf.shape(x)[0], tf.shape(x)[2]
        return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [b, t, self.hparams.n_embd])  # [B, T, d]

    # --- full pass (the reference's model()) ---------------------------------------------

    def _forward_past(self, tokens, past, pad):
        return self._forward(tokens, pad, past)

    def hidden_states(self, tokens):
        """The residual stream of tokens [B, T]: the embeddings, then each block's output, the
        last after the final LayerNorm; n_layer + 1 float32 tensors of [B, T, n_embd]."""
        tokens = tf.convert_to_tensor(tokens, tf.int32)
        return self._hidden_states(tokens, tf.zeros([tf.shape(tokens)[0]], tf.int32))

    def _forward(self, tokens, pad, past=None, return_hidden=False):
        """Logits [B, T, V] and present [B, L, 2, H, T, D] for tokens [B, T] after `past`.

        `pad` [B] counts left-padding tokens per row: they get no attention and positions
        start after them, so prompts of different lengths share a batch.
        """
        hp = self.hparams
        t = tf.shape(tokens)[1]
        past_len = 0 if past is None else tf.shape(past)[-2]
        query_pos = tf.range(t) + past_len  # [T]
        positions = tf.maximum(query_pos[None, :] - pad[:, None], 0)  # [B, T]
        mask = Mask.of(keep_mask(query_pos, past_len + t, pad))
        h = self._embed(tokens, positions)
        presents, hidden = [], [h]
        for i in range(hp.n_layer):
            h, present = self._block(h, i, mask, None if past is None else past[:, i])
            presents.append(present)
            hidden.append(h)
        h = self._norm(h, "ln_f")
        if return_hidden:
            return hidden[:-1] + [h]
        present = tf.stack(presents, axis=1)  # [B, L, 2, H, T, D]
        return self._logits(h), present

    # --- training -------------------------------------------------------------------------

    def training_logits(self, tokens, recompute=False, skip_last=False):
        """Logits [B, T, V] float32 of a full pass with no cache, for training.

        With `recompute`, backpropagation keeps only each block's input and recomputes the
        block's activations (the fork's memory_saving_gradients): less memory for more compute.
        `skip_last` leaves out the last position's logits ([B, T-1, V]), which predict past the
        window and have no target.
        """
        t = tf.shape(tokens)[1]
        positions = tf.range(t)
        mask = Mask.of(keep_mask(positions, t, tf.zeros([1], tf.int32)))  # [1, 1, T, T]
        h = self._embed(tokens, positions[None, :])
        for i in range(self.hparams.n_layer):
            block = functools.partial(self._block_output, layer=i, mask=mask)
            h = tf.recompute_grad(block)(h) if recompute else block(h)
        if skip_last:
            h = h[:, :-1]
        return self._logits(self._norm(h, "ln_f"))

    def _block_output(self, h, layer, mask):
        return self._block(h, layer, mask)[0]

    def _block(self, h, layer, mask, past=None):
        """One transformer block over h [B, T, d] after `past` [B, 2, H, S, D] keys and values;
        returns the new h and this block's keys and values [B, 2, H, T, D]."""
        qkv = self._linear(self._norm(h, f"h{layer}/ln_1"), f"h{layer}/attn/c_attn")
        q, k, v = (self._split_heads(x) for x in tf.split(qkv, 3, axis=2))
        present = tf.stack([k, v], axis=1)
        if past is not None:
            k = tf.concat([past[:, 0], k], axis=-2)
            v = tf.concat([past[:, 1], v], axis=-2)
        h = h + self._linear(self._merge_heads(self._attend(q, k, v, mask)), f"h{layer}/attn/c_proj")
        return h + self._mlp(h, layer), present

    # --- cached decoding (the sampler's hot path) ----------------------------------------

    def _step(self, tokens, pos, pad, caches):
        """Runs tokens [B, T] at positions pos..pos+T-1 against the caches, writing their keys
        and values into them in place; returns the last position's logits [B, V] and the caches.

        The prompt (T = its length) and each new token (T = 1) go through this one function, so
        it is traced once. The caches are updated with InplaceUpdate, which reuses the buffer:
        safe only because no other reference to a cache outlives the step.
        """
        hp = self.hparams
        b, t = tf.shape(tokens)[0], tf.shape(tokens)[1]
        capacity = tf.shape(caches[0])[0] // (2 * b * hp.n_head)
        query_pos = pos + tf.range(t)  # [T]
        mask = Mask.of(keep_mask(query_pos, capacity, pad))
        # Flat cache rows for these positions: (kv, batch, head) blocks of `capacity` rows each.
        rows = tf.reshape(tf.range(2 * b * hp.n_head)[:, None] * capacity + query_pos[None, :], [-1])
        h = self._embed(tokens, tf.maximum(query_pos[None, :] - pad[:, None], 0))  # [B, T, d]
        x = tf.reshape(h, [b * t, hp.n_embd])  # rows, so each dense layer is one 2-D product
        # Shapes and permutations built once, not once per layer: every node in the graph costs
        # time on each decode step, and most of a batch-1 step's nodes were such constants.
        qkv_shape = tf.stack([b, t, 3, hp.n_head, hp.head_dim])
        cache_shape = tf.stack([2, b, hp.n_head, capacity, hp.head_dim])
        rows_shape = tf.stack([b * t, hp.n_embd])
        row_shape = tf.constant([-1, hp.head_dim])
        to_heads, from_heads = tf.constant([2, 0, 3, 1, 4]), tf.constant([0, 2, 1, 3])
        # One row of 16-bit weights (batch-1 decoding): the dense work between attentions runs
        # as XLA-compiled pieces (see `_row_first`).
        one_row = self.transposed and tokens.shape[0] == 1 and tokens.shape[1] == 1
        kinds = (self.compute_dtype, self.transposed)
        if one_row:
            qkv = _row_first(x, self._pair("h0/ln_1"), self._pair("h0/attn/c_attn"), *kinds)
        new_caches = []
        for i in range(hp.n_layer):
            if not one_row:
                qkv = _attention_input(x, self._pair(f"h{i}/ln_1"), self._pair(f"h{i}/attn/c_attn"), *kinds)
            # Split along the outer axis, which takes views instead of copies.
            q, kv = tf.split(tf.transpose(tf.reshape(qkv, qkv_shape), to_heads), [1, 2])  # [3, B, H, T, D]
            cache = tf.raw_ops.InplaceUpdate(x=caches[i], i=rows, v=tf.cast(tf.reshape(kv, row_shape), caches[i].dtype))
            new_caches.append(cache)
            k, v = tf.unstack(tf.reshape(cache, cache_shape))  # [B, H, capacity, D] each
            a = self._attend(tf.squeeze(q, 0), k, v, mask, decoding=True)  # [B, H, T, D]
            a = tf.reshape(tf.transpose(a, from_heads), rows_shape)
            if not one_row:
                x = _block_rest(x, a, *self._block_rest_weights(i), *kinds)
            elif i + 1 < hp.n_layer:
                x, qkv = _row_block_then_next(x, a, self._block_rest_weights(i), self._pair(f"h{i + 1}/ln_1"),
                                              self._pair(f"h{i + 1}/attn/c_attn"), *kinds)
            else:
                return _row_block_then_logits(x, a, self._block_rest_weights(i), self._pair("ln_f"),
                                              self._read("wte"), *kinds), new_caches
        last = self._norm(tf.reshape(x, tf.stack([b, t, hp.n_embd]))[:, -1], "ln_f")  # [B, d]
        return self._next_logits(last), new_caches

    def _read(self, name):
        # XLA-compiled pieces get values read outside them, not the variables: launched with
        # variable handles, bf16 batch 1 measured 84-112 tok/s against 115-119 (four rounds each).
        # TensorFlow's own kernels read a variable the same way.
        return tf.convert_to_tensor(self._w(name))

    def _pair(self, scope):
        """A norm's (g, b) or a dense layer's (w, b), as the decode step's pieces take them."""
        first = "g" if scope.endswith(("ln_1", "ln_2", "ln_f")) else "w"
        return self._read(f"{scope}/{first}"), self._read(f"{scope}/b")

    def _block_rest_weights(self, layer):
        return tuple(self._pair(f"h{layer}/{scope}") for scope in ("attn/c_proj", "ln_2", "mlp/c_fc", "mlp/c_proj"))

    def _next_logits(self, h):
        """Logits [B, V] float32 for h [B, d], in the form measured fastest for each dtype at 1-8
        rows: float32 as wte @ h^T (~1.8x faster than h @ wte^T at 8 rows), 16 bits as h @ wte^T
        (~1.7x faster than wte @ h^T)."""
        wte = tf.cast(self._w("wte"), self.compute_dtype)
        h = tf.cast(h, self.compute_dtype)
        if self.transposed:
            return tf.cast(tf.matmul(h, wte, transpose_b=True), tf.float32)
        return tf.transpose(tf.cast(tf.matmul(wte, h, transpose_b=True), tf.float32))

    def prefill(self, tokens, pad, capacity):
        """Runs the prompt and returns the last position's logits and a decode cache.

        Args:
            tokens: [B, T] int32, rows left-padded by `pad` [B].
            capacity: positions the cache holds (prompt plus new tokens), at most n_ctx.

        Returns:
            (logits [B, V] float32, caches): one flat tensor per layer, [2*B*H*capacity, D],
            viewed as [2, B, H, capacity, D].
        """
        hp = self.hparams
        rows = 2 * tf.shape(tokens)[0] * hp.n_head * capacity
        # Empty is stateful, so graph rewrites never merge the layers' caches into one buffer
        # (identical tf.zeros would be), which in-place updates would then share.
        caches = [tf.raw_ops.Empty(shape=tf.stack([rows, hp.head_dim]), dtype=self.compute_dtype, init=True)
                  for _ in range(hp.n_layer)]
        return self.step(tokens, tf.constant(0), pad, caches)

    def decode_step(self, token, pos, pad, caches):
        """One token per row, token [B] at position `pos`: next-token logits [B, V] and the caches."""
        step = self._step_one if self.transposed and token.shape[0] == 1 else self.step
        return step(token[:, None], pos, pad, caches)


def load_model(model_name="124M", models_dir="models", dtype="float32"):
    """Loads a model directory in the released format.

    Args:
        model_name: A directory under `models_dir`; legacy names 117M and 345M mean 124M and 355M.
        models_dir: The directory holding model directories.
        dtype: 'float32' (default, exact) or 'bfloat16' (weights and matrix products in bf16).

    Returns:
        A `GPT2` with `.hparams`.
    """
    path = hparams_lib.model_dir(model_name, models_dir)
    hp = checkpoint.load_hparams(path)
    compute_dtype = parse_dtype(dtype)
    lm = GPT2(hp, checkpoint.CheckpointWeights(path, hp), compute_dtype=compute_dtype)
    lm.path = path
    return lm


def parse_dtype(dtype):
    from cli import UserError

    names = {"float32": tf.float32, "fp32": tf.float32, "bfloat16": tf.bfloat16, "bf16": tf.bfloat16}
    if isinstance(dtype, tf.DType):
        return dtype
    if str(dtype) not in names:
        raise UserError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    return names[str(dtype)]
