"""encode.py end to end: its .npz loads back to exactly what load_dataset makes of the text."""
import json
import os
import re
import shutil

import numpy as np
import pytest

import dataset
import encoder
from conftest import run_script
from test_generate_unconditional_samples import assert_one_line_error

SCRIPT = "encode.py"
SUMMARY = re.compile(r"wrote (\d+) chunks?, (\d+) tokens to (.+)")


@pytest.fixture(scope="module")
def enc():
    return encoder.Encoder.from_dir(encoder.default_vocab_dir())


@pytest.fixture
def corpus(tmp_path):
    """A directory of documents, a nested one included, enough for a few chunks at --combine 40."""
    root = tmp_path / "corpus"
    (root / "more").mkdir(parents=True)
    for i in range(6):
        (root / f"doc{i}.txt").write_text(f"Document {i}: the quick brown fox.\n\nIt jumps.", encoding="utf-8")
    (root / "more" / "last.txt").write_text("naïve 日本 <|endoftext|> stays text", encoding="utf-8")
    return root


def encode(*args, models_dir):
    return run_script(SCRIPT, *args, "--models_dir", models_dir)


def test_help_documents_every_flag():
    result = run_script(SCRIPT, "--help", env={"PAGER": "cat"})
    assert result.returncode == 0
    text = result.stdout + result.stderr
    for flag in ["model_name", "models_dir", "combine", "encoding"]:
        assert f"--{flag}" in text, flag
    assert "IN_TEXT" in text and "OUT_NPZ" in text


def test_output_loads_back_to_the_same_chunks(enc, corpus, tmp_path):
    out = tmp_path / "out" / "corpus.npz"
    result = encode(corpus, out, "--combine", 40, models_dir=tmp_path / "no-models")
    assert result.returncode == 0, result.stderr
    chunks, tokens, path = SUMMARY.fullmatch(result.stdout.strip()).groups()
    expected = dataset.load_dataset(enc, corpus, combine=40, progress=False)
    assert (int(chunks), int(tokens), path) == (len(expected), sum(map(len, expected)), str(out))
    assert len(expected) > 2
    with np.load(out) as npz:
        assert npz.files == [f"arr_{i}" for i in range(len(expected))]  # the fork's layout
        assert all(np.array_equal(npz[f"arr_{i}"], c) for i, c in enumerate(expected))
    loaded = dataset.load_dataset(enc, out, progress=False)
    assert len(loaded) == len(expected)
    assert all(a.dtype == np.int32 and np.array_equal(a, b) for a, b in zip(loaded, expected))
    assert os.listdir(out.parent) == ["corpus.npz"]  # no temporary file left behind


def test_npz_and_text_inputs_mix(enc, corpus, tmp_path):
    first = tmp_path / "first.npz"
    assert encode(corpus / "doc0.txt", first, models_dir=tmp_path).returncode == 0
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(first, mixed / "a.npz")
    (mixed / "b.txt").write_text("more text", encoding="utf-8")
    result = encode(mixed, tmp_path / "mixed.npz", models_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    with np.load(tmp_path / "mixed.npz") as npz:
        got = [npz[k].tolist() for k in npz.files]
    assert got == [enc.encode((corpus / "doc0.txt").read_text(encoding="utf-8")), enc.encode("more text")]


def test_npz_is_added_to_a_name_without_it(corpus, tmp_path):
    result = encode(corpus, tmp_path / "tokens", models_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(f"to {tmp_path / 'tokens.npz'} (.npz added to the name)")
    assert sorted(os.listdir(tmp_path)) == ["corpus", "tokens.npz"]


def test_the_model_directory_vocabulary_is_used_when_present(tmp_path):
    # A model whose vocabulary swaps the ids of "Hello" and "world" must encode with them swapped.
    vocab = encoder.default_vocab_dir()
    model = tmp_path / "models" / "custom"
    model.mkdir(parents=True)
    with open(os.path.join(vocab, "encoder.json"), encoding="utf-8") as f:
        table = json.load(f)
    table["Hello"], table["Ġworld"] = table["Ġworld"], table["Hello"]
    (model / "encoder.json").write_text(json.dumps(table), encoding="utf-8")
    shutil.copy(os.path.join(vocab, "vocab.bpe"), model / "vocab.bpe")
    (tmp_path / "in.txt").write_text("Hello world", encoding="utf-8")
    ids = {}
    for name in ["custom", "124M"]:  # 124M is not in that models_dir: the bundled vocabulary
        out = tmp_path / f"{name}.npz"
        result = encode(tmp_path / "in.txt", out, "--model_name", name, models_dir=tmp_path / "models")
        assert result.returncode == 0, result.stderr
        with np.load(out) as npz:
            ids[name] = npz["arr_0"].tolist()
    assert ids == {"124M": [15496, 995], "custom": [995, 15496]}


@pytest.mark.parametrize("setup,args,pattern", [
    (None, ["missing", "out.npz"], r"^error: no dataset files match '.*missing'"),
    ({"empty.txt": b""}, ["in", "out.npz"], r"^error: the dataset '.*in' holds no text"),
    ({"latin.txt": b"caf\xe9"}, ["in", "out.npz"], r"^error: .*latin\.txt is not valid utf-8 .*--encoding"),
    ({"a.txt": b"x"}, ["in", "out.npz", "--encoding", "nope"], r"^error: --encoding must be a text codec Python knows, .*; got 'nope'$"),
    ({"a.txt": b"x"}, ["in", "out.npz", "--combine", -5], r"^error: --combine must be a whole number"),
    ({"a.txt": b"x"}, ["in", "in/a.txt/out.npz"], r"^error: cannot write .*out\.npz"),
    ({"a.txt": b"x", "old.npz": None}, ["in", "in/old.npz"], r"^error: .*old\.npz is part of the input"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, setup, args, pattern):
    if setup is not None:
        (tmp_path / "in").mkdir()
        for name, content in setup.items():
            if content is None:
                np.savez_compressed(tmp_path / "in" / name, np.array([1, 2]))
            else:
                (tmp_path / "in" / name).write_bytes(content)
    paths = [str(tmp_path / a) if i < 2 else a for i, a in enumerate(args)]
    result = encode(*paths, models_dir=tmp_path / "models")
    assert result.returncode == 2
    assert_one_line_error(result, pattern)


def test_a_failed_run_leaves_the_old_output_untouched(tmp_path):
    out = tmp_path / "out.npz"
    out.write_bytes(b"previous")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    result = encode(tmp_path / "bad.txt", out, models_dir=tmp_path)
    assert result.returncode == 2
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["bad.txt", "out.npz"]


def test_temporary_files_a_killed_run_left_for_the_output_are_removed(corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".corpus.npz.4242.tmp").write_bytes(b"half an archive")  # as `kill -9` mid-write leaves it
    (out / ".other.npz.4242.tmp").write_bytes(b"another output's")
    result = encode(corpus, out / "corpus.npz", models_dir=tmp_path / "no-models")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == [".other.npz.4242.tmp", "corpus.npz"]
