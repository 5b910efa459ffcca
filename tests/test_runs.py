"""Run directories: loadable as model directories, atomic saves, rotation, optimizer state,
failed and killed saves, file modes."""
import errno
import os
import stat

import numpy as np
import pytest
import tensorflow as tf

import checkpoint
import model
import runs
import trainer
from cli import UserError
from conftest import TINY_HPARAMS
from encoder import DEFAULT_VOCAB_DIR
from hparams import HParams

HP = HParams(**TINY_HPARAMS)


@pytest.fixture()
def setup(tmp_path):
    strategy = tf.distribute.get_strategy()
    lm = trainer.build_model(HP, checkpoint.random_weights(HP, seed=4), strategy)
    t = trainer.Trainer(lm, strategy, learning_rate=1e-3)
    run_dir = str(tmp_path / "checkpoint" / "run1")
    runs.prepare(run_dir, DEFAULT_VOCAB_DIR, HP)
    return t, run_dir


def train_once(t, step):
    t.train_step([np.random.default_rng(step).integers(0, HP.n_vocab, (1, 8)).astype(np.int32)], step)


def test_a_save_is_a_model_directory_the_loader_reads(setup):
    t, run_dir = setup
    train_once(t, 0)
    runs.save(run_dir, 1, t.lm, t.optimizer)
    loaded = model.load_model("run1", os.path.dirname(run_dir))
    for name, variable in t.lm.weights.items():
        np.testing.assert_array_equal(loaded.weights[name].numpy(), variable.numpy())
    assert runs.latest_step(run_dir) == 1
    # A TF1 name-based restore reads it too: the names are the released ones.
    reader = tf.train.load_checkpoint(os.path.join(run_dir, "model-1"))
    assert set(reader.get_variable_to_shape_map()) == set(checkpoint.variable_shapes(HP))


def test_a_crash_mid_save_leaves_the_previous_save_loadable(setup, monkeypatch):
    t, run_dir = setup
    runs.save(run_dir, 1, t.lm, t.optimizer)
    before = {n: v.numpy() for n, v in t.lm.weights.items()}
    train_once(t, 1)

    def crash(path, text):
        raise KeyboardInterrupt  # as if the process died before `checkpoint` was replaced

    monkeypatch.setattr(runs, "write_atomically", crash)
    with pytest.raises(KeyboardInterrupt):
        runs.save(run_dir, 2, t.lm, t.optimizer)
    monkeypatch.undo()
    assert runs.latest_step(run_dir) == 1
    loaded = model.load_model("run1", os.path.dirname(run_dir))
    for name, value in before.items():
        np.testing.assert_array_equal(loaded.weights[name].numpy(), value)


def test_rotation_keeps_the_newest_saves_and_one_optimizer_state(setup):
    t, run_dir = setup
    for step in range(1, 5):
        runs.save(run_dir, step, t.lm, t.optimizer, max_to_keep=2)
    assert runs.saved_steps(run_dir) == [3, 4]
    names = os.listdir(run_dir)
    assert {n.split(".")[0] for n in names if n.startswith(("model-", "optimizer-"))} == {
        "model-3", "model-4", "optimizer-4"}
    assert open(os.path.join(run_dir, "counter")).read().strip() == "4"


