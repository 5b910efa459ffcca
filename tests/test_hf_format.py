"""Hugging Face model directories: detection by files, config checks, the weights' layouts and
files, and fidelity against transformers reading the same directory."""
import json
import os
import shutil

import numpy as np
import pytest

import api
import checkpoint
import hf_format
import model_files
import model
from conftest import run_main, run_script
from errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402


@pytest.fixture(scope="module")
def theirs(tiny_hf_dir):
    """transformers' own model, read from the directory."""
    return transformers.GPT2LMHeadModel.from_pretrained(tiny_hf_dir).eval()


@pytest.fixture(scope="module")
def state(tiny_hf_dir):
    """The tensors transformers wrote, by its names."""
    return load_file(os.path.join(tiny_hf_dir, hf_format.WEIGHTS_FILE))


@pytest.fixture(scope="module")
def from_hf(tiny_hf_dir):
    """The directory loaded through the API, once for the tests that only read it."""
    return api.load(os.path.basename(tiny_hf_dir), os.path.dirname(tiny_hf_dir))


def tokens(batch, length, seed):
    return np.random.default_rng(seed).integers(0, 50257, size=(batch, length)).astype(np.int32)


def their_logits(hf, x):
    with torch.no_grad():
        return hf(torch.from_numpy(x.astype(np.int64))).logits.numpy()


def variant(tiny_hf_dir, tmp_path, config=None, tensors=None, drop=()):
    """A copy of the tiny Hugging Face directory with config.json changed, other tensors, or files removed."""
    path = tmp_path / "variant"
    shutil.copytree(tiny_hf_dir, path)
    if config is not None:
        values = json.loads((path / hf_format.CONFIG_FILE).read_text())
        values.update(config)
        for key in [k for k, v in config.items() if v is None]:
            del values[key]
        (path / hf_format.CONFIG_FILE).write_text(json.dumps(values))
    if tensors is not None:
        save_file(tensors, str(path / hf_format.WEIGHTS_FILE), metadata={"format": "pt"})
    for name in drop:
        os.remove(path / name)
    return str(path)


def load_error(path):
    with pytest.raises(UserError) as caught:
        model.load_model(os.path.basename(path), os.path.dirname(path))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_logits_match_transformers_reading_the_same_directory(tiny_hf_dir, theirs):
    ours = model.load_model(os.path.basename(tiny_hf_dir), os.path.dirname(tiny_hf_dir))
    assert ours.hparams == model.HParams(n_vocab=50257, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
    for batch, length in [(1, 1), (2, 13), (1, 64)]:
        x = tokens(batch, length, seed=length)
        np.testing.assert_allclose(ours(x)["logits"].numpy(), their_logits(theirs, x), atol=1e-4, rtol=0)


def test_greedy_output_equals_the_released_format_of_the_same_weights(tiny_hf_dir, from_hf, tmp_path):
    import convert

    convert.convert_dir(tiny_hf_dir, str(tmp_path / "released"))
    released = api.load("released", str(tmp_path))
    prompts = ["Hello there", "The quick brown fox"]
    text = from_hf.generate(prompts, length=20, temperature=0)
    assert text == released.generate(prompts, length=20, temperature=0)
    assert len(set(text)) == 2 and all(text)
    # Saving a model read from a Hugging Face directory writes the released format, vocabulary renamed.
    from_hf.save(str(tmp_path / "saved"))
    for hf_name, name in [("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")]:
        assert (tmp_path / "saved" / name).read_bytes() == open(os.path.join(tiny_hf_dir, hf_name), "rb").read()
    assert api.load("saved", str(tmp_path)).generate(prompts, length=20, temperature=0) == text


def test_transformers_leaves_the_tied_output_out_and_conv1d_weights_keep_in_out(tiny_hf_dir, state):
    assert hf_format.OUTPUT_NAME not in state  # so the tests above load a directory without lm_head
    weights = hf_format.HFWeights(tiny_hf_dir)
    c_attn = weights["model/h1/attn/c_attn/w"]
    assert c_attn.shape == (1, 32, 96) and weights.shapes["model/h1/attn/c_attn/w"] == [1, 32, 96]
    np.testing.assert_array_equal(c_attn[0], state["transformer.h.1.attn.c_attn.weight"])
    np.testing.assert_array_equal(weights["model/h0/ln_2/g"], state["transformer.h.0.ln_2.weight"])
    np.testing.assert_array_equal(weights["model/wte"], state["transformer.wte.weight"])


def test_the_hubs_layout_loads_names_without_transformer_mask_buffers_and_float16(tiny_hf_dir, state, tmp_path,
                                                                                 theirs):
    # openai-community/gpt2's file: names without "transformer.", the attention masks saved, float16 here.
    tensors = {name.removeprefix("transformer."): value.astype(np.float16) for name, value in state.items()}
    tensors.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float16)) for i in range(2)})
    path = variant(tiny_hf_dir, tmp_path, tensors=tensors)
    weights = hf_format.HFWeights(path)
    assert checkpoint.compare_shapes(checkpoint.variable_shapes(model_files.load_hparams(path)), weights.shapes) is None
    value = weights["model/h0/mlp/c_fc/w"]
    assert value.dtype == np.float32
    np.testing.assert_array_equal(value[0], state["transformer.h.0.mlp.c_fc.weight"].astype(np.float16))
    lm = model.load_model("variant", str(tmp_path))
    x = tokens(1, 9, seed=3)
    np.testing.assert_allclose(lm(x)["logits"].numpy(), their_logits(theirs, x), atol=0.05, rtol=0)


