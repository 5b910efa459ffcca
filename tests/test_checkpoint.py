"""The released checkpoint format: what we write, TF1 reads; what TF1 writes, we read; bad files fail clearly."""
import os

import numpy as np
import pytest
import tensorflow as tf

import checkpoint
import model_files
from cli import UserError
from hparams import SIZES, HParams

SMALL = HParams(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2, n_layer=1)
RELEASED_FILES = {"checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
                  "model.ckpt.index", "model.ckpt.meta", "vocab.bpe"}


def test_variable_names_and_shapes_of_124M():
    shapes = checkpoint.variable_shapes(SIZES["124M"])
    assert len(shapes) == 148
    assert shapes["model/wte"] == [50257, 768]
    assert shapes["model/wpe"] == [1024, 768]
    assert shapes["model/h0/attn/c_attn/w"] == [1, 768, 2304]
    assert shapes["model/h11/mlp/c_proj/w"] == [1, 3072, 768]
    assert shapes["model/ln_f/g"] == [768]
    # The parameter count the model is named for.
    assert sum(int(np.prod(s)) for s in shapes.values()) == 124_439_808


def test_writer_makes_the_released_file_set(tmp_path):
    path = checkpoint.write_random_model(str(tmp_path / "m"), SMALL, seed=3)
    assert set(os.listdir(path)) == RELEASED_FILES
    with open(os.path.join(path, "checkpoint")) as f:
        assert f.read() == 'model_checkpoint_path: "model.ckpt"\nall_model_checkpoint_paths: "model.ckpt"\n'
    with open(os.path.join(path, "hparams.json")) as f:
        assert f.read().startswith('{\n  "n_vocab": 50257,\n  "n_ctx": 16,')
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staging left behind