def test_optimizer_state_round_trips(setup):
    t, run_dir = setup
    for step in range(2):
        train_once(t, step)
    runs.save(run_dir, 2, t.lm, t.optimizer)
    strategy = tf.distribute.get_strategy()
    other = trainer.Trainer(trainer.build_model(HP, checkpoint.random_weights(HP, seed=4), strategy), strategy)
    assert runs.restore_optimizer(run_dir, 2, other.optimizer)
    assert int(other.optimizer.iterations.numpy()) == 2
    for name, slot in t.optimizer.slots.items():
        np.testing.assert_array_equal(other.optimizer.slots[name].numpy(), slot.numpy())
    # Saved as the fork saved them: each slot in its variable's checkpoint shape.
    saved = tf.train.load_checkpoint(os.path.join(run_dir, "optimizer-2")).get_variable_to_shape_map()
    shapes = checkpoint.variable_shapes(HP)
    assert saved["model/h0/mlp/c_fc/w/Adam"] == shapes["model/h0/mlp/c_fc/w"]
    assert saved["model/wte/Adam_1"] == shapes["model/wte"]
    sgd = trainer.Trainer(trainer.build_model(HP, checkpoint.random_weights(HP), strategy), strategy, optimizer="sgd")
    assert runs.restore_optimizer(run_dir, 2, sgd.optimizer)  # no slots to restore: only the step count
    assert not runs.restore_optimizer(run_dir, 3, other.optimizer)


def run_files(run_dir):
    return sorted(os.listdir(run_dir))


def test_a_full_disk_during_a_save_is_a_user_error_that_keeps_the_previous_save(setup, monkeypatch):
    t, run_dir = setup
    runs.save(run_dir, 1, t.lm, t.optimizer)
    before = {n: v.numpy() for n, v in t.lm.weights.items()}
    files = run_files(run_dir)
    train_once(t, 1)
    real = runs._save_bundle

    def disk_fills(prefix, tensors):
        if os.path.basename(prefix).startswith("optimizer-"):  # the model bundle fits, its optimizer's does not
            open(prefix + ".data-00000-of-00001.tempstate123", "wb").close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(prefix, tensors)

    monkeypatch.setattr(runs, "_save_bundle", disk_fills)
    with pytest.raises(UserError) as raised:
        runs.save(run_dir, 2, t.lm, t.optimizer)
    message = str(raised.value)
    assert "model-2" in message and os.strerror(errno.ENOSPC) in message and "model-1" in message
    assert len(message.splitlines()) == 1
    assert run_files(run_dir) == files  # nothing of the failed save is left
    assert runs.latest_step(run_dir) == 1
    loaded = model.load_model("run1", os.path.dirname(run_dir))
    for name, value in before.items():
        np.testing.assert_array_equal(loaded.weights[name].numpy(), value)


def test_prepare_removes_what_killed_saves_left(setup):
    t, run_dir = setup
    for step in (1, 2):
        runs.save(run_dir, step, t.lm, t.optimizer)
    kept = run_files(run_dir)
    leftovers = ["model-3.index", "model-3.data-00000-of-00001", "optimizer-3.data-00000-of-00001.tempstate42",
                 "optimizer-1.index", "model-2.index.tempstate7", ".counter.123.0123abcd.tmp"]
    mine = ["notes.txt", "model-0.data-00000-of-00001"]  # not a save's leftover: an older unlisted bundle
    for name in leftovers + mine:
        open(os.path.join(run_dir, name), "wb").close()
    runs.prepare(run_dir, DEFAULT_VOCAB_DIR, HP)
    assert run_files(run_dir) == sorted(kept + mine)
    assert runs.latest_step(run_dir) == 2 and runs.restore_optimizer(run_dir, 2, t.optimizer)


def test_run_directory_files_get_the_umask_as_the_weights_do(setup):
    t, run_dir = setup
    masked = os.path.join(os.path.dirname(run_dir), "masked")  # `setup` prepared run_dir under the usual umask
    previous = os.umask(0o027)
    try:
        runs.prepare(masked, DEFAULT_VOCAB_DIR, HP)
        runs.save(masked, 1, t.lm, t.optimizer)
    finally:
        os.umask(previous)
    modes = {name: stat.S_IMODE(os.stat(os.path.join(masked, name)).st_mode) for name in os.listdir(masked)}
    assert {"hparams.json", "encoder.json", "vocab.bpe", "checkpoint", "counter", "model-1.index"} <= set(modes)
    assert set(modes.values()) == {0o640}, modes


