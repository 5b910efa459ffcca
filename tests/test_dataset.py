"""dataset.py: documents joined by the real <|endoftext|> token, chunking, .npz files, and the
window sampler, checked against enc.encode and against every window enumerated by hand."""
import collections
import random

import numpy as np
import pytest

import dataset
import encoder
from cli import UserError

EOT = encoder.EOT_TOKEN
# "<|endoftext|>" spelled as ordinary tokens: what the fork put between documents.
EOT_AS_TEXT = [27, 91, 437, 1659, 5239, 91, 29]


@pytest.fixture(scope="module")
def enc():
    return encoder.Encoder.from_dir(encoder.default_vocab_dir())


def write(directory, files):
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8", newline="")
    return directory


def split_documents(chunk):
    """A chunk's documents: the runs of tokens between <|endoftext|> tokens."""
    bounds = [-1, *np.flatnonzero(chunk == EOT), len(chunk)]
    return [chunk[a + 1:b].tolist() for a, b in zip(bounds, bounds[1:])]


def one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_documents_are_joined_by_one_eot_token(enc, tmp_path):
    docs = {"a.txt": "Hello world.\n\nSecond paragraph.", "b.txt": " naïve 日本 text\n", "c.txt": "x"}
    chunks = dataset.load_dataset(enc, write(tmp_path, docs), combine=10**6, progress=False)
    assert len(chunks) == 1
    chunk = chunks[0]
    assert chunk.dtype == np.int32 and chunk.ndim == 1
    expected = enc.encode(docs["a.txt"]) + [EOT] + enc.encode(docs["b.txt"]) + [EOT] + enc.encode(docs["c.txt"])
    assert chunk.tolist() == expected
    assert split_documents(chunk) == [enc.encode(t) for t in docs.values()]
    assert EOT_AS_TEXT[:3] not in [chunk[i:i + 3].tolist() for i in range(len(chunk) - 2)]


def test_a_literal_separator_inside_a_file_becomes_the_real_token(enc, tmp_path):
    text = "First story.<|endoftext|>Second story.\n<|endoftext|>"
    (chunk,) = dataset.load_dataset(enc, write(tmp_path, {"stories.txt": text}), progress=False)
    assert chunk.tolist() == enc.encode("First story.") + [EOT] + enc.encode("Second story.\n") + [EOT]


def test_combine_closes_a_chunk_once_it_has_enough_characters(enc, tmp_path):
    rng = random.Random(0)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma"]) for _ in range(rng.randint(1, 12))) for _ in range(30)]
    files = {f"{i:02d}.txt": t for i, t in enumerate(texts)}
    combine = 100
    chunks = dataset.load_dataset(enc, write(tmp_path, files), combine=combine, progress=False)
    assert len(chunks) > 3
    remaining = list(texts)
    for n, chunk in enumerate(chunks):
        docs = split_documents(chunk)
        mine, remaining = remaining[:len(docs)], remaining[len(docs):]
        assert docs == [enc.encode(t) for t in mine]
        chars = [len(t) for t in mine]
        if n < len(chunks) - 1:
            # At least `combine` characters, and closed by the document that reached it.
            assert sum(chars) >= combine > sum(chars[:-1])
        else:
            assert sum(chars[:-1]) < combine
    assert remaining == []


@pytest.mark.parametrize("combine", [0, 1])
def test_small_combine_makes_each_document_a_chunk(enc, tmp_path, combine):
    write(tmp_path, {"a.txt": "one", "b.txt": "two", "empty.txt": ""})
    chunks = dataset.load_dataset(enc, tmp_path, combine=combine, progress=False)
    assert [c.tolist() for c in chunks] == [enc.encode("one"), enc.encode("two")]


