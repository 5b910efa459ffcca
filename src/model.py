"""The GPT-2 transformer on TensorFlow 2, written to read beside the reference's model.py.

norm, gelu, attention, the block and the logits are written once here and used by the full
pass, training and cached decoding (decode.py). `GPT2` holds the variables under the released
names; `checkpoint` owns that layout and the typed `Weights` a pass reads.
"""
import functools
import math
from typing import NamedTuple

import checkpoint
import hparams as hparams_lib
import model_files
from checkpoint import Dense, Norm, Weights
from errors import UserError
from hparams import HParams  # noqa: F401  (re-exported: model.HParams is the config users know)
from runtime import tf


def norm(x, p: Norm, epsilon=1e-5):
    """LayerNorm over the last axis with the biased variance, as the reference computes it."""
    centered = x - tf.reduce_mean(x, axis=-1, keepdims=True)
    s = tf.reduce_mean(tf.square(centered), axis=-1, keepdims=True)
    return centered * tf.math.rsqrt(s + epsilon) * p.g + p.b


def gelu(x):
    """The tanh approximation GPT-2 was trained with."""
    return 0.5 * x * (1 + tf.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * (x * x * x))))


def softmax(x):
    """The reference's own softmax, bit for bit."""
    e = tf.exp(x - tf.reduce_max(x, axis=-1, keepdims=True))
    return e / tf.reduce_sum(e, axis=-1, keepdims=True)


def dense(x, p: Dense):
    """x [..., in] float32 times p.w plus p.b, the product in p.w's dtype; float32 [..., out]."""
    transposed = checkpoint.is_transposed(p.w.dtype)
    n_in, n_out = (p.w.shape[1], p.w.shape[0]) if transposed else p.w.shape
    flat = x if x.shape.rank == 2 else tf.reshape(x, [-1, n_in])  # one 2-D product: [rows, in]
    y = tf.cast(tf.matmul(tf.cast(flat, p.w.dtype), p.w, transpose_b=transposed), tf.float32) + p.b
    return y if x.shape.rank == 2 else tf.reshape(y, tf.concat([tf.shape(x)[:-1], [n_out]], 0))


