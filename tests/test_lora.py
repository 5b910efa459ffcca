"""LoRA: only the adapters train, merged saves reproduce the adapted logits (and Hugging Face's
model with the same adapters beside its layers), adapters kept and resumed, bad settings."""
import os

import numpy as np
import pytest
import tensorflow as tf

import checkpoint
import lora
import model
import runs
import trainer
from conftest import TINY_HPARAMS
from encoder import DEFAULT_VOCAB_DIR
from errors import UserError
from hparams import HParams

HP = HParams(**TINY_HPARAMS)
TOKENS = np.random.default_rng(7).integers(0, HP.n_vocab, (2, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def weights():
    return checkpoint.random_weights(HP, seed=5, std=0.2)


def trained(weights, config, steps=2, base_dtype="float32", **options):
    """A LoRA model and its trainer after `steps` Adam steps on random windows."""
    strategy = tf.distribute.get_strategy()
    lm = trainer.build_model(HP, weights, strategy, options.pop("precision", "float32"), lora=config, seed=3,
                             base_dtype=base_dtype)
    t = trainer.Trainer(lm, strategy, learning_rate=options.pop("learning_rate", 3e-2), **options)
    rng = np.random.default_rng(0)
    for step in range(steps):
        t.train_step([rng.integers(0, HP.n_vocab, (2, 16)).astype(np.int32)], step)
    return lm, t


CONFIG = lora.Config(4, alpha=8.0, targets=("attn/c_attn", "mlp/c_proj"))
# How far the logits of a model trained on weights rounded to bfloat16 are from its float32 merged
# save's, as a share of the logits' standard deviation: measured 0.037 on these weights (std 0.2).
BF16_BASE_LOGITS_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def adapted(weights):
    return trained(weights, CONFIG)


@pytest.fixture(scope="module")
def adapted_bf16(weights):
    return trained(weights, CONFIG, base_dtype="bfloat16")


def assert_merged(merged, weights, lm, atol=1e-6):
    """That `merged` is the float32 `weights` with `lm`'s adapters merged as LoRA's paper writes it, in numpy."""
    for name, value in merged.items():
        assert value.dtype == np.float32
        expected = weights[name]
        if name.endswith("/w") and lora.adapter_names(name[:-2])[0] in lm.adapters:
            a, b = (lm.adapters[n].numpy().astype(np.float64) for n in lora.adapter_names(name[:-2]))
            expected = weights[name] + lm.config.scale * (a @ b)[None]
        np.testing.assert_allclose(value, expected, atol=atol, rtol=0, err_msg=name)


def copy_of(trained_lm, weights):
    """A copy of a bfloat16-base model and its trainer: a save rebases the model that saves onto its
    run directory, so the fixture's model reads on from `weights`."""
    lm, t = trained_lm
    return trainer.build_model(HP, weights, tf.distribute.get_strategy(), lora=CONFIG, adapters=lm.adapter_values()), t


def rounded(weights, base_dtype):
    """The weights as a model storing its matrices in `base_dtype` holds them, in float32."""
    return {n: tf.cast(tf.cast(w, base_dtype), tf.float32).numpy() if checkpoint.is_matrix(n) else w
            for n, w in weights.items()}


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_only_the_adapters_train(weights, adapted, adapted_bf16, base_dtype):
    lm, t = adapted if base_dtype == "float32" else adapted_bf16
    assert lm.base_dtype == tf.as_dtype(base_dtype)
    assert {v.name.split(":")[0] for v in t.variables} == set(lm.adapters)
    assert len(lm.adapters) == 2 * 2 * HP.n_layer
    frozen = rounded(weights, tf.as_dtype(base_dtype))
    for name, variable in lm.weights.items():
        assert not variable.trainable
        assert variable.dtype == (tf.as_dtype(base_dtype) if checkpoint.is_matrix(name) else tf.float32)
        np.testing.assert_array_equal(tf.cast(checkpoint.to_checkpoint_layout(name, variable), tf.float32).numpy(),
                                      frozen[name], err_msg=name)
    for i in range(HP.n_layer):
        assert np.abs(lm.adapters[f"model/h{i}/mlp/c_proj/lora_b"].numpy()).max() > 1e-3  # started at zero
    assert "model/h0/attn/c_proj/lora_a" not in lm.adapters


def test_recomputed_blocks_train_the_adapters_alone_and_alike(weights):
    config = lora.Config(2)
    plain, _ = trained(weights, config, steps=1, optimizer="sgd", learning_rate=0.5)
    recomputed, t = trained(weights, config, steps=1, optimizer="sgd", learning_rate=0.5,
                            memory_saving_gradients=True)
    assert len(t.variables) == len(recomputed.adapters)
    for name, variable in plain.adapters.items():
        np.testing.assert_allclose(recomputed.adapters[name].numpy(), variable.numpy(), atol=1e-6, err_msg=name)


def test_merged_weights_reproduce_the_adapted_logits(adapted, tmp_path):
    lm, _ = adapted
    expected = lm(TOKENS)["logits"].numpy()
    merged = {n: w.numpy() for n, w in lm.checkpoint_weights().items()}
    checkpoint.write_model_dir(str(tmp_path / "merged"), HP, merged)
    loaded = model.load_model("merged", str(tmp_path))
    np.testing.assert_allclose(loaded(TOKENS)["logits"].numpy(), expected, atol=1e-5)
    # Base weights changed only in the targets.
    base = lm.weights
    changed = {n for n in merged if not np.array_equal(merged[n], checkpoint.to_checkpoint_layout(n, base[n]).numpy())}
    assert changed == {f"model/h{i}/{s}/w" for i in range(HP.n_layer) for s in ("attn/c_attn", "mlp/c_proj")}


def test_a_bfloat16_base_saves_its_adapters_merged_into_the_float32_weights(weights, adapted_bf16, tmp_path):
    lm, _ = adapted_bf16
    merged = {n: w.numpy() for n, w in lm.checkpoint_weights().items()}
    assert_merged(merged, weights, lm)
    # The merged save is the model the adapters trained on, to bfloat16's rounding of the base.
    checkpoint.write_model_dir(str(tmp_path / "merged"), HP, merged)
    loaded = model.load_model("merged", str(tmp_path))(TOKENS)["logits"].numpy()
    error = np.abs(loaded - lm(TOKENS)["logits"].numpy()).max() / loaded.std()
    assert 0 < error < BF16_BASE_LOGITS_TOLERANCE


def test_a_bfloat16_base_holds_half_the_memory_and_gives_float32s_gradients(weights):
    models = [trainer.build_model(HP, weights, tf.distribute.get_strategy(), lora=CONFIG, seed=3, base_dtype=d)
              for d in ("float32", "bfloat16")]
    sizes = [sum(v.dtype.size * v.shape.num_elements() for v in m.weights.values()) for m in models]
    assert sizes[1] < 0.55 * sizes[0]
    gradients = []
    for lm in models:
        lm.adapters["model/h1/mlp/c_proj/lora_b"].assign(tf.fill([4, HP.n_embd], 0.1))  # so every factor gets one
        with tf.GradientTape() as tape:
            loss = trainer.loss_of(lm, tf.constant(TOKENS))
        gradients.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, list(lm.adapters.values()))]))
    exact, half = gradients
    assert np.dot(exact, half) / (np.linalg.norm(exact) * np.linalg.norm(half)) > 0.999
    np.testing.assert_allclose(np.linalg.norm(half), np.linalg.norm(exact), rtol=0.02)


