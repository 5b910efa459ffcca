"""encode.py end to end: its shards (or .npz) load back to exactly what load_dataset makes of the
text, whether one process encodes or several, with this project's encoder or tiktoken."""
import json
import os
import random
import re
import shutil

import numpy as np
import pytest

import dataset
import encode as encode_lib
import encoder
import shards
from conftest import run_script
from test_generate_unconditional_samples import assert_one_line_error
from test_shards import memory_mapped

SCRIPT = "encode.py"
SUMMARY = re.compile(r"wrote (\d+) chunks?, (\d+) tokens to (.+?)(?: in (\d+) shards?)?")


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
    for flag in ["model_name", "models_dir", "combine", "encoding", "processes", "tokenizer", "shard_tokens"]:
        assert f"--{flag}" in text, flag
    assert "IN_TEXT" in text and "OUT" in text


def test_output_loads_back_to_the_same_chunks(enc, corpus, tmp_path):
    out = tmp_path / "out" / "corpus.npz"
    result = encode(corpus, out, "--combine", 40, models_dir=tmp_path / "no-models")
    assert result.returncode == 0, result.stderr
    chunks, tokens, path, _ = SUMMARY.fullmatch(result.stdout.strip()).groups()
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


def test_a_name_without_npz_is_a_shard_directory_that_loads_memory_mapped(enc, corpus, tmp_path):
    out = tmp_path / "tokens"
    result = encode(corpus, out, "--combine", 40, "--shard_tokens", 20, models_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    chunks, tokens, path, shard_count = SUMMARY.fullmatch(result.stdout.strip()).groups()
    expected = dataset.load_dataset(enc, corpus, combine=40, progress=False)
    assert (int(chunks), int(tokens), path) == (len(expected), sum(map(len, expected)), str(out))
    assert int(shard_count) > 1 and shards.is_shard_dir(out)
    loaded = dataset.load_dataset(enc, out, progress=False)
    assert [c.tolist() for c in loaded] == [c.tolist() for c in expected]
    assert all(memory_mapped(c) for c in loaded)
    assert sorted(os.listdir(tmp_path)) == ["corpus", "tokens"]
    # Encoding again replaces the directory whole.
    result = encode(corpus / "doc0.txt", out, models_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert [c.tolist() for c in dataset.load_dataset(enc, out, progress=False)] == [
        enc.encode((corpus / "doc0.txt").read_text(encoding="utf-8"))]


def mixed_corpus(root, enc):
    """Text with separators, CRLF and long lines, an empty file, an .npz and a shard directory,
    in an order where the .npz and the shards arrive while a text chunk is open."""
    rng = random.Random(5)
    words = ["the", " cat", " naïve", " 日本語", "\n", "\n\n", "  ", "\t", "'s", "!", " 42", "\r\n", "<|endoftext|>"]
    root.mkdir()
    for i in range(5):
        (root / f"{i}a.txt").write_text("".join(rng.choice(words) for _ in range(rng.randint(50, 400))),
                                        encoding="utf-8", newline="")
    (root / "1b.txt").write_text("", encoding="utf-8")
    np.savez_compressed(root / "2b.npz", np.array([1, 2, 3]), np.array([50256]))
    writer = shards.ShardWriter(str(root / "3b"), str(root.parent / "part"), enc.n_vocab)
    writer.add_chunk(np.array([7, 8, 9]))
    writer.finish()
    return root


@pytest.mark.parametrize("tokenizer", ["builtin", "tiktoken"])
def test_several_processes_give_the_single_process_chunks(enc, tmp_path, tokenizer):
    if tokenizer == "tiktoken":
        pytest.importorskip("tiktoken")
    corpus = mixed_corpus(tmp_path / "corpus", enc)
    combine = 700
    expected = dataset.load_dataset(enc, corpus, combine=combine, progress=False)
    assert len(expected) > 4
    writer = shards.ShardWriter(str(tmp_path / "out"), str(tmp_path / "out.part"), enc.n_vocab, shard_tokens=200)
    # Pieces of ~40 characters and tasks of ~100 bytes: every file is cut many times, between processes too.
    encode_lib.encode_corpus(dataset.dataset_files(corpus), writer, enc, vocab=encoder.default_vocab_dir(),
                             use_tiktoken=tokenizer == "tiktoken", combine=combine, encoding="utf-8", processes=2,
                             progress=False, piece_chars=40, task_bytes=100)
    writer.finish()
    assert writer.shard_count > 1
    loaded = dataset.load_dataset(enc, tmp_path / "out", progress=False)
    assert [c.tolist() for c in loaded] == [c.tolist() for c in expected]


def test_tiktoken_gives_the_project_encoders_ids(enc):
    pytest.importorskip("tiktoken")
    fast = encode_lib.tiktoken_encoding(enc)
    rng = random.Random(6)
    # Letters, marks, digits and symbols of many scripts, contractions, whitespace of every kind.
    alphabet = [chr(c) for c in [*range(32, 127), *range(0xA0, 0x250), *range(0x370, 0x530), *range(0x590, 0x700),
                                 *range(0x900, 0x980), *range(0x3040, 0x3100), *range(0x4E00, 0x4E80),
                                 *range(0xAC00, 0xAC40), 0x1F600, 0x1F680, *range(0, 32), 0x85, 0x1680, 0x180E,
                                 *range(0x2000, 0x200C), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000, 0xFEFF]]
    alphabet += ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", " ", "  ", "\n", "\t", "\r\n", "<|endoftext|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300))) for _ in range(300)]
    texts += ["a" * 5000, "日本" * 800, " " * 100 + "x", "Hello world", "A\u0301 e\u0308"]
    mismatched = [t for t in texts if fast.encode_ordinary(t) != enc.encode(t)]
    assert not mismatched, repr(mismatched[0])
    assert encode_lib.ids_follow_merges(enc)


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
    # tiktoken merges by id, so it cannot give this vocabulary's ids: auto used the builtin encoder.
    custom = encoder.Encoder.from_dir(model)
    assert not encode_lib.ids_follow_merges(custom)
    if encode_lib.tiktoken_available():
        result = encode(tmp_path / "in.txt", tmp_path / "t.npz", "--model_name", "custom", "--tokenizer", "tiktoken",
                        models_dir=tmp_path / "models")
        assert result.returncode == 2
        assert_one_line_error(result, r"^error: tiktoken cannot give this vocabulary's ids .*use --tokenizer builtin$")


