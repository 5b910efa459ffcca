"""Cached decoding: the cache's layout, and steps that equal the full pass and the reference."""
import os

import numpy as np
import pytest
import tensorflow as tf

import decode
import model
from hparams import HParams

REF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def tokens(batch, length, seed=0, vocab=50257):
    return np.random.default_rng(seed).integers(0, vocab, [batch, length]).astype(np.int32)


def decode_all(decoder, x, prompt_length, capacity, step=None):
    """Logits [B, T - prompt_length + 1, V]: the prompt's last, then one per fed-back token."""
    pad = tf.zeros([x.shape[0]], tf.int32)
    logits, state = decoder.prefill(tf.constant(x[:, :prompt_length]), pad, capacity)
    got = [logits.numpy()]
    for pos in range(prompt_length, x.shape[1]):
        logits, state = (step or decoder.step)(tf.constant(x[:, pos]), tf.constant(pos), pad, state)
        got.append(logits.numpy())
    return np.stack(got, axis=1)


def test_cached_decoding_matches_the_reference_code():
    ref_lm = model.load_model("ref_tiny", REF_DIR)
    golden = np.load(os.path.join(REF_DIR, "ref_tiny_golden.npz"))
    x, cols = golden["case2_tokens"], golden["case2_cols"]
    got = decode_all(decode.Decoder(ref_lm), x, 2, x.shape[1])
    np.testing.assert_allclose(got[..., cols], golden["case2_logits_cols"][:, 1:], atol=1e-4)


def test_cached_decoding_equals_the_full_pass(tiny_lm):
    x = tokens(3, 12, seed=7)
    full = tiny_lm(x)["logits"].numpy()
    decoder = decode.Decoder(tiny_lm)
    got = decode_all(decoder, x, 5, 12, step=tf.function(decoder.step))
    np.testing.assert_allclose(got, full[:, 4:], atol=1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_bfloat16_cached_decoding_follows_its_full_pass(tiny_models_dir, batch):
    # Its own forms of product (x @ w^T, h @ wte^T; at batch 1 XLA's) round differently from
    # the full pass's, so the logits agree to bf16 precision, not exactly.
    lm16 = model.load_model("tiny", tiny_models_dir, dtype="bfloat16")
    x = tokens(batch, 10, seed=5)
    want = lm16(x)["logits"].numpy()[:, 3:]
    decoder = decode.Decoder(lm16)
    got = decode_all(decoder, x, 4, 10)
    assert np.abs(got - want).max() < 0.02 * (want.max() - want.min())
    # One row takes the compiled one-row step; more rows the general one.
    assert decoder.traces()["step_one_row"] == (batch == 1)


def test_a_cache_write_lands_where_the_view_reads_it():
    hp = HParams(n_vocab=10, n_ctx=8, n_embd=6, n_head=2, n_layer=3)
    cache = decode.KVCache(hp, tf.float32)
    batch, capacity = 2, 5
    state = cache.allocate(batch, capacity)
    assert len(state) == hp.n_layer and [s.shape.as_list() for s in state] == [[2 * batch * 2 * capacity, 3]] * 3
    assert all(spec.is_compatible_with(s) for spec, s in zip(cache.spec(), state))
    positions = tf.constant([1, 2])
    slots = cache.slots(state, batch, positions)
    kv = tf.reshape(tf.range(2 * batch * 2 * 2 * 3, dtype=tf.float32), [2, batch, 2, 2, 3])  # [2, B, H, T, D]
    layer = cache.write(state[1], slots, kv)
    k, v = cache.view(layer, slots)  # [B, H, capacity, D]
    np.testing.assert_array_equal(k.numpy()[:, :, 1:3], kv.numpy()[0])
    np.testing.assert_array_equal(v.numpy()[:, :, 1:3], kv.numpy()[1])


def test_rows_moved_and_joined_in_a_cache_decode_as_they_did_alone(tiny_lm):
    decoder = decode.Decoder(tiny_lm)
    long, short = tokens(1, 7, seed=1), tokens(1, 3, seed=2)
    alone = [decode_all(decoder, x, x.shape[1] - 1, x.shape[1]) for x in (long, short)]
    # The short row, prefilled alone, moves right by 4 (its padding) with room for one more
    # position, and joins the long one: both then step at position 6.
    _, first = decoder.prefill(tf.constant(long[:, :6]), tf.zeros([1], tf.int32), 7)
    _, second = decoder.prefill(tf.constant(short[:, :2]), tf.zeros([1], tf.int32), 2)
    first = decoder.rearrange(first, 1, tf.constant([0]), 0, 7)
    second = decoder.rearrange(second, 1, tf.constant([0]), -4, 7)
    state = decoder.concat(first, second, 7)
    # Dropping the long row and the short one's padding gives back a cache it steps alone on.
    dropped = decoder.rearrange(state, 2, tf.constant([1]), 4, 3)
    logits, _ = decoder.step(tf.constant([short[0, 2]]), tf.constant(2), tf.zeros([1], tf.int32), dropped)
    np.testing.assert_allclose(logits.numpy()[0], alone[1][0, -1], atol=1e-5)
    logits, _ = decoder.step(tf.constant([long[0, 6], short[0, 2]]), tf.constant(6), tf.constant([0, 4]), state)
    np.testing.assert_allclose(logits.numpy()[0], alone[0][0, -1], atol=1e-5)
    np.testing.assert_allclose(logits.numpy()[1], alone[1][0, -1], atol=1e-5)
