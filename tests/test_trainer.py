"""The training step against independent arithmetic: numpy Adam and SGD, Keras's Adafactor, averaged
accumulation, recomputation, frozen layers, noise, mixed precision."""
import numpy as np
import pytest
import tensorflow as tf

import checkpoint
import trainer
from checkpoint import to_checkpoint_layout
from conftest import TINY_HPARAMS
from hparams import HParams

HP = HParams(**TINY_HPARAMS)


@pytest.fixture(scope="module")
def weights():
    return checkpoint.random_weights(HP, seed=3, std=0.2)


@pytest.fixture(scope="module")
def batches():
    rng = np.random.default_rng(0)
    return [rng.integers(0, HP.n_vocab, (2, 16)).astype(np.int32) for _ in range(3)]


def fresh_trainer(weights, **options):
    strategy = tf.distribute.get_strategy()
    precision = options.pop("precision", "float32")
    lm = trainer.build_model(HP, weights, strategy, precision)
    return trainer.Trainer(lm, strategy, **options)


def gradients(weights, batch):
    """Loss and gradients of the loss by a separate model, as numpy in the checkpoint's layout."""
    lm = trainer.build_model(HP, weights, tf.distribute.get_strategy())
    with tf.GradientTape() as tape:
        loss = trainer.loss_of(lm, tf.constant(batch))
    grads = tape.gradient(loss, list(lm.weights.values()))
    return float(loss), {n: to_checkpoint_layout(n, tf.convert_to_tensor(g)).numpy() for n, g in zip(lm.weights, grads)}


def values(t):
    return {n: w.numpy() for n, w in t.lm.checkpoint_weights().items()}


def test_loss_is_the_mean_next_token_cross_entropy(weights, batches):
    lm = trainer.build_model(HP, weights, tf.distribute.get_strategy())
    logits = lm(batches[0])["logits"].numpy().astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    targets = batches[0][:, 1:]
    expected = -np.take_along_axis(logp[:, :-1], targets[..., None], -1).mean()
    assert float(trainer.loss_of(lm, tf.constant(batches[0]))) == pytest.approx(expected, rel=1e-5)


def test_adam_matches_numpy_adam_over_two_steps(weights, batches):
    t = fresh_trainer(weights, optimizer="adam", learning_rate=1e-2)
    expected = {n: np.array(w) for n, w in weights.items()}
    m = {n: np.zeros_like(w) for n, w in expected.items()}
    v = {n: np.zeros_like(w) for n, w in expected.items()}
    # Adam divides by the gradient's size, so where it is ~0 (the key biases: softmax ignores a
    # shift shared by all keys; embeddings of absent tokens) rounding noise decides the step.
    # The moments are linear in the gradient: compare them everywhere, the weights elsewhere.
    settled = {n: np.ones(w.shape, bool) for n, w in expected.items()}
    for step in range(2):
        loss, grads = gradients(expected, batches[step])
        assert t.train_step([batches[step]], step) == pytest.approx(loss, rel=1e-5)
        for n, g in grads.items():
            settled[n] &= np.abs(g) > 1e-6
            m[n] = 0.9 * m[n] + 0.1 * g
            v[n] = 0.999 * v[n] + 0.001 * g * g
            lr = 1e-2 * np.sqrt(1 - 0.999 ** (step + 1)) / (1 - 0.9 ** (step + 1))
            expected[n] = expected[n] - lr * m[n] / (np.sqrt(v[n]) + 1e-8)
    got = values(t)
    assert sum(s.sum() for s in settled.values()) > 0.5 * sum(s.size for s in settled.values())
    for n in expected:
        slot = lambda name: to_checkpoint_layout(n, t.optimizer.slots[n + name]).numpy()  # noqa: E731
        np.testing.assert_allclose(slot("/Adam"), m[n], rtol=1e-3, atol=1e-6, err_msg=n)
        np.testing.assert_allclose(slot("/Adam_1"), v[n], rtol=1e-3, atol=1e-9, err_msg=n)
        np.testing.assert_allclose(got[n][settled[n]], expected[n][settled[n]], atol=1e-4, err_msg=n)  # 1% of a step
    assert int(t.optimizer.iterations.numpy()) == 2