def test_an_lm_head_equal_to_wte_loads_and_a_different_one_is_refused(tiny_hf_dir, state, tmp_path, theirs):
    tied = dict(state, **{hf_format.OUTPUT_NAME: state["transformer.wte.weight"]})
    lm = model.load_model("variant", os.path.dirname(variant(tiny_hf_dir, tmp_path / "tied", tensors=tied)))
    x = tokens(1, 5, seed=5)
    np.testing.assert_allclose(lm(x)["logits"].numpy(), their_logits(theirs, x), atol=1e-4, rtol=0)
    untied = dict(state, **{hf_format.OUTPUT_NAME: state["transformer.wte.weight"] + 1})
    assert "lm_head.weight that differs from transformer.wte.weight" in load_error(
        variant(tiny_hf_dir, tmp_path / "untied", tensors=untied))
    assert "tie_word_embeddings false" in load_error(
        variant(tiny_hf_dir, tmp_path / "unset", config={"tie_word_embeddings": False}))


def test_a_config_with_n_ctx_instead_of_n_positions_loads(tiny_hf_dir, tmp_path, theirs):
    path = variant(tiny_hf_dir, tmp_path / "old", config={"n_positions": None, "n_ctx": 64})
    lm = model.load_model("variant", os.path.dirname(path))
    assert lm.hparams.n_ctx == 64
    x = tokens(1, 64, seed=7)
    np.testing.assert_allclose(lm(x)["logits"].numpy(), their_logits(theirs, x), atol=1e-4, rtol=0)
    assert "(n_ctx is 32, GPT-2 has 64)" in load_error(
        variant(tiny_hf_dir, tmp_path / "both", config={"n_ctx": 32}))


@pytest.mark.parametrize("setting, value", [
    ("model_type", "llama"), ("activation_function", "relu"), ("activation_function", "gelu"),
    ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True), ("scale_attn_weights", False),
    ("layer_norm_epsilon", 1e-6), ("add_cross_attention", True), ("n_inner", 64)])
def test_a_config_that_is_not_gpt2_is_refused_naming_the_setting(tiny_hf_dir, tmp_path, setting, value):
    message = load_error(variant(tiny_hf_dir, tmp_path, config={setting: value}))
    assert f"is not a GPT-2 config ({setting} is {json.dumps(value)}, GPT-2 has " in message