def test_the_adapted_model_matches_hugging_faces_with_the_adapters_beside_its_layers(weights, adapted):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_compat

    lm, _ = adapted
    hf = hf_compat.to_hf(model.GPT2(HP, weights))  # the frozen weights alone
    scale = lm.config.scale
    for i, layer in enumerate(hf.transformer.h):
        for scope, module in (("attn/c_attn", layer.attn.c_attn), ("mlp/c_proj", layer.mlp.c_proj)):
            a, b = (torch.from_numpy(lm.adapters[n].numpy()) for n in lora.adapter_names(f"model/h{i}/{scope}"))
            # LoRA as its paper writes it: h = x W + scale * (x A) B, never merging A B into W.
            module.register_forward_hook(lambda m, inputs, out, a=a, b=b: out + scale * (inputs[0] @ a) @ b)
    with torch.no_grad():
        expected = hf(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(lm(TOKENS)["logits"].numpy(), expected, atol=1e-4)


def test_samples_during_training_come_from_the_adapted_model(adapted):
    import decode
    import sample

    lm, _ = adapted
    merged = model.GPT2(HP, lm.checkpoint_weights())

    def greedy(m):
        tokens = sample.Sampler(decode.Decoder(m), 50256).generate([[50256], [464, 2068]], 8, temperature=0)
        return np.concatenate(list(tokens), axis=1)

    adapted_tokens = greedy(lm)
    np.testing.assert_array_equal(adapted_tokens, greedy(merged))
    assert not np.array_equal(adapted_tokens, greedy(model.GPT2(HP, {n: checkpoint.to_checkpoint_layout(n, v)
                                                                  for n, v in lm.weights.items()})))


def test_a_sixteen_bit_layout_merges_the_same_change(weights, adapted):
    lm, _ = adapted
    mixed = trainer.build_model(HP, weights, tf.distribute.get_strategy(), "mixed_bfloat16", lora=lm.config,
                                adapters=lm.adapter_values(), base_dtype="float32")
    for name, value in lm.checkpoint_weights().items():
        np.testing.assert_allclose(mixed.checkpoint_weights()[name].numpy(), value.numpy(), atol=1e-6, err_msg=name)


def test_a_save_keeps_the_adapters_and_resuming_unmerges_them(adapted, tmp_path):
    lm, t = adapted
    run_dir = str(tmp_path / "run")
    runs.prepare(run_dir, DEFAULT_VOCAB_DIR, HP)
    runs.save(run_dir, 2, lm, t.optimizer)
    runs.save(run_dir, 3, lm, t.optimizer)
    assert {n for n in os.listdir(run_dir) if n.startswith("lora-")} == {"lora-3.index", "lora-3.data-00000-of-00001"}
    adapters = runs.read_adapters(run_dir, 3)
    assert lora.Config.of_adapters(adapters) == lm.config
    assert runs.read_adapters(run_dir, 2) is None
    merged = checkpoint.CheckpointWeights(run_dir, HP, prefix=os.path.join(run_dir, "model-3"))
    resumed = trainer.build_model(HP, lora.UnmergedWeights(merged, adapters), tf.distribute.get_strategy(),
                                  lora=lm.config, adapters=adapters, base_dtype="float32")
    for name, variable in lm.weights.items():
        np.testing.assert_allclose(resumed.weights[name].numpy(), variable.numpy(), atol=1e-6, err_msg=name)
    for name, variable in lm.adapters.items():
        np.testing.assert_array_equal(resumed.adapters[name].numpy(), variable.numpy())
    t2 = trainer.Trainer(resumed, tf.distribute.get_strategy())
    assert runs.restore_optimizer(run_dir, 3, t2.optimizer)
    for name, slot in t.optimizer.slots.items():
        np.testing.assert_array_equal(t2.optimizer.slots[name].numpy(), slot.numpy())


def test_a_resumed_bfloat16_base_merges_into_the_weights_it_started_from_after_its_saves_rotate(
        weights, adapted_bf16, tmp_path):
    lm, t = copy_of(adapted_bf16, weights)
    run_dir = str(tmp_path / "run")
    runs.prepare(run_dir, DEFAULT_VOCAB_DIR, HP)
    runs.save(run_dir, 2, lm, t.optimizer, max_to_keep=1)
    adapters = runs.read_adapters(run_dir, 2)
    merged = checkpoint.CheckpointWeights(run_dir, HP, prefix=os.path.join(run_dir, "model-2"))
    resumed = trainer.build_model(HP, lora.UnmergedWeights(merged, adapters), tf.distribute.get_strategy(),
                                  lora=lm.config, adapters=adapters)
    for name, variable in lm.weights.items():  # the same rounding of the same weights
        np.testing.assert_array_equal(resumed.weights[name].numpy(), variable.numpy(), err_msg=name)
    t2 = trainer.Trainer(resumed, tf.distribute.get_strategy(), learning_rate=3e-2)
    assert runs.restore_optimizer(run_dir, 2, t2.optimizer)
    rng = np.random.default_rng(1)
    for step in (2, 3):  # model-2, which the resumed model was read from, is rotated out by the save of 3
        t2.train_step([rng.integers(0, HP.n_vocab, (2, 16)).astype(np.int32)], step)
        runs.save(run_dir, step + 1, resumed, t2.optimizer, max_to_keep=1)
    assert not os.path.exists(os.path.join(run_dir, "model-2.index"))
    saved = checkpoint.read_weights(run_dir, HP, prefix=os.path.join(run_dir, "model-4"))
    assert_merged({n: w.numpy() for n, w in saved.items()}, weights, resumed, atol=2e-6)


def test_a_merged_save_read_tensor_by_tensor_is_written_in_parts_of_one_bundle(weights, adapted_bf16, tmp_path,
                                                                                 monkeypatch):
    lm, t = copy_of(adapted_bf16, weights)
    run_dir = str(tmp_path / "run")
    runs.prepare(run_dir, DEFAULT_VOCAB_DIR, HP)
    expected = {n: w.numpy() for n, w in lm.checkpoint_weights().items()}
    wte_bytes = 4 * HP.n_vocab * HP.n_embd
    monkeypatch.setattr(runs, "PART_BYTES", wte_bytes)  # the embedding alone fills a part
    runs.save(run_dir, 1, lm, t.optimizer)
    data = sorted(n for n in os.listdir(run_dir) if n.startswith("model-1.data"))
    assert len(data) > 1 and data[0] == f"model-1.data-00000-of-{len(data):05d}"
    assert not [n for n in os.listdir(run_dir) if ".part-" in n]
    saved = checkpoint.read_weights(run_dir, HP, prefix=os.path.join(run_dir, "model-1"))
    assert set(saved) == set(expected)
    for name, value in saved.items():
        np.testing.assert_array_equal(value.numpy(), expected[name], err_msg=name)
    assert model.load_model("run", str(tmp_path))(TOKENS)["logits"].shape == (2, 12, HP.n_vocab)


@pytest.mark.parametrize("options,message", [
    (dict(rank=0), "lora_rank must be a whole number >= 1, got 0"),
    (dict(rank=-2), "lora_rank must be a whole number >= 1"),
    (dict(rank=2.5), "lora_rank must be a whole number >= 1"),
    (dict(rank=4, alpha=0), "lora_alpha must be a number > 0"),
    (dict(rank=4, targets="attn/c_attn,attn/q"), "lora_targets must be a comma-separated list of attn/c_attn"),
    (dict(rank=4, targets=""), "lora_targets must be"),
])
def test_bad_settings_are_user_errors(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        lora.Config(**options)


def test_a_bad_base_dtype_is_a_user_error(weights):
    strategy = tf.distribute.get_strategy()
    with pytest.raises(UserError, match="base_dtype must be one of bfloat16, float32, got 'float16'"):
        trainer.build_model(HP, weights, strategy, lora=CONFIG, base_dtype="float16")
    with pytest.raises(UserError, match="base_dtype is for the frozen weights of LoRA: give lora_rank too"):
        trainer.build_model(HP, weights, strategy, base_dtype="bfloat16")


def test_targets_parse_from_a_comma_separated_string_in_a_fixed_order():
    assert lora.Config(2, targets="mlp/c_fc, attn/c_attn").targets == ("attn/c_attn", "mlp/c_fc")
    assert lora.Config(2).targets == ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
    assert lora.Config(2).scale == 1.0 and lora.Config(4, alpha=8).scale == 2.0