def test_mixed_precision_saves_weights_and_optimizer_state_in_the_released_layout(tmp_path):
    # Matrices multiplied in bf16 are held [out, in]; saves must still be the checkpoint's [1, in, out].
    strategy = tf.distribute.get_strategy()
    weights = checkpoint.random_weights(HP, seed=4)
    t = trainer.Trainer(trainer.build_model(HP, weights, strategy, "mixed_bfloat16"), strategy, learning_rate=1e-3)
    run_dir = str(tmp_path / "run")
    runs.prepare(run_dir, DEFAULT_VOCAB_DIR, HP)
    train_once(t, 0)
    runs.save(run_dir, 1, t.lm, t.optimizer)
    saved = tf.train.load_checkpoint(os.path.join(run_dir, "optimizer-1")).get_variable_to_shape_map()
    assert saved["model/h0/mlp/c_fc/w/Adam"] == checkpoint.variable_shapes(HP)["model/h0/mlp/c_fc/w"]
    other = trainer.Trainer(trainer.build_model(HP, checkpoint.read_weights(run_dir, HP), strategy, "mixed_bfloat16"),
                            strategy)
    assert runs.restore_optimizer(run_dir, 1, other.optimizer, other.lm.compute_dtype)
    for name, slot in t.optimizer.slots.items():
        np.testing.assert_array_equal(other.optimizer.slots[name].numpy(), slot.numpy())
    moved = checkpoint.read_weights(run_dir, HP)["model/h0/mlp/c_fc/w"].numpy() - weights["model/h0/mlp/c_fc/w"]
    assert 0 < np.abs(moved).max() < 0.01  # one small step, in the released orientation


def test_adafactor_state_round_trips_across_precisions(tmp_path):
    # Its factored rows and columns follow the released layout, so a bf16 run resumes in float32.
    strategy = tf.distribute.get_strategy()
    weights = checkpoint.random_weights(HP, seed=4)
    t = trainer.Trainer(trainer.build_model(HP, weights, strategy, "mixed_bfloat16"), strategy,
                        optimizer="adafactor", optimizer_options=dict(adafactor_beta1=0.5))
    run_dir = str(tmp_path / "run")
    runs.prepare(run_dir, DEFAULT_VOCAB_DIR, HP)
    train_once(t, 0)
    train_once(t, 1)
    runs.save(run_dir, 2, t.lm, t.optimizer)
    saved = tf.train.load_checkpoint(os.path.join(run_dir, "optimizer-2")).get_variable_to_shape_map()
    d = HP.n_embd
    assert saved["model/h0/mlp/c_fc/w/Adafactor_vr"] == [d] and saved["model/h0/mlp/c_fc/w/Adafactor_vc"] == [4 * d]
    assert saved["model/h0/mlp/c_fc/w/Adafactor_m"] == [1, d, 4 * d]
    other = trainer.Trainer(trainer.build_model(HP, checkpoint.read_weights(run_dir, HP), strategy), strategy,
                            optimizer="adafactor", optimizer_options=dict(adafactor_beta1=0.5))
    assert runs.restore_optimizer(run_dir, 2, other.optimizer, other.lm.compute_dtype)
    assert int(other.optimizer.iterations.numpy()) == 2
    for name, slot in t.optimizer.slots.items():
        expected = checkpoint.to_checkpoint_layout(name.rsplit("/", 1)[0], slot, tf.bfloat16) if slot.shape.rank == 2 \
            else slot
        got = checkpoint.to_checkpoint_layout(name.rsplit("/", 1)[0], other.optimizer.slots[name]) \
            if slot.shape.rank == 2 else other.optimizer.slots[name]
        np.testing.assert_array_equal(got.numpy(), expected.numpy(), err_msg=name)
    # Adam's slots are not Adafactor's: a switch of optimizer starts from fresh moments.
    adam = trainer.Trainer(trainer.build_model(HP, weights, strategy), strategy)
    assert not runs.restore_optimizer(run_dir, 2, adam.optimizer)