def test_directory_glob_and_file_inputs(enc, tmp_path):
    write(tmp_path, {"b.txt": "bee", "a.txt": "ay", "sub/c.txt": "sea", "sub/d.md": "dee",
                     ".hidden": "no", ".git/config": "no"})
    load = lambda path: [split_documents(c) for c in dataset.load_dataset(enc, path, combine=1, progress=False)]
    words = lambda *ws: [[enc.encode(w)] for w in ws]
    assert load(tmp_path) == words("ay", "bee", "sea", "dee")  # sorted paths, recursive, hidden skipped
    assert load(str(tmp_path / "*.txt")) == words("ay", "bee")
    assert load(str(tmp_path / "**" / "*.txt")) == words("ay", "bee", "sea")
    assert load(str(tmp_path / "s*")) == words("sea", "dee")  # a matched directory is walked
    assert load(tmp_path / "sub" / "d.md") == words("dee")


def test_windows_newlines_read_as_unix_newlines(enc, tmp_path):
    write(tmp_path, {"w.txt": b"one\r\ntwo\rthree\n"})
    (chunk,) = dataset.load_dataset(enc, tmp_path, progress=False)
    assert chunk.tolist() == enc.encode("one\ntwo\nthree\n")


def test_encoding_option(enc, tmp_path):
    write(tmp_path, {"latin.txt": "café".encode("latin-1")})
    (chunk,) = dataset.load_dataset(enc, tmp_path, encoding="latin-1", progress=False)
    assert chunk.tolist() == enc.encode("café")


def test_long_documents_encode_in_pieces_exactly_as_whole(enc):
    rng = random.Random(1)
    # Runs of spaces and newlines are where a careless cut would change the words.
    alphabet = ["a", "bc", " ", "  ", "\n", "\n\n", " \n", "'s", "7", "!", "é", "\t", "日本", "\r"]
    for _ in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        for size in (1, 3, 17):
            assert dataset.encode_document(enc, text, piece_chars=size).tolist() == enc.encode(text), repr(text)
    assert len(list(dataset._pieces("word\n" * 100, 10))) > 10  # the pieces are really cut


def test_npz_files_load_as_they_are_next_to_text(enc, tmp_path):
    arrays = [np.array([1, 2, 3], np.int64), np.array([50256, 0], np.int32)]
    np.savez_compressed(tmp_path / "pre.npz", *arrays)
    write(tmp_path, {"text.txt": "plain text"})
    chunks = dataset.load_dataset(enc, tmp_path, progress=False)
    assert all(c.dtype == np.int32 for c in chunks)
    assert [c.tolist() for c in chunks] == [[1, 2, 3], [50256, 0], enc.encode("plain text")]


@pytest.mark.parametrize("content,fragment", [
    (b"not a zip file at all", "cannot read it"),
    ("2d", "not a 1-D array of token ids"),
    ("float", "not a 1-D array of token ids"),
    ("out of range", "outside the vocabulary 0..50256"),
    ("npy", "single array"),
])
def test_npz_that_is_not_encode_output(enc, tmp_path, content, fragment):
    path = tmp_path / "bad.npz"
    if content == "2d":
        np.savez(path, np.zeros((2, 3), np.int32))
    elif content == "float":
        np.savez(path, np.zeros(3, np.float32))
    elif content == "out of range":
        np.savez(path, np.array([5, 50257]))
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.arange(3))
    else:
        path.write_bytes(content)
    with pytest.raises(UserError) as e:
        dataset.load_dataset(enc, path, progress=False)
    one_line_error(e, str(path), "not a token file written by encode.py", fragment)


def test_errors_are_one_line_and_say_what_to_do(enc, tmp_path):
    with pytest.raises(UserError) as e:
        dataset.load_dataset(enc, tmp_path / "missing*.txt", progress=False)
    one_line_error(e, f"no dataset files match '{tmp_path / 'missing*.txt'}'")
    with pytest.raises(UserError) as e:
        dataset.load_dataset(enc, tmp_path, progress=False)  # an empty directory
    one_line_error(e, "no dataset files match")
    write(tmp_path, {"empty.txt": ""})
    with pytest.raises(UserError) as e:
        dataset.load_dataset(enc, tmp_path, progress=False)
    one_line_error(e, "holds no text")
    write(tmp_path, {"z.txt": b"caf\xe9 ok"})
    with pytest.raises(UserError) as e:
        dataset.load_dataset(enc, tmp_path, progress=False)
    one_line_error(e, "z.txt is not valid utf-8 (byte 3", "use encoding latin-1")
    with pytest.raises(UserError) as e:
        dataset.load_dataset(enc, tmp_path, encoding="no-such-codec", progress=False)
    one_line_error(e, "encoding must be a text codec Python knows", "'no-such-codec'")
    with pytest.raises(UserError) as e:
        dataset.load_dataset(enc, tmp_path, encoding="base64", progress=False)
    one_line_error(e, "encoding must be a text codec Python knows", "'base64'")
    with pytest.raises(UserError) as e:
        dataset.load_dataset(enc, tmp_path, combine=-1, progress=False)
    one_line_error(e, "combine must be")


