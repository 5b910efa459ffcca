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


def trained(weights, config, steps=2, **options):
    """A LoRA model and its trainer after `steps` Adam steps on random windows."""
    strategy = tf.distribute.get_strategy()
    lm = trainer.build_model(HP, weights, strategy, options.pop("precision", "float32"), lora=config, seed=3)
    t = trainer.Trainer(lm, strategy, learning_rate=options.pop("learning_rate", 3e-2), **options)
    rng = np.random.default_rng(0)
    for step in range(steps):
        t.train_step([rng.integers(0, HP.n_vocab, (2, 16)).astype(np.int32)], step)
    return lm, t


@pytest.fixture(scope="module")
def adapted(weights):
    return trained(weights, lora.Config(4, alpha=8.0, targets=("attn/c_attn", "mlp/c_proj")))


def test_only_the_adapters_train(weights, adapted):
    lm, t = adapted
    assert {v.name.split(":")[0] for v in t.variables} == set(lm.adapters)
    assert len(lm.adapters) == 2 * 2 * HP.n_layer
    for name, variable in lm.weights.items():
        assert not variable.trainable
        np.testing.assert_array_equal(checkpoint.to_checkpoint_layout(name, variable).numpy(), weights[name],
                                      err_msg=name)
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
                                adapters=lm.adapter_values())
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
                                  lora=lm.config, adapters=adapters)
    for name, variable in lm.weights.items():
        np.testing.assert_allclose(resumed.weights[name].numpy(), variable.numpy(), atol=1e-6, err_msg=name)
    for name, variable in lm.adapters.items():
        np.testing.assert_array_equal(resumed.adapters[name].numpy(), variable.numpy())
    t2 = trainer.Trainer(resumed, tf.distribute.get_strategy())
    assert runs.restore_optimizer(run_dir, 3, t2.optimizer)
    for name, slot in t.optimizer.slots.items():
        np.testing.assert_array_equal(t2.optimizer.slots[name].numpy(), slot.numpy())


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


def test_targets_parse_from_a_comma_separated_string_in_a_fixed_order():
    assert lora.Config(2, targets="mlp/c_fc, attn/c_attn").targets == ("attn/c_attn", "mlp/c_fc")
    assert lora.Config(2).targets == ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
    assert lora.Config(2).scale == 1.0 and lora.Config(4, alpha=8).scale == 2.0
