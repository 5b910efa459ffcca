"""Adafactor against independent implementations: Keras's (relative and given steps, factored
matrices and vectors, update clipping) and the paper's equations in numpy (the first moment)."""
import numpy as np
import pytest
import tensorflow as tf

import optimizers

SHAPES = {"model/h0/mlp/c_fc/w": (6, 10), "model/wte": (12, 4), "model/h0/ln_1/g": (5,), "model/h0/attn/c_attn/b": (9,)}


def gradient_steps(seed, steps, scale=1.0):
    rng = np.random.default_rng(seed)
    return [{n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()} for _ in range(steps)]


def start_values(seed=0):
    rng = np.random.default_rng(seed)
    return {n: (0.1 * rng.standard_normal(s)).astype(np.float32) for n, s in SHAPES.items()}


def ours(grads, transposed=(), **options):
    start = start_values()
    variables = [tf.Variable(start[n].T if n in transposed else start[n], name=n) for n in SHAPES]
    opt = optimizers.Adafactor(variables, transposed=transposed, **options)
    for step in grads:
        opt.apply([tf.constant(step[n].T if n in transposed else step[n]) for n in SHAPES], variables)
    return {n: v.numpy().T if n in transposed else v.numpy() for n, v in zip(SHAPES, variables)}, opt


def keras_adafactor(grads, **options):
    import keras

    start = start_values()
    variables = [keras.Variable(start[n], name=n.replace("/", "_")) for n in SHAPES]
    opt = keras.optimizers.Adafactor(**options)
    for step in grads:
        opt.apply([tf.constant(step[n]) for n in SHAPES], variables)
    return {n: np.asarray(v.numpy()) for n, v in zip(SHAPES, variables)}


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_relative_steps_match_keras(scale):
    grads = gradient_steps(1, 4, scale)
    got, opt = ours(grads)
    expected = keras_adafactor(grads, learning_rate=1e-2, relative_step=True)  # the paper's min(1e-2, 1/sqrt(t))
    for n in SHAPES:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-7, err_msg=n)
        assert not np.allclose(got[n], start_values()[n])
    assert int(opt.iterations.numpy()) == 4


def test_a_given_learning_rate_matches_keras_without_relative_steps():
    grads = gradient_steps(2, 3)
    got, _ = ours(grads, learning_rate=3e-4)
    expected = keras_adafactor(grads, learning_rate=3e-4, relative_step=False)
    for n in SHAPES:
        np.testing.assert_allclose(got[n], expected[n], rtol=1e-5, atol=1e-7, err_msg=n)


def test_only_the_factored_rows_and_columns_are_kept_for_matrices():
    _, opt = ours(gradient_steps(3, 1))
    shapes = {n: tuple(v.shape) for n, v in opt.slots.items()}
    assert shapes == {"model/h0/mlp/c_fc/w/Adafactor_vr": (6,), "model/h0/mlp/c_fc/w/Adafactor_vc": (10,),
                      "model/wte/Adafactor_vr": (12,), "model/wte/Adafactor_vc": (4,),
                      "model/h0/ln_1/g/Adafactor_v": (5,), "model/h0/attn/c_attn/b/Adafactor_v": (9,)}


def test_a_transposed_matrix_gets_the_same_update_and_the_same_slots():
    grads = gradient_steps(4, 3)
    plain, plain_opt = ours(grads)
    flipped, flipped_opt = ours(grads, transposed=("model/h0/mlp/c_fc/w",))
    np.testing.assert_allclose(flipped["model/h0/mlp/c_fc/w"], plain["model/h0/mlp/c_fc/w"], rtol=1e-6, atol=1e-8)
    for n, slot in plain_opt.slots.items():
        np.testing.assert_allclose(flipped_opt.slots[n].numpy(), slot.numpy(), rtol=1e-6, err_msg=n)


def paper_adafactor(start, grads, beta1, rho=None, d=1.0, eps1=1e-30, eps2=1e-3):
    """Shazeer & Stern 2018, Algorithms 4 and 5 (sums over rows and columns), with a first moment of the
    scaled, clipped update as tensor2tensor's implementation keeps it."""
    x = {n: v.astype(np.float64) for n, v in start.items()}
    r = {n: 0.0 for n in x}
    c = {n: 0.0 for n in x}
    v = {n: 0.0 for n in x}
    m = {n: 0.0 for n in x}
    for t, g in enumerate(grads, 1):
        beta2 = 1 - t ** -0.8
        step_size = min(1e-2, 1 / np.sqrt(t)) if rho is None else rho
        for n in x:
            g2 = g[n].astype(np.float64) ** 2 + eps1
            if g2.ndim == 2:
                r[n] = beta2 * r[n] + (1 - beta2) * g2.sum(axis=1)
                c[n] = beta2 * c[n] + (1 - beta2) * g2.sum(axis=0)
                v_hat = np.outer(r[n], c[n]) / r[n].sum()
            else:
                v[n] = v_hat = beta2 * v[n] + (1 - beta2) * g2
            u = g[n] / np.sqrt(v_hat)
            u = u / max(1.0, np.sqrt(np.mean(u ** 2)) / d)
            alpha = max(eps2, np.sqrt(np.mean(x[n] ** 2))) * step_size
            m[n] = beta1 * m[n] + (1 - beta1) * alpha * u
            x[n] = x[n] - m[n]
    return x


@pytest.mark.parametrize("beta1,clip", [(0.0, 1.0), (0.9, 1.0), (0.9, 0.5)])
def test_the_first_moment_and_clipping_follow_the_papers_equations(beta1, clip):
    grads = gradient_steps(5, 4)
    got, opt = ours(grads, beta1=beta1, clip_threshold=clip)
    expected = paper_adafactor(start_values(), grads, beta1, d=clip)
    for n in SHAPES:
        np.testing.assert_allclose(got[n], expected[n], rtol=2e-5, atol=1e-7, err_msg=n)
    assert any(n.endswith("/Adafactor_m") for n in opt.slots) == (beta1 > 0)