# Chunks whose tokens are all distinct, so a window's first token says where it starts.
CHUNKS = [np.arange(0, 4), np.arange(100, 107), np.arange(200, 202), np.arange(300, 305)]


def window_starts(length):
    """Every window of `length` inside one chunk, as (chunk, start)."""
    return [(c, s) for c, chunk in enumerate(CHUNKS) for s in range(len(chunk) - length + 1)]


def locate(window):
    """(chunk, start) of a window that must be a contiguous slice of one chunk."""
    for c, chunk in enumerate(CHUNKS):
        hits = np.flatnonzero(chunk == window[0])
        if len(hits):
            s = int(hits[0])
            assert chunk[s:s + len(window)].tolist() == window.tolist(), window
            return c, s
    raise AssertionError(f"{window} is in no chunk")


@pytest.mark.parametrize("length", [1, 3, 4, 5, 7])
def test_sampler_draws_every_window_inside_one_chunk_uniformly(length):
    sampler = dataset.TokenSampler(CHUNKS, seed=0)
    windows = window_starts(length)
    draws = 300 * len(windows)
    batch = sampler.batch(draws, length)
    assert batch.shape == (draws, length) and batch.dtype == np.int32
    counts = collections.Counter(locate(w) for w in batch)
    # Every window, the last of each chunk included, and nothing else (no short chunk).
    assert set(counts) == set(windows)
    assert all(200 < n < 400 for n in counts.values()), counts


def test_sampler_is_deterministic_for_a_seed():
    a, b, c = (dataset.TokenSampler(CHUNKS, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.batch(20, 3), b.batch(20, 3))
    assert np.array_equal(a.sample(4), b.sample(4))
    assert not np.array_equal(a.batch(20, 3), c.batch(20, 3))


def test_sampler_returns_copies():
    sampler = dataset.TokenSampler([np.arange(5, dtype=np.int32)], seed=0)
    sampler.sample(5)[:] = -1
    assert sampler.chunks[0].tolist() == [0, 1, 2, 3, 4]


def test_window_length_shrinks_to_small_datasets():
    sampler = dataset.TokenSampler(CHUNKS)
    assert sampler.total_tokens == 18
    assert sampler.window_length(1024) == 7
    assert sampler.window_length(5) == 5
    with pytest.raises(UserError) as e:
        sampler.sample(8)
    one_line_error(e, "no chunk of the dataset holds 8 tokens (the longest has 7)")


def test_too_little_text_says_how_many_tokens(enc, tmp_path):
    write(tmp_path, {"a.txt": "Hi"})
    sampler = dataset.TokenSampler(dataset.load_dataset(enc, tmp_path, progress=False))
    with pytest.raises(UserError) as e:
        sampler.window_length(1024)
    one_line_error(e, "the dataset has 1 token(s)", "give more text")
    with pytest.raises(UserError) as e:
        dataset.TokenSampler([np.array([1]), np.array([2])]).window_length(1024)
    one_line_error(e, "the dataset has 2 token(s)")


def streamed(enc, path, encoding="utf-8", **sizes):
    """What encode.py makes of one file from `stream_document`: its tokens, characters and bytes."""
    tokens, chars, total = [], 0, 0
    for piece, read in dataset.stream_document(path, encoding, **sizes):
        total += read
        if piece is None:
            tokens.append(EOT)
            chars += len(dataset.EOT_TEXT)
        else:
            tokens += enc.encode(piece)
            chars += len(piece)
    return tokens, chars, total


def test_streamed_pieces_encode_exactly_as_the_whole_file(enc, tmp_path):
    rng = random.Random(2)
    # Reads of a few bytes split "\r\n", UTF-8 characters and separators between two reads.
    alphabet = ["a", "bc", " ", "  ", "\n", "\n\n", " \n", "'s", "7", "!", "é", "\t", "日本", "\r", "\r\n",
                "<|endoftext|>", "<|endof", "text|>", "\u00a0", "\u3000x"]
    for case in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 150)))
        path = write(tmp_path, {f"{case}.txt": text}) / f"{case}.txt"
        normalized = text.replace("\r\n", "\n").replace("\r", "\n")
        for read_bytes, piece_chars in [(1, 1), (3, 2), (7, 5), (64, 17), (1 << 20, 1 << 20)]:
            tokens, chars, total = streamed(enc, path, read_bytes=read_bytes, piece_chars=piece_chars)
            assert tokens == dataset.encode_document(enc, normalized).tolist(), (repr(text), read_bytes)
            assert chars == len(normalized) and total == len(text.encode("utf-8"))


