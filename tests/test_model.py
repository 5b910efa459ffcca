"""The transformer: names and shapes, cached passes equal full passes, loading errors."""
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import checkpoint
import model
from errors import UserError


def tokens(batch, length, seed=0, vocab=50257):
    return np.random.default_rng(seed).integers(0, vocab, [batch, length]).astype(np.int32)


REF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(scope="module")
def ref_lm():
    """The tiny model written by the reference's own code under tf.compat.v1."""
    return model.load_model("ref_tiny", REF_DIR)


@pytest.fixture(scope="module")
def ref_golden():
    return np.load(os.path.join(REF_DIR, "ref_tiny_golden.npz"))


def logsumexp(x):
    m = x.max(-1, keepdims=True)
    return m[..., 0] + np.log(np.exp(x - m).sum(-1))


@pytest.mark.parametrize("case", range(4))
def test_logits_and_presents_match_the_reference_code(ref_lm, ref_golden, case):
    out = ref_lm(ref_golden[f"case{case}_tokens"])
    logits = out["logits"].numpy()
    cols = ref_golden[f"case{case}_cols"]
    np.testing.assert_allclose(logits[..., cols], ref_golden[f"case{case}_logits_cols"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logsumexp(logits), ref_golden[f"case{case}_logsumexp"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["present"], ref_golden[f"case{case}_present"], atol=1e-5, rtol=0)
    if f"case{case}_logits" in ref_golden:  # every column, for the small cases
        np.testing.assert_allclose(logits, ref_golden[f"case{case}_logits"], atol=1e-4, rtol=0)


def test_pass_with_past_matches_the_reference_code(ref_lm, ref_golden):
    x, cols = ref_golden["inc_tokens"], ref_golden["inc_cols"]
    first = ref_lm(x[:, :4])
    rest = ref_lm(x[:, 4:], past=first["present"])
    np.testing.assert_allclose(first["logits"].numpy()[..., cols], ref_golden["inc_logits_prefix_cols"], atol=1e-4)
    np.testing.assert_allclose(rest["logits"].numpy()[..., cols], ref_golden["inc_logits_next_cols"], atol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_variables_have_the_checkpoint_names_and_16_bit_dense_weights_are_held_transposed(tiny_models_dir, dtype):
    lm = model.load_model("tiny", tiny_models_dir, dtype=dtype)
    expected = checkpoint.variable_shapes(lm.hparams)
    found = {v.name[:-2]: v.shape.as_list() for v in lm.trainable_variables}
    assert set(found) == set(expected)
    for name, shape in expected.items():
        if name.endswith("/w"):
            shape = [shape[1], shape[2]] if dtype == "float32" else [shape[2], shape[1]]
        assert found[name] == shape, name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpoint_weights_give_back_the_released_layout(tiny_models_dir, dtype):
    lm = model.load_model("tiny", tiny_models_dir, dtype=dtype)
    released = checkpoint.read_weights(os.path.join(tiny_models_dir, "tiny"), lm.hparams)
    given = lm.checkpoint_weights()
    assert set(given) == set(released)
    for name, value in released.items():
        want = value.numpy()
        if dtype == "bfloat16" and checkpoint.is_matrix(name):
            want = tf.cast(tf.cast(value, tf.bfloat16), tf.float32).numpy()  # exact after one rounding
        np.testing.assert_array_equal(tf.cast(given[name], tf.float32).numpy(), want, err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dense_layer_multiplies_by_the_checkpoint_matrix(tiny_models_dir, dtype):
    # The layout must not change the arithmetic: x @ w[0] + b with the checkpoint's [1, in, out] w.
    lm = model.load_model("tiny", tiny_models_dir, dtype=dtype)
    released = checkpoint.read_weights(os.path.join(tiny_models_dir, "tiny"), lm.hparams)
    x = np.random.default_rng(0).standard_normal([3, lm.hparams.n_embd]).astype(np.float32)
    want = x @ released["model/h0/mlp/c_fc/w"].numpy()[0] + released["model/h0/mlp/c_fc/b"].numpy()
    got = model.dense(tf.constant(x), lm.read().blocks[0].mlp_fc).numpy()
    tolerance = 1e-5 if dtype == "float32" else 0.02 * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=tolerance)


def test_output_shapes_match_the_reference_api(tiny_lm):
    hp = tiny_lm.hparams
    out = tiny_lm(tokens(3, 5))
    assert out["logits"].shape == (3, 5, hp.n_vocab) and out["logits"].dtype == tf.float32
    assert out["present"].shape == (3, hp.n_layer, 2, hp.n_head, 5, hp.head_dim)


@pytest.mark.parametrize("split", [1, 4, 8])
def test_pass_with_past_equals_the_full_pass(tiny_lm, split):
    x = tokens(2, 9, seed=split)
    full = tiny_lm(x)
    first = tiny_lm(x[:, :split])
    rest = tiny_lm(x[:, split:], past=first["present"])
    np.testing.assert_allclose(first["logits"], full["logits"][:, :split], atol=1e-5)
    np.testing.assert_allclose(rest["logits"], full["logits"][:, split:], atol=1e-5)
    np.testing.assert_allclose(rest["present"], full["present"][..., split:, :], atol=1e-5)


def test_left_padding_does_not_change_a_row(tiny_lm):
    x = tokens(1, 6, seed=9)
    alone = tiny_lm(x)["logits"].numpy()[0]
    padded = np.concatenate([np.full([1, 3], 50256, np.int32), x], axis=1)
    logits = tiny_lm(padded, pad=[3])["logits"].numpy()
    np.testing.assert_allclose(logits[0, 3:], alone, atol=1e-5)


def test_bfloat16_stays_close_to_float32(tiny_models_dir, tiny_lm):
    lm16 = model.load_model("tiny", tiny_models_dir, dtype="bfloat16")
    assert lm16.weights["model/h0/mlp/c_fc/w"].dtype == tf.bfloat16
    assert lm16.weights["model/h0/ln_1/g"].dtype == tf.float32
    x = tokens(2, 7, seed=3)
    a = tiny_lm(x)["logits"].numpy()
    b = lm16(x)["logits"].numpy()
    assert b.dtype == np.float32
    # bf16 keeps 8 bits of mantissa: logits agree to a few percent of their spread.
    assert np.abs(a - b).max() < 0.05 * (a.max() - a.min())
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.8


def test_missing_model_says_how_to_download(tmp_path):
    with pytest.raises(UserError, match=r"model '124M' not found in .*download_model.py 124M"):
        model.load_model("124M", str(tmp_path))


def test_legacy_names_resolve(tmp_path, tiny_models_dir):
    shutil.copytree(os.path.join(tiny_models_dir, "tiny"), tmp_path / "124M")
    lm = model.load_model("117M", str(tmp_path))
    assert lm.path.endswith("124M")


def test_models_dir_expands_variables(tmp_path, tiny_models_dir, monkeypatch):
    monkeypatch.setenv("GPT2_TEST_MODELS", tiny_models_dir)
    assert model.load_model("tiny", "$GPT2_TEST_MODELS").hparams.n_layer == 2


def test_bad_dtype_is_a_user_error(tiny_models_dir):
    with pytest.raises(UserError, match="dtype must be float32 or bfloat16"):
        model.load_model("tiny", tiny_models_dir, dtype="float16")


def test_malformed_hparams_is_a_user_error(tmp_path, tiny_models_dir):
    shutil.copytree(os.path.join(tiny_models_dir, "tiny"), tmp_path / "m")
    (tmp_path / "m" / "hparams.json").write_text('{"n_vocab": 50257, "n_layers": 2}')
    with pytest.raises(UserError, match="not a GPT-2 hparams file"):
        model.load_model("m", str(tmp_path))


def test_logits_match_hugging_face_transformers(tiny_lm):
    """An independent implementation on the same weights (runs when torch and transformers are installed)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_compat

    hf = hf_compat.to_hf(tiny_lm)
    for batch, length in [(1, 1), (1, 13), (3, 7), (2, tiny_lm.hparams.n_ctx)]:
        x = tokens(batch, length, seed=length)
        ours = tiny_lm(x)["logits"].numpy()
        with torch.no_grad():
            theirs = hf(torch.from_numpy(x.astype(np.int64))).logits.numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
