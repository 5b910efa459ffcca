"""convert.py: released -> Hugging Face -> released bit for bit, transformers loading what it
writes, Hugging Face -> released exactly, atomic output, the command line."""
import os

import numpy as np
import pytest

import convert
import hf_format
from conftest import run_main, run_script
from errors import UserError
from runtime import tf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file  # noqa: E402


def variables(model_dir):
    """Every variable of a released-format checkpoint, as stored."""
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "model.ckpt"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def round_trip(tiny_models_dir, tmp_path_factory):
    """The tiny released model converted to Hugging Face's format, and that back again."""
    out = tmp_path_factory.mktemp("convert")
    convert.convert_dir(os.path.join(tiny_models_dir, "tiny"), str(out / "hf"))
    convert.convert_dir(str(out / "hf"), str(out / "back"))
    return str(out / "hf"), str(out / "back")


def test_released_to_hugging_face_and_back_is_bit_for_bit(tiny_models_dir, round_trip):
    source = os.path.join(tiny_models_dir, "tiny")
    hf_dir, back = round_trip
    assert sorted(os.listdir(hf_dir)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert len({os.stat(os.path.join(hf_dir, name)).st_mode for name in os.listdir(hf_dir)}) == 1
    original, again = variables(source), variables(back)
    assert sorted(original) == sorted(again)
    for name, value in original.items():
        assert value.dtype == again[name].dtype == np.float32
        assert value.tobytes() == again[name].tobytes(), name
    for name in ["hparams.json", "encoder.json", "vocab.bpe", "checkpoint", "model.ckpt.index",
                 "model.ckpt.data-00000-of-00001"]:
        assert read_bytes(os.path.join(source, name)) == read_bytes(os.path.join(back, name)), name


def test_transformers_loads_the_written_directory_with_the_same_logits(tiny_lm, round_trip):
    hf_dir, _ = round_trip
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    x = np.random.default_rng(0).integers(0, 50257, size=(2, 20))
    with torch.no_grad():
        theirs = hf(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(tiny_lm(x.astype(np.int32))["logits"].numpy(), theirs, atol=1e-4, rtol=0)
    text = "Héllo wörld, GPT-2's tokenizer\n\n  reads this too."
    import encoder

    ours = encoder.Encoder.from_dir(encoder.default_vocab_dir()).encode(text)
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"] == ours


def test_hugging_face_to_released_copies_the_weights_exactly(tiny_hf_dir, tmp_path):
    convert.convert_dir(tiny_hf_dir, str(tmp_path / "released"))
    state = load_file(os.path.join(tiny_hf_dir, hf_format.WEIGHTS_FILE))
    stored = variables(str(tmp_path / "released"))
    assert len(stored) == len(state) == 4 + 12 * 2  # wte, wpe, ln_f and 12 tensors a layer
    for name, value in stored.items():
        want = state[hf_format.hf_name(name)]
        assert value.shape == ((1, *want.shape) if name.endswith("/w") else want.shape)
        assert value.tobytes() == want.tobytes(), name


def test_an_interrupted_conversion_leaves_nothing(tiny_models_dir, tmp_path, monkeypatch):
    def disk_full(directory, *args):
        with open(os.path.join(directory, hf_format.WEIGHTS_FILE), "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_format, "write_files", disk_full)
    with pytest.raises(UserError, match="cannot write .*: No space left on device"):
        convert.convert_dir(os.path.join(tiny_models_dir, "tiny"), str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_the_command_line_converts_and_refuses_an_existing_output(tiny_hf_dir, tmp_path):
    models_dir, name = os.path.dirname(tiny_hf_dir), os.path.basename(tiny_hf_dir)
    out = tmp_path / "released"
    result = run_script("convert.py", name, out, "--models_dir", models_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {out} in the released format"
    result = run_main("convert.py", name, out, "--models_dir", models_dir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: out '{out}' already exists: choose a new directory"]
    (tmp_path / "empty").mkdir()
    result = run_main("convert.py", "empty", tmp_path / "other", "--models_dir", tmp_path)
    assert result.returncode == 2 and "neither hparams.json" in result.stderr and len(result.stderr.splitlines()) == 1