def test_streaming_cuts_only_where_the_words_stay_the_same(enc):
    rng = random.Random(3)
    alphabet = ["a", "bc", " ", "  ", "\n", " \n", "'s", "'t", "7", "!", "é", "\t", "日本", "\u00a0", ".", "  x",
                "\x85", "\x1c", "\u2028", "\u3000"]
    unsafe_changed = 0
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 40)))
        whole = enc.encode(text)
        for cut in dataset.SAFE_CUT.finditer(text):
            assert enc.encode(text[:cut.start()]) + enc.encode(text[cut.start():]) == whole, (repr(text), cut.start())
        anywhere = rng.randrange(1, len(text))
        unsafe_changed += enc.encode(text[:anywhere]) + enc.encode(text[anywhere:]) != whole
    assert unsafe_changed > 20  # cuts elsewhere do change the ids: the check above has teeth


def test_byte_ranges_between_cut_offsets_encode_to_the_whole_files_ids(enc, tmp_path):
    rng = random.Random(4)
    alphabet = ["a", "bc", " ", "  ", "\n", " \n", "'s", "7", "!", "é", "\t", "日本", "\r\n", "\r", "<|endoftext|>",
                "\u00a0", "\u3000x", "\U0001F600", " \u2028", "x" * 30]
    for case in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        path = write(tmp_path, {f"{case}.txt": text}) / f"{case}.txt"
        data = text.encode("utf-8")
        whole, whole_chars, _ = streamed(enc, path)
        cuts = sorted({dataset.cut_offset(path, o, window=8) for o in range(len(data) + 1)})
        assert cuts[0] == 0 and cuts[-1] == len(data)
        for cut in cuts[1:-1]:  # each where SAFE_CUT allows one in the text as it is
            assert dataset.SAFE_CUT.match(text, len(data[:cut].decode("utf-8"))) is not None, (repr(text), cut)
        for bounds in [cuts, [0] + rng.sample(cuts, min(3, len(cuts))) + [len(data)]]:
            bounds = sorted(set(bounds))
            ids, chars = [], 0
            for start, end in zip(bounds, bounds[1:]):
                part_ids, part_chars, read = streamed(enc, path, start=start, end=end, piece_chars=5, read_bytes=3)
                ids += part_ids
                chars += part_chars
                assert read == end - start
            assert ids == whole and chars == whole_chars, (repr(text), bounds)


def test_cut_offsets_pass_over_undecodable_bytes_alike_from_every_offset(tmp_path):
    path = write(tmp_path, {"z.txt": b"ab\xe9\xff cd\x80 ef \xe6\x97"}) / "z.txt"
    cuts = [dataset.cut_offset(path, o, window=2) for o in range(20)]
    assert cuts == [0, 4, 4, 4, 4, 8, 8, 8, 8, 11, 11, 11, 14, 14, 14, 14, 14, 14, 14, 14]