def test_adafactor_matches_keras_on_the_models_gradients_over_two_steps(weights, batches):
    import keras

    t = fresh_trainer(weights, optimizer="adafactor")
    assert t.xla
    # Keras factors the last two axes, so the released [1, in, out] layout factors as ours does.
    reference = {n: keras.Variable(np.array(w), name=n.replace("/", "_")) for n, w in weights.items()}
    keras_adafactor = keras.optimizers.Adafactor(learning_rate=1e-2)  # the paper's relative step
    # As for Adam: where a gradient is ~0 (key biases, absent tokens) rounding noise decides a vector's step.
    settled = {n: np.ones(w.shape, bool) for n, w in weights.items()}
    for step in range(2):
        loss, grads = gradients({n: v.numpy() for n, v in reference.items()}, batches[step])
        assert t.train_step([batches[step]], step) == pytest.approx(loss, rel=1e-5)
        keras_adafactor.apply([tf.constant(grads[n]) for n in reference], list(reference.values()))
        for n, g in grads.items():
            settled[n] &= np.abs(g) > 1e-6
    got = values(t)
    for n, v in reference.items():
        assert not np.array_equal(got[n], weights[n]), n
        np.testing.assert_allclose(got[n][settled[n]], np.asarray(v.numpy())[settled[n]], atol=2e-5, err_msg=n)
    assert {n.rsplit("/", 1)[1] for n in t.optimizer.slots} == {"Adafactor_vr", "Adafactor_vc", "Adafactor_v"}


def test_adafactor_factors_a_sixteen_bit_layout_by_the_released_rows_and_columns(weights):
    t = fresh_trainer(weights, optimizer="adafactor", precision="mixed_bfloat16")
    d = HP.n_embd
    assert t.lm.weights["model/h0/mlp/c_fc/w"].shape == [4 * d, d]  # held as [out, in]
    assert t.optimizer.slots["model/h0/mlp/c_fc/w/Adafactor_vr"].shape == [d]
    assert t.optimizer.slots["model/h0/mlp/c_fc/w/Adafactor_vc"].shape == [4 * d]
    assert t.optimizer.slots["model/wte/Adafactor_vr"].shape == [HP.n_vocab]


@pytest.mark.parametrize("xla", [True, False])
def test_sgd_step_is_learning_rate_times_gradient(weights, batches, xla):
    t = fresh_trainer(weights, optimizer="sgd", learning_rate=0.5, xla=xla)
    _, grads = gradients(weights, batches[0])
    t.train_step([batches[0]], 0)
    got = values(t)
    for n, g in grads.items():
        np.testing.assert_allclose(got[n], weights[n] - 0.5 * g, atol=1e-6, err_msg=n)


def test_accumulated_gradients_are_averaged_not_summed(weights, batches):
    accumulated = fresh_trainer(weights, optimizer="sgd", learning_rate=0.5, accumulate_gradients=2)
    loss = accumulated.train_step(batches[:2], 0)
    # Two equal-sized batches averaged = one batch holding both (uncompiled: a reference, and XLA's compiling ~3 s).
    together = fresh_trainer(weights, optimizer="sgd", learning_rate=0.5, xla=False)
    assert loss == pytest.approx(together.train_step([np.concatenate(batches[:2])], 0), rel=1e-5)
    for n, value in values(together).items():
        np.testing.assert_allclose(values(accumulated)[n], value, atol=1e-6, err_msg=n)


def test_memory_saving_gradients_give_the_same_update(weights, batches):
    plain = fresh_trainer(weights, optimizer="sgd", learning_rate=0.5, xla=False)  # as recomputation runs
    recomputed = fresh_trainer(weights, optimizer="sgd", learning_rate=0.5, memory_saving_gradients=True)
    assert plain.train_step([batches[0]], 0) == pytest.approx(recomputed.train_step([batches[0]], 0), rel=1e-6)
    for n, value in values(plain).items():
        np.testing.assert_allclose(values(recomputed)[n], value, atol=1e-6, err_msg=n)