def test_tf1_name_based_restore_reads_what_we_write(tmp_path):
    weights = checkpoint.random_weights(SMALL, seed=4)
    path = checkpoint.write_model_dir(str(tmp_path / "m"), SMALL, weights)
    graph = tf.Graph()
    with graph.as_default():
        # The way TF1 code (the reference's scripts) restores: variables by name, a Saver.
        variables = {name: tf.compat.v1.get_variable(name, shape) for name, shape in
                     checkpoint.variable_shapes(SMALL).items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        with tf.compat.v1.Session(graph=graph) as session:
            saver.restore(session, tf.train.latest_checkpoint(path))
            restored = session.run(variables)
    for name, value in weights.items():
        np.testing.assert_array_equal(restored[name], value)


def test_reader_returns_the_written_values(tmp_path):
    weights = checkpoint.random_weights(SMALL, seed=5)
    path = checkpoint.write_model_dir(str(tmp_path / "m"), SMALL, weights)
    read = checkpoint.read_weights(path, SMALL)
    assert set(read) == set(weights)
    for name in weights:
        np.testing.assert_array_equal(read[name].numpy(), weights[name])


def test_checkpoint_weights_know_every_shape_and_read_each_tensor_on_lookup(tmp_path, monkeypatch):
    weights = checkpoint.random_weights(SMALL, seed=5)
    path = checkpoint.write_model_dir(str(tmp_path / "m"), SMALL, weights)
    lazy = checkpoint.CheckpointWeights(path, SMALL)
    reads = []
    restore = tf.raw_ops.RestoreV2
    monkeypatch.setattr(tf.raw_ops, "RestoreV2", lambda **kw: reads.append(kw["tensor_names"]) or restore(**kw))
    assert lazy.shapes == checkpoint.variable_shapes(SMALL) and len(lazy) == len(weights)
    assert reads == []
    np.testing.assert_array_equal(lazy["model/h0/mlp/c_fc/w"].numpy(), weights["model/h0/mlp/c_fc/w"])
    assert reads == [["model/h0/mlp/c_fc/w"]]
    with pytest.raises(KeyError):
        lazy["model/h9/mlp/c_fc/w"]


def test_rewriting_replaces_the_model(tmp_path):
    path = str(tmp_path / "m")
    checkpoint.write_random_model(path, SMALL, seed=1)
    checkpoint.write_random_model(path, SMALL, seed=2)
    read = checkpoint.read_weights(path, SMALL)
    np.testing.assert_array_equal(read["model/wte"].numpy(), checkpoint.random_weights(SMALL, seed=2)["model/wte"])


def test_mismatched_hparams_name_the_misshaped_variables(tmp_path):
    path = checkpoint.write_random_model(str(tmp_path / "m"), SMALL)
    wider = HParams(n_vocab=50257, n_ctx=16, n_embd=12, n_head=2, n_layer=1)
    with pytest.raises(UserError, match=r"mis-shaped: model/wte \[50257, 8\] \(expected \[50257, 12\]\).* and 11 more"):
        checkpoint.read_weights(path, wider)


def test_missing_and_unexpected_variables_are_named(tmp_path):
    path = checkpoint.write_random_model(str(tmp_path / "m"), SMALL)
    deeper = HParams(n_vocab=50257, n_ctx=16, n_embd=8, n_head=2, n_layer=2)
    with pytest.raises(UserError, match=r"missing: model/h1/"):
        checkpoint.read_weights(path, deeper)
    shallower_path = checkpoint.write_random_model(str(tmp_path / "deep"), deeper)
    with pytest.raises(UserError, match=r"unexpected: model/h1/"):
        checkpoint.read_weights(shallower_path, SMALL)


def test_truncated_data_file_is_a_user_error(tmp_path):
    path = checkpoint.write_random_model(str(tmp_path / "m"), SMALL)
    data = os.path.join(path, "model.ckpt.data-00000-of-00001")
    size = os.path.getsize(data)
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(UserError, match="corrupt or truncated.*download_model.py"):
        checkpoint.read_weights(path, SMALL)


def test_corrupted_bytes_are_caught_by_the_checksums(tmp_path):
    path = checkpoint.write_random_model(str(tmp_path / "m"), SMALL)
    data = os.path.join(path, "model.ckpt.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(UserError, match="corrupt or truncated"):
        checkpoint.read_weights(path, SMALL)


def test_garbage_index_is_a_user_error(tmp_path):
    path = checkpoint.write_random_model(str(tmp_path / "m"), SMALL)
    with open(os.path.join(path, "model.ckpt.index"), "wb") as f:
        f.write(b"<html>not found</html>")
    with pytest.raises(UserError, match="unreadable"):
        checkpoint.read_weights(path, SMALL)


def test_missing_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint"):
        checkpoint.read_weights(str(tmp_path / "empty"), SMALL)


def test_a_copied_directory_reads_its_own_weights_not_the_absolute_path_in_checkpoint(tmp_path):
    original = checkpoint.write_random_model(str(tmp_path / "original"), SMALL, seed=1)
    copy = checkpoint.write_random_model(str(tmp_path / "copy"), SMALL, seed=2)
    # TF1 savers write absolute paths; this one names the original's files.
    with open(os.path.join(copy, "checkpoint"), "w") as f:
        f.write(f'model_checkpoint_path: "{original}/model.ckpt"\n')
    own = checkpoint.read_weights(copy, SMALL)["model/wte"].numpy()
    np.testing.assert_array_equal(own, checkpoint.random_weights(SMALL, seed=2)["model/wte"])
    # And when the original has moved away, the copy still loads.
    os.rename(original, str(tmp_path / "moved"))
    assert model_files.checkpoint_prefix(copy) == os.path.join(copy, "model.ckpt")


def test_a_checkpoint_file_may_not_point_outside_its_directory(tmp_path):
    checkpoint.write_random_model(str(tmp_path / "other"), SMALL)
    path = checkpoint.write_random_model(str(tmp_path / "m"), SMALL)
    with open(os.path.join(path, "checkpoint"), "w") as f:
        f.write('model_checkpoint_path: "../other/model.ckpt"\n')
    with pytest.raises(UserError, match="no checkpoint '../other/model.ckpt' in"):
        model_files.checkpoint_prefix(path)


def test_corrupt_checkpoint_errors_carry_no_tensorflow_function_tags(tmp_path):
    path = checkpoint.write_random_model(str(tmp_path / "m"), SMALL)
    data = os.path.join(path, "model.ckpt.data-00000-of-00001")
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(UserError) as caught:
        checkpoint.read_weights(path, SMALL)
    assert "{{" not in str(caught.value) and "function_node" not in str(caught.value)
    assert "\n" not in str(caught.value)