def test_streaming_reports_undecodable_bytes_at_their_offset(tmp_path):
    path = write(tmp_path, {"z.txt": b"x" * 10 + b"caf\xe9 ok"}) / "z.txt"
    with pytest.raises(UserError) as e:
        list(dataset.stream_document(path, "utf-8", read_bytes=4))
    one_line_error(e, "z.txt is not valid utf-8 (byte 13", "use encoding latin-1")
    with pytest.raises(UserError) as e:
        list(dataset.stream_document(tmp_path / "missing.txt", "utf-8"))
    one_line_error(e, "cannot read", "missing.txt")


def test_a_shard_directory_is_one_dataset_entry(enc, tmp_path):
    import shards

    writer = shards.ShardWriter(str(tmp_path / "data" / "tokens"), str(tmp_path / "part"), enc.n_vocab)
    writer.add_chunk(np.array([5, 6, 7]))
    writer.finish()
    write(tmp_path / "data", {"a.txt": "ay"})
    assert dataset.dataset_files(tmp_path / "data") == [str(tmp_path / "data" / "a.txt"),
                                                        str(tmp_path / "data" / "tokens")]
    assert dataset.dataset_files(tmp_path / "data" / "tokens") == [str(tmp_path / "data" / "tokens")]
    assert dataset.dataset_files(str(tmp_path / "data" / "t*")) == [str(tmp_path / "data" / "tokens")]
    chunks = dataset.load_dataset(enc, tmp_path / "data", combine=0, progress=False)
    assert [c.tolist() for c in chunks] == [enc.encode("ay"), [5, 6, 7]]


def chi_square_rejects_uniform(counts, expected):
    """Whether a chi-square test rejects that `counts` came from equal chances, at p ~ 1e-6
    (the Wilson-Hilferty approximation of the critical value)."""
    df = len(counts) - 1
    statistic = sum((n - expected) ** 2 / expected for n in counts)
    z = 4.75
    return statistic > df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def test_sampler_over_memory_mapped_shards_draws_windows_uniformly(enc, tmp_path):
    import shards

    # Distinct ids, over several shards, a chunk deferred behind a streamed one, chunks of very
    # different lengths: a draw uniform over chunks, or over shards, would show.
    lengths = [40, 3, 9, 25, 2, 60, 7]
    chunks = [np.arange(sum(lengths[:i]), sum(lengths[:i + 1])) for i in range(len(lengths))]
    writer = shards.ShardWriter(str(tmp_path / "tokens"), str(tmp_path / "part"), enc.n_vocab, shard_tokens=30)
    writer.add(chunks[0][:10])
    writer.add_chunk(chunks[1])  # listed before chunk 0, written after it
    writer.add(chunks[0][10:])
    writer.end_chunk()
    for chunk in chunks[2:]:
        writer.add_chunk(chunk)
    writer.finish()
    assert writer.shard_count > 2
    loaded = dataset.load_dataset(enc, tmp_path / "tokens", progress=False)
    assert [c.tolist() for c in loaded] == [chunks[1].tolist(), chunks[0].tolist(), *[c.tolist() for c in chunks[2:]]]
    length = 5
    windows = [(int(c[0]) + s) for c in chunks for s in range(len(c) - length + 1)]
    sampler = dataset.TokenSampler(loaded, seed=0)
    draws = 200 * len(windows)
    batch = sampler.batch(draws, length)
    assert batch.dtype == np.int32
    assert np.all(np.diff(batch, axis=1) == 1)  # contiguous, inside one chunk
    counts = collections.Counter(batch[:, 0].tolist())
    assert set(counts) == set(windows)
    assert not chi_square_rejects_uniform([counts[w] for w in windows], 200)
    # The same test rejects a draw uniform over chunks first, then over their windows.
    rng = np.random.default_rng(0)
    usable = [c for c in chunks if len(c) >= length]
    biased = collections.Counter(int(c[0]) + int(rng.integers(len(c) - length + 1))
                                 for c in (usable[i] for i in rng.integers(len(usable), size=draws)))
    assert chi_square_rejects_uniform([biased[w] for w in windows], 200)