def test_only_transformer_layers_leaves_embeddings_and_final_norm(weights, batches):
    t = fresh_trainer(weights, optimizer="sgd", learning_rate=0.5, only_train_transformer_layers=True)
    t.train_step([batches[0]], 0)
    for n, value in values(t).items():
        changed = not np.array_equal(value, weights[n])
        assert changed == n.startswith("model/h"), n


def test_noise_replaces_inputs_at_the_given_rate_deterministically():
    tokens = tf.zeros([64, 64], tf.int32)
    seed = tf.constant([1, 2])
    noisy = trainer.add_noise(tokens, 0.25, HP.n_vocab, seed).numpy()
    assert 0.2 < (noisy != 0).mean() < 0.3
    np.testing.assert_array_equal(noisy, trainer.add_noise(tokens, 0.25, HP.n_vocab, seed).numpy())
    assert noisy.max() < HP.n_vocab


def test_noise_changes_the_inputs_not_the_targets(weights, batches):
    # The references uncompiled: XLA's compiling costs each trainer ~3 s.
    clean = fresh_trainer(weights, optimizer="sgd", learning_rate=0.0 + 1e-9, xla=False)
    noisy = fresh_trainer(weights, optimizer="sgd", learning_rate=1e-9, noise=0.5)
    clean_loss = clean.train_step([batches[0]], 0)
    assert noisy.train_step([batches[0]], 0) != pytest.approx(clean_loss, rel=1e-4)
    # Noise of 0 is exactly the clean loss.
    assert fresh_trainer(weights, learning_rate=1e-9, noise=0.0, xla=False).train_step([batches[0]], 0) == \
        pytest.approx(clean_loss, rel=1e-6)


@pytest.fixture(scope="module")
def float32_losses(weights, batches):
    """The losses of two float32 steps, which the mixed-precision steps must track (uncompiled, as they run)."""
    exact = fresh_trainer(weights, learning_rate=1e-3, xla=False)
    return [exact.train_step([batches[step]], step) for step in range(2)]


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_float32_weights_and_tracks_the_float32_loss(weights, batches, float32_losses,
                                                                             precision):
    mixed = fresh_trainer(weights, learning_rate=1e-3, precision=precision)
    assert all(v.dtype == tf.float32 for v in mixed.lm.weights.values())
    for step in range(2):
        assert mixed.train_step([batches[step]], step) == pytest.approx(float32_losses[step], abs=0.05)


def test_sixteen_bit_training_on_a_cpu_leaves_the_matrix_products_to_tensorflow(weights):
    # XLA's CPU backend multiplies bfloat16 matrices at the float32 rate; oneDNN's kernels do not.
    assert not tf.config.list_logical_devices("GPU")
    assert fresh_trainer(weights).xla
    assert not fresh_trainer(weights, precision="mixed_bfloat16").xla
    assert not fresh_trainer(weights, precision="mixed_float16").xla


def test_evaluate_does_not_train(weights, batches):
    t = fresh_trainer(weights)
    first = t.evaluate(batches[0])
    assert t.evaluate(batches[0]) == first
    assert all(np.array_equal(v, weights[n]) for n, v in values(t).items())


def test_bad_options_are_user_errors(weights):
    with pytest.raises(trainer.UserError, match="optimizer"):
        fresh_trainer(weights, optimizer="adagrad")
    for optimizer in ("adam", "sgd"):
        with pytest.raises(trainer.UserError, match=f"adafactor_beta1 must not be given with optimizer '{optimizer}'"):
            fresh_trainer(weights, optimizer=optimizer, optimizer_options=dict(adafactor_beta1=0.9))
    with pytest.raises(trainer.UserError, match="adafactor_clip_threshold must be a number > 0"):
        fresh_trainer(weights, optimizer="adafactor", optimizer_options=dict(adafactor_clip_threshold=0))
    with pytest.raises(trainer.UserError, match=r"adafactor_beta1 must be in \[0, 1\)"):
        fresh_trainer(weights, optimizer="adafactor", optimizer_options=dict(adafactor_beta1=1.0))
    with pytest.raises(trainer.UserError, match="strategy"):
        trainer.make_strategy("tpu_pod")
    with pytest.raises(trainer.UserError, match="precision"):
        trainer.parse_precision("float8")