@pytest.mark.parametrize("setup,args,pattern", [
    (None, ["missing", "out.npz"], r"^error: no dataset files match '.*missing'"),
    ({"empty.txt": b""}, ["in", "out.npz"], r"^error: the dataset '.*in' holds no text"),
    ({"latin.txt": b"caf\xe9"}, ["in", "out.npz"], r"^error: .*latin\.txt is not valid utf-8 .*--encoding"),
    ({"a.txt": b"x"}, ["in", "out.npz", "--encoding", "nope"], r"^error: --encoding must be a text codec Python knows, .*; got 'nope'$"),
    ({"a.txt": b"x"}, ["in", "out.npz", "--combine", -5], r"^error: --combine must be a whole number"),
    ({"a.txt": b"x"}, ["in", "in/a.txt/out.npz"], r"^error: cannot write .*out\.npz"),
    ({"a.txt": b"x", "old.npz": None}, ["in", "in/old.npz"], r"^error: .*old\.npz is part of the input"),
    ({"a.txt": b"x"}, ["in", "out", "--processes", -1], r"^error: --processes must be a whole number >= 0"),
    ({"a.txt": b"x"}, ["in", "out", "--tokenizer", "fast"], r"^error: --tokenizer must be one of auto, tiktoken, built"),
    ({"a.txt": b"x"}, ["in", "in"], r"^error: .*in is part of the input"),
    ({"a.txt": b"x", "sub/b.txt": b"y"}, ["in/a.txt", "in/sub"], r"^error: .*sub exists and is not a shard directory"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, setup, args, pattern):
    if setup is not None:
        (tmp_path / "in").mkdir()
        for name, content in setup.items():
            if content is None:
                np.savez_compressed(tmp_path / "in" / name, np.array([1, 2]))
            else:
                (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
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
    (out / ".corpus.npz.4242.tmp.part").mkdir()  # a half-written shard directory
    (out / ".corpus.npz.4242.tmp.part" / "shard-00000.npy").write_bytes(b"half a shard")
    result = encode(corpus, out / "corpus.npz", models_dir=tmp_path / "no-models")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == [".other.npz.4242.tmp", "corpus.npz"]


def test_a_failed_run_leaves_the_old_shards_untouched(enc, tmp_path):
    (tmp_path / "good.txt").write_text("good text", encoding="utf-8")
    assert encode(tmp_path / "good.txt", tmp_path / "out", models_dir=tmp_path).returncode == 0
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "in" / "b.txt").write_bytes(b"\xff\xfe\xfa")
    result = encode(tmp_path / "in", tmp_path / "out", models_dir=tmp_path)
    assert result.returncode == 2
    assert [c.tolist() for c in dataset.load_dataset(enc, tmp_path / "out", progress=False)] == [enc.encode("good text")]
    assert sorted(os.listdir(tmp_path)) == ["good.txt", "in", "out"]