def test_detection_is_by_the_files_and_errors_name_what_is_missing(tiny_hf_dir, tmp_path):
    assert hf_format.is_hf_dir(tiny_hf_dir) and not hf_format.is_hf_dir(str(tmp_path))
    message = load_error(variant(tiny_hf_dir, tmp_path / "bare", drop=[hf_format.WEIGHTS_FILE, "merges.txt"]))
    assert "has config.json but lacks model.safetensors, merges.txt" in message
    (tmp_path / "empty").mkdir()
    message = load_error(str(tmp_path / "empty"))
    assert "neither hparams.json" in message and "nor config.json" in message


def test_weights_of_another_shape_are_named(tiny_hf_dir, state, tmp_path):
    swapped = dict(state, **{"transformer.h.0.attn.c_attn.weight": state["transformer.h.0.attn.c_attn.weight"].T})
    swapped["transformer.h.0.crossattention.c_attn.weight"] = swapped.pop("transformer.h.1.mlp.c_fc.weight")
    message = load_error(variant(tiny_hf_dir, tmp_path, tensors=swapped))
    assert "missing: model/h1/mlp/c_fc/w" in message
    assert "unexpected: model/h0/crossattention/c_attn/w" in message
    assert "mis-shaped: model/h0/attn/c_attn/w [1, 96, 32] (expected [1, 32, 96])" in message


def test_sharded_safetensors_load_through_their_index(tiny_hf_dir, state, tmp_path, theirs):
    path = variant(tiny_hf_dir, tmp_path, drop=[hf_format.WEIGHTS_FILE])
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({n: state[n] for n in members}, os.path.join(path, shard), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: shard for shard, members in shards.items() for n in members}}
    with open(os.path.join(path, hf_format.INDEX_FILE), "w") as f:
        json.dump(index, f)
    lm = model.load_model("variant", str(tmp_path))
    x = tokens(2, 6, seed=11)
    np.testing.assert_allclose(lm(x)["logits"].numpy(), their_logits(theirs, x), atol=1e-4, rtol=0)
    os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
    assert "missing: model-00002-of-00002.safetensors" in load_error(path)


class NotATensor:
    """An object a weights-only unpickler must refuse (any class could run code as it unpickles)."""


def test_pytorch_model_bin_loads_only_without_unpickling_code(tiny_hf_dir, state, tmp_path, theirs, monkeypatch):
    path = variant(tiny_hf_dir, tmp_path / "bin", drop=[hf_format.WEIGHTS_FILE])
    torch.save({n: torch.from_numpy(v) for n, v in state.items()}, os.path.join(path, hf_format.PICKLE_FILE))
    lm = model.load_model("variant", os.path.dirname(path))
    x = tokens(1, 8, seed=13)
    np.testing.assert_allclose(lm(x)["logits"].numpy(), their_logits(theirs, x), atol=1e-4, rtol=0)

    unsafe = variant(tiny_hf_dir, tmp_path / "unsafe", drop=[hf_format.WEIGHTS_FILE])
    torch.save({"transformer.wte.weight": NotATensor()}, os.path.join(unsafe, hf_format.PICKLE_FILE))
    message = load_error(unsafe)
    assert "cannot be read without unpickling arbitrary code" in message and "model.safetensors" in message

    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were not installed
    message = load_error(path)
    assert "torch is not installed" in message and "convert it to model.safetensors" in message