def split_heads(x, n_head):
    b, t, d = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
    return tf.transpose(tf.reshape(x, [b, t, n_head, d // n_head]), [0, 2, 1, 3])  # [B, H, T, D]


def merge_heads(x):
    b, t, h, d = tf.shape(x)[0], tf.shape(x)[2], x.shape[1], x.shape[3]
    return tf.reshape(tf.transpose(x, [0, 2, 1, 3]), [b, t, h * d])  # [B, T, H*D]


def keep_mask(query_pos, n_keys, pad):
    """Which keys each query may attend to, float32 [B, 1, T, S] with 1 to keep: earlier or
    same positions, not left padding; query_pos [T], pad [B], S = n_keys."""
    key_pos = tf.range(n_keys)
    keep = tf.logical_and(key_pos[None, None, :] <= query_pos[None, :, None],  # causal [1, T, S]
                          key_pos[None, None, :] >= pad[:, None, None])  # not padding [B, 1, S]
    return tf.cast(keep, tf.float32)[:, None]


class Mask(NamedTuple):
    """The reference's attention mask, `w * keep - 1e10 * (1 - keep)`, split so the second term
    is computed once per pass instead of once per layer (w * keep + bias rounds the same)."""

    keep: tf.Tensor
    bias: tf.Tensor

    @classmethod
    def of(cls, keep):
        return cls(keep, -1e10 * (1 - keep))


def attend(q, k, v, mask, *, dtype, matmul=tf.matmul, softmax=softmax):
    """Masked softmax attention with products in `dtype`: q [B, H, T, D], k and v [B, H, S, D],
    `mask` a `Mask` broadcastable to [B, H, T, S]; float32 [B, H, T, D]."""
    w = matmul(tf.cast(q, dtype), tf.cast(k, dtype), transpose_b=True)
    w = tf.cast(w, tf.float32) * tf.math.rsqrt(tf.constant(q.shape[-1], tf.float32))
    w = w * mask.keep + mask.bias  # masked positions get exactly zero weight, as in the reference
    return tf.cast(matmul(tf.cast(softmax(w), dtype), tf.cast(v, dtype)), tf.float32)


def attention_input(x, p):
    """The queries, keys and values of a block `p` for x [..., d]: [..., 3d]."""
    return dense(norm(x, p.ln_1), p.attn)


def block_output(x, a, p):
    """What a block `p` adds after attention: x + proj(a), then the MLP; a is attention's output
    with heads merged, shaped like x."""
    x = x + dense(a, p.attn_proj)
    return x + dense(gelu(dense(norm(x, p.ln_2), p.mlp_fc)), p.mlp_proj)


def block(x, p, mask, *, n_head, past=None):
    """One transformer block over x [B, T, d] after `past` [B, 2, H, S, D] keys and values;
    returns the new x and this block's keys and values [B, 2, H, T, D]."""
    q, k, v = (split_heads(t, n_head) for t in tf.split(attention_input(x, p), 3, axis=2))
    present = tf.stack([k, v], axis=1)
    if past is not None:
        k = tf.concat([past[:, 0], k], axis=-2)
        v = tf.concat([past[:, 1], v], axis=-2)
    # tf.nn.softmax's gradient is one kernel, which training needs; values equal the reference's.
    a = attend(q, k, v, mask, dtype=p.attn.w.dtype, softmax=tf.nn.softmax)
    return block_output(x, merge_heads(a), p), present


def embed(w: Weights, tokens, positions):
    """Token plus position embeddings, float32 [B, T, d]."""
    return tf.cast(tf.gather(w.wte, tokens), tf.float32) + tf.gather(w.wpe, positions)


def logits(h, wte):
    """Next-token logits through the tied embedding, float32 [..., n_vocab] for h [..., d]."""
    flat = h if h.shape.rank == 2 else tf.reshape(h, [-1, wte.shape[1]])  # [rows, d]
    out = tf.cast(tf.matmul(tf.cast(flat, wte.dtype), wte, transpose_b=True), tf.float32)
    return out if h.shape.rank == 2 else tf.reshape(out, tf.concat([tf.shape(h)[:-1], [wte.shape[0]]], 0))


class GPT2(tf.Module):
    """GPT-2 with its variables under the released checkpoint names.

    Args:
        hparams: An `HParams`.
        weights: Checkpoint name -> value in the released layout; a `checkpoint.CheckpointWeights`
            reads them one at a time, so the model never holds two copies.
        compute_dtype: tf.float32 (exact), or tf.bfloat16 / tf.float16 for the matrix products
            (norms, softmax and logits stay float32).
        float32_variables: Store matrices in float32 and cast them where read (mixed-precision
            training); by default they are stored in `compute_dtype`, half the memory for 16 bits.
        trainable: Whether the variables are trainable (False: frozen, as under LoRA, so no
            gradient is taken for them, not even inside recomputed blocks).
        matrix_dtype: Store matrices in this dtype, whatever the other two say (LoRA's frozen
            weights in bfloat16 under float32 products); they are cast to compute_dtype where read.
    """

    def __init__(self, hparams, weights, compute_dtype=tf.float32, float32_variables=False, trainable=True,
                 matrix_dtype=None):
        super().__init__(name="model")
        self.hparams = hparams
        self.compute_dtype = tf.as_dtype(compute_dtype)
        stored = tf.as_dtype(matrix_dtype or (tf.float32 if float32_variables else self.compute_dtype))
        self.weights = {name: tf.Variable(value, trainable=trainable, name=name)  # checkpoint name -> variable
                        for name, value in checkpoint.model_values(weights, hparams, self.compute_dtype, stored)}
        self.layers = checkpoint.arrange(self.weights, hparams.n_layer)
        tokens_pad = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32)]
        self._hidden_states = tf.function(functools.partial(self._forward, return_hidden=True), autograph=False,
                                          input_signature=tokens_pad)
        self._forward_no_past = tf.function(self._forward, autograph=False, input_signature=tokens_pad)
        past_spec = tf.TensorSpec([None, hparams.n_layer, 2, hparams.n_head, None, hparams.head_dim], tf.float32)
        self._forward_with_past = tf.function(lambda tokens, pad, past: self._forward(tokens, pad, past),
                                              autograph=False, input_signature=[*tokens_pad, past_spec])

    def read(self):
        """The `Weights` as tensors for one pass, matrices in the compute dtype."""
        w = self.layers
        return Weights(self._matrix(w.wte), tf.convert_to_tensor(w.wpe), tuple(map(self.read_block, w.blocks)),
                       Norm(*map(tf.convert_to_tensor, w.ln_f)))

    def read_block(self, p):
        """One `Block` of variables as tensors, matrices in the compute dtype."""
        return checkpoint.Block(*(Dense(self._matrix(f.w), tf.convert_to_tensor(f.b)) if isinstance(f, Dense)
                                  else Norm(*map(tf.convert_to_tensor, f)) for f in p))

    def _matrix(self, v):
        return tf.cast(v, self.compute_dtype) if v.dtype != self.compute_dtype else tf.convert_to_tensor(v)

    def __call__(self, tokens, past=None, pad=None):
        """The reference's `model()`: logits [B, T, V] and presents [B, L, 2, H, T, D] for
        `tokens` [B, T] int32 after `past`; `pad` [B] counts each row's left-padding tokens."""
        tokens = tf.convert_to_tensor(tokens, tf.int32)
        pad = tf.zeros([tf.shape(tokens)[0]], tf.int32) if pad is None else tf.convert_to_tensor(pad, tf.int32)
        if past is None:
            logits_, present = self._forward_no_past(tokens, pad)
        else:
            logits_, present = self._forward_with_past(tokens, pad, tf.convert_to_tensor(past, tf.float32))
        return {"logits": logits_, "present": present}

    def hidden_states(self, tokens):
        """The residual stream of tokens [B, T]: the embeddings, then each block's output, the
        last after the final LayerNorm; n_layer + 1 float32 tensors of [B, T, n_embd]."""
        tokens = tf.convert_to_tensor(tokens, tf.int32)
        return self._hidden_states(tokens, tf.zeros([tf.shape(tokens)[0]], tf.int32))

    def checkpoint_weights(self):
        """Checkpoint name -> tensor in the released layout, what a checkpoint of this model holds."""
        return {name: checkpoint.to_checkpoint_layout(name, v, self.compute_dtype) for name, v in self.weights.items()}

    def _forward(self, tokens, pad, past=None, return_hidden=False):
        """Left padding (`pad` [B]) gets no attention, and positions start after it, so prompts
        of different lengths share a batch."""
        t = tf.shape(tokens)[1]
        past_len = 0 if past is None else tf.shape(past)[-2]
        query_pos = tf.range(t) + past_len  # [T]
        mask = Mask.of(keep_mask(query_pos, past_len + t, pad))
        w = self.read()
        h = embed(w, tokens, tf.maximum(query_pos[None, :] - pad[:, None], 0))
        presents, hidden = [], [h]
        for i, p in enumerate(w.blocks):
            h, present = block(h, p, mask, n_head=self.hparams.n_head, past=None if past is None else past[:, i])
            presents.append(present)
            hidden.append(h)
        h = norm(h, w.ln_f)
        if return_hidden:
            return hidden[:-1] + [h]
        return logits(h, w.wte), tf.stack(presents, axis=1)  # present [B, L, 2, H, T, D]

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
        w = self.read()
        h = embed(w, tokens, positions[None, :])
        for variables, p in zip(self.layers.blocks, w.blocks):
            if recompute:  # reads its variables inside, so that their gradients flow
                h = tf.recompute_grad(functools.partial(self.recomputed_block, p=variables, mask=mask))(h)
            else:
                h = block(h, p, mask, n_head=self.hparams.n_head)[0]
        if skip_last:
            h = h[:, :-1]
        return logits(norm(h, w.ln_f), w.wte)

    def recomputed_block(self, h, p, mask):
        """One block of training's recomputed pass, from its variables `p` (a subclass may order its reads)."""
        return block(h, self.read_block(p), mask, n_head=self.hparams.n_head)[0]


def load_model(model_name="124M", models_dir="models", dtype="float32"):
    """A `GPT2` (with `.path`) from `models_dir/model_name`, in the released format or Hugging Face's; legacy names
    117M and 345M mean 124M and 355M; dtype 'float32' (exact) or 'bfloat16' (weights and products)."""
    compute_dtype = parse_dtype(dtype)
    path = hparams_lib.model_dir(model_name, models_dir)
    hp = model_files.load_hparams(path)
    lm = GPT2(hp, checkpoint.open_weights(path, hp), compute_dtype=compute_dtype)
    lm.path = path
    return lm


def parse_dtype(dtype):
    """tf.float32 or tf.bfloat16 from a name ('float32', 'fp32', 'bfloat16', 'bf16') or a DType."""
    names = {"float32": tf.float32, "fp32": tf.float32, "bfloat16": tf.bfloat16, "bf16": tf.bfloat16}
    if isinstance(dtype, tf.DType):
        return dtype
    if str(dtype) not in names:
        raise UserError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return names[str(dtype)]
