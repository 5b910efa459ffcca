"""shards.py: chunks written streamed or whole come back as memory-mapped slices, in order."""
import json
import os

import numpy as np
import pytest

import shards
from cli import UserError


def write(path, steps, n_vocab=50257, shard_tokens=10):
    """Runs `steps` on a writer for `path`: ("add", ids), ("end",) or ("whole", ids)."""
    writer = shards.ShardWriter(str(path), str(path) + ".part", n_vocab, shard_tokens)
    for step in steps:
        if step[0] == "add":
            writer.add(np.array(step[1]))
        elif step[0] == "end":
            writer.end_chunk()
        else:
            writer.add_chunk(np.array(step[1]))
    return writer, writer.finish()


def memory_mapped(a):
    while a is not None:
        if isinstance(a, np.memmap):
            return True
        a = a.base
    return False


def test_chunks_come_back_in_order_as_memory_mapped_slices(tmp_path):
    out = tmp_path / "out"
    steps = [("add", [1, 2]), ("add", [3]), ("whole", [50, 51]), ("add", [4]), ("end",),
             ("whole", list(range(100, 112))), ("add", [7]), ("end",), ("whole", [60])]
    writer, count = write(out, steps, shard_tokens=10)
    chunks = shards.read_shards(str(out), 50257)
    # A whole chunk given while one streams is listed first, as load_dataset lists it.
    assert [c.tolist() for c in chunks] == [[50, 51], [1, 2, 3, 4], list(range(100, 112)), [7], [60]]
    assert count == 5 and writer.tokens == 20
    assert all(c.dtype == np.uint16 and memory_mapped(c) for c in chunks)
    # A shard closes at the first chunk end past 10 tokens; no chunk spans two.
    assert writer.shard_count == 2 and not os.path.exists(str(out) + ".part")
    index = json.loads((out / shards.INDEX).read_text())
    assert index["tokens"] == 20 and index["dtype"] == "<u2"
    assert sorted(os.listdir(out)) == sorted([shards.INDEX, shards.CHUNKS, *index["shards"]])
    for name in index["shards"]:
        assert np.load(out / name).ndim == 1  # plain .npy files numpy reads


def test_vocabularies_beyond_uint16_are_stored_as_int32(tmp_path):
    write(tmp_path / "big", [("whole", [70000, 1])], n_vocab=70001)
    (chunk,) = shards.read_shards(str(tmp_path / "big"), 70001)
    assert chunk.dtype == np.int32 and chunk.tolist() == [70000, 1]


def test_finish_replaces_an_older_directory_and_abort_keeps_it(tmp_path):
    out = tmp_path / "out"
    write(out, [("whole", [1])])
    write(out, [("whole", [2])])
    assert [c.tolist() for c in shards.read_shards(str(out), 50257)] == [[2]]
    writer = shards.ShardWriter(str(out), str(tmp_path / "tmp"), 50257)
    writer.add(np.array([3]))
    writer.abort()
    assert [c.tolist() for c in shards.read_shards(str(out), 50257)] == [[2]]
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.parametrize("damage,fragment", [
    ("index", "cannot read it"),
    ("format", "is not version 1 of the format"),
    ("table", "points outside the shards"),
    ("shard", "cannot read it"),
    ("vocab", "vocabulary of 50257 tokens, larger than the model's 100"),
])
def test_damaged_directories_are_one_line_errors(tmp_path, damage, fragment):
    out = tmp_path / "out"
    write(out, [("whole", [1, 2, 3]), ("whole", [4])])
    index = json.loads((out / shards.INDEX).read_text())
    if damage == "index":
        (out / shards.INDEX).write_text("{not json")
    elif damage == "format":
        (out / shards.INDEX).write_text(json.dumps(dict(index, version=99)))
    elif damage == "table":
        np.save(out / shards.CHUNKS, np.array([[0, 2, 5]], np.int64))
    elif damage == "shard":
        os.remove(out / index["shards"][0])
    n_vocab = 100 if damage == "vocab" else 50257
    with pytest.raises(UserError) as e:
        shards.read_shards(str(out), n_vocab)
    message = str(e.value)
    assert "\n" not in message and str(out) in message and fragment in message, message