def test_scripts_accept_a_hugging_face_directory(tiny_hf_dir, from_hf, tmp_path):
    models_dir, name = os.path.dirname(tiny_hf_dir), os.path.basename(tiny_hf_dir)
    prompt = "The quick brown fox"
    sampled = run_main("generate_conditional_samples.py", prompt, "--models_dir", models_dir, "--model_name", name,
                       "--temperature", "0", "--length", "12")
    assert sampled.returncode == 0, sampled.stderr
    expected = from_hf.generate(prompt, length=12, temperature=0)
    assert expected in sampled.stdout

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A small corpus to take two steps on. " * 4, encoding="utf-8")
    trained = run_script("train.py", "--dataset", corpus, "--models_dir", models_dir, "--model_name", name,
                         "--checkpoint_dir", tmp_path / "checkpoint", "--sample_dir", tmp_path / "samples",
                         "--max_steps", "2", "--sample_every", "0", "--save_every", "2", "--xla", "False")
    assert trained.returncode == 0, trained.stderr
    run = tmp_path / "checkpoint" / "run1"
    assert {"hparams.json", "encoder.json", "vocab.bpe", "model-2.index"} <= set(os.listdir(run))
    assert model.load_model("run1", str(tmp_path / "checkpoint")).hparams.n_ctx == 64


def test_score_reads_a_hugging_face_directory(tiny_hf_dir, theirs, capsys):
    import score

    text = "Scoring a sentence with weights in Hugging Face's format."
    path = os.path.join(os.path.dirname(tiny_hf_dir), "text.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    score.score(path, model_name=os.path.basename(tiny_hf_dir), models_dir=os.path.dirname(tiny_hf_dir), json=True)
    report = json.loads(capsys.readouterr().out)
    ids = transformers.GPT2Tokenizer.from_pretrained(tiny_hf_dir)(text)["input_ids"]
    assert [t["id"] for t in report["token_logprobs"]] == ids
    # transformers' log-likelihood of every token after the first, given <|endoftext|> before the first.
    x = np.array([[50256, *ids]], np.int32)
    logprobs = torch.log_softmax(torch.from_numpy(their_logits(theirs, x)[0, :-1]), -1).numpy()
    want = logprobs[np.arange(len(ids)), ids]
    np.testing.assert_allclose([t["logprob"] for t in report["token_logprobs"]], want, atol=1e-4)


def test_the_name_mapping_examples_hold():
    import doctest

    results = doctest.testmod(hf_format)
    assert results.attempted >= 2 and results.failed == 0


@pytest.fixture(scope="module")
def tokenizer_json_only(tiny_hf_dir, tmp_path_factory):
    """The tiny directory as transformers 5 saves a tokenizer: tokenizer.json, no vocab.json or merges.txt."""
    path = tmp_path_factory.mktemp("tokenizer") / "variant"
    shutil.copytree(tiny_hf_dir, path)
    transformers.GPT2Tokenizer.from_pretrained(tiny_hf_dir).save_pretrained(str(path))
    for name in ("vocab.json", "merges.txt"):
        os.remove(path / name)
    return str(path)


def test_a_tokenizer_json_alone_serves_as_the_vocabulary(tokenizer_json_only, tmp_path):
    import convert
    import encoder

    assert "tokenizer.json" in os.listdir(tokenizer_json_only)
    gpt = api.load("variant", os.path.dirname(tokenizer_json_only))
    text = "Tokenizers: ünïcode, 日本語 and  spaces\n\ntoo."
    assert gpt.encode(text) == transformers.AutoTokenizer.from_pretrained(tokenizer_json_only)(text)["input_ids"]
    convert.convert_dir(tokenizer_json_only, str(tmp_path / "released"))
    bundled = encoder.default_vocab_dir()
    assert json.loads((tmp_path / "released" / "encoder.json").read_text()) == json.loads(
        open(os.path.join(bundled, "encoder.json")).read())
    assert (tmp_path / "released" / "vocab.bpe").read_bytes() == open(os.path.join(bundled, "vocab.bpe"), "rb").read()


def test_a_tokenizer_json_that_is_not_byte_level_bpe_is_refused(tokenizer_json_only, tmp_path):
    path = tmp_path / "variant"
    shutil.copytree(tokenizer_json_only, path)
    data = json.loads((path / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="is not GPT-2's byte-level BPE .*pre_tokenizer 'Whitespace'"):
        api.load("variant", str(tmp_path))
