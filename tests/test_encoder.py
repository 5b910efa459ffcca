"""The byte-level BPE encoder, checked against ids from the reference encoder."""
import doctest
import hashlib
import json
import os
import random
import shutil

import pytest

import encoder
from cli import UserError

# Golden (text, ids) pairs from the reference encoder (openai/gpt-2 src/encoder.py at commit
# 9b63575) on the released vocabulary, run in a scratch folder outside this repository.
REFERENCE_IDS = [
    ('Hello world', [15496, 995]),
    ('hello world', [31373, 995]),
    ('', []),
    ('caf\xe9 na\xefve r\xe9sum\xe9', [66, 1878, 2634, 41492, 40560, 16345, 2634]),
    ('cafe\u0301 (decomposed)', [66, 8635, 136, 223, 357, 12501, 3361, 1335, 8]),
    ('\xc0\xc9\xce\xd5\xdc \xdf \ufb01', [127, 222, 38351, 127, 236, 127, 243, 127, 250, 6184, 253, 27332, 105, 223]),
    ('\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8', [33768, 98, 17312, 105, 45739, 252, 5641, 24336, 25084, 43302]),
    ('\u4e2d\u6587\uff0c\u6807\u70b9\u3002', [40792, 23877, 229, 171, 120, 234, 43718, 229, 163, 224, 117, 16764]),
    ('\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8', [47991, 250, 166, 113, 255, 168, 244, 112, 220, 169, 227, 235, 168, 232, 97, 169, 232, 116]),
    ('\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd', [50227, 40010, 27072, 147, 251, 14360, 95, 27072, 40010, 147, 251]),
    ('\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645', [25405, 26897, 148, 255, 39848, 12919, 17550, 101, 23525, 44690, 23525, 25405]),
    ('\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e', [11976, 101, 11976, 106, 11976, 116, 24231, 235, 11976, 97, 24231, 229, 28225, 99, 24231, 223, 11976, 101, 11976, 123, 11976, 107, 48077]),
    ('\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01', [19567, 103, 19567, 100, 19567, 109, 19567, 103, 19567, 242, 19567, 113, 19567, 232, 19567, 110, 19567, 100, 31479, 224, 19567, 98, 19567, 223]),
    ('\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440!', [140, 253, 21169, 18849, 38857, 16843, 20375, 11, 12466, 120, 18849, 21169, 0]),
    ('a  b   c    d', [64, 220, 275, 220, 220, 269, 220, 220, 220, 288]),
    ('tab\there\t\tand\nnewlines\n\n\nend', [8658, 197, 1456, 197, 197, 392, 198, 3605, 6615, 628, 198, 437]),
    ('trailing spaces   ', [9535, 4386, 9029, 220, 220, 220]),
    ('   leading', [220, 220, 3756]),
    (' \n \n', [220, 198, 220, 198]),
    ('\r\n windows\r\n', [201, 198, 9168, 201, 198]),
    ('x                                        y', [87, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 220, 331]),
    ('nbsp\xa0space ideographic\u3000space', [77, 24145, 1849, 13200, 1405, 6826, 5099, 222, 13200]),
    ('\u2028line\u2029para', [447, 101, 1370, 447, 102, 1845, 64]),
    ('only\n', [8807, 198]),
    ('\n', [198]),
    ('    ', [220, 220, 220, 220]),
    ("I'm you're we've they'll he'd it's don't", [40, 1101, 345, 821, 356, 1053, 484, 1183, 339, 1549, 340, 338, 836, 470]),
    ("HE'S SHE'LL I'M WE'VE YOU'RE IT'D DON'T", [13909, 6, 50, 48052, 6, 3069, 314, 6, 44, 12887, 6, 6089, 7013, 6, 2200, 7283, 6, 35, 23917, 6, 51]),
    ("'s's't", [338, 338, 470]),
    ("'S 'T 'Re 'vE", [6, 50, 705, 51, 705, 3041, 705, 85, 36]),
    ('it\u2019s curly', [270, 447, 247, 82, 45731]),
    ("''quoted''", [7061, 421, 5191, 7061]),
    ('12345 3.14159 -42 1,000,000 \u2460\u2461', [10163, 2231, 513, 13, 1415, 19707, 532, 3682, 352, 11, 830, 11, 830, 2343, 239, 254, 158, 239, 94]),
    ('2024-01-31T12:00:00Z', [1238, 1731, 12, 486, 12, 3132, 51, 1065, 25, 405, 25, 405, 57]),
    ('x\xb2 \xbe \u216b \u0663\u0664\u0665 \uff11\uff12\uff13', [87, 31185, 1587, 122, 2343, 227, 104, 18923, 96, 149, 97, 149, 98, 27332, 120, 239, 171, 120, 240, 171, 120, 241]),
    ('0x1F 1e-9 1_000', [15, 87, 16, 37, 352, 68, 12, 24, 352, 62, 830]),
    ('emoji \U0001f642 family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 flag \U0001f1eb\U0001f1f7', [368, 31370, 32485, 1641, 50169, 101, 447, 235, 41840, 102, 447, 235, 41840, 100, 447, 235, 41840, 99, 6056, 12520, 229, 104, 8582, 229, 115]),
    ('\U0001f44d\U0001f3fd thumbs', [41840, 235, 8582, 237, 121, 32766]),
    ('1\ufe0f\u20e3 keycap', [16, 37929, 158, 225, 96, 1994, 11128]),
    ('\U0001f3f3\ufe0f\u200d\U0001f308', [8582, 237, 111, 37929, 447, 235, 8582, 234, 230]),
    ('control \x00\x01\x07\x1b[0m \x7f', [13716, 220, 188, 189, 195, 215, 58, 15, 76, 220, 221]),
    ('nel\x85c1\x9f', [4954, 126, 227, 66, 16, 126, 253]),
    ('bell\x07\x08\x0b\x0c', [7923, 195, 196, 199, 200]),
    ('<|endoftext|>', [27, 91, 437, 1659, 5239, 91, 29]),
    ('text<|endoftext|>more', [5239, 27, 91, 437, 1659, 5239, 91, 29, 3549]),
    ('<|endoftext|> <|endoftext|>', [27, 91, 437, 1659, 5239, 91, 29, 1279, 91, 437, 1659, 5239, 91, 29]),
    ('def f(x):\n    return x**2  # comment', [4299, 277, 7, 87, 2599, 198, 220, 220, 220, 1441, 2124, 1174, 17, 220, 1303, 2912]),
    ('if (a != b) { return a->c[0]; }', [361, 357, 64, 14512, 275, 8, 1391, 1441, 257, 3784, 66, 58, 15, 11208, 1782]),
    ('https://example.com/a?b=c&d=e#f', [5450, 1378, 20688, 13, 785, 14, 64, 30, 65, 28, 66, 5, 67, 28, 68, 2, 69]),
    ('\u200bzero\u200bwidth', [9525, 22570, 9525, 10394]),
    ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', [24794, 24794, 24794, 24794, 24794, 24794, 24794, 24794, 24794, 24794]),
    ('Supercalifragilisticexpialidocious', [12442, 9948, 361, 22562, 346, 396, 501, 42372, 498, 312, 32346]),
    ('!!!???...', [10185, 28358, 986]),
    ('\U0001f600\U0001f600\U0001f600\U0001f600\U0001f600', [47249, 222, 47249, 222, 47249, 222, 47249, 222, 47249, 222]),
]


# sha256 of the vocabulary files OpenAI released with GPT-2.
RELEASED_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


@pytest.fixture(scope="module")
def enc():
    return encoder.Encoder.from_dir(encoder.default_vocab_dir())


# Code points whose letter/number class has not changed in decades of Unicode versions.
STABLE_RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0x80, 0xFF), (0x0300, 0x036F), (0x0590, 0x06FF),
                 (0x0E00, 0x0E7F), (0x3040, 0x30FF), (0x4E00, 0x9FA5), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F)]
# Plus every other plane: the letters there come from the `regex` module's Unicode tables.
ALL_RANGES = STABLE_RANGES + [(0x1F650, 0x1FAFF), (0x10000, 0x10FFFF)]


def random_text(rng, length, ranges=ALL_RANGES):
    """Mixed code points: ASCII, controls, Latin-1, combining marks, RTL, CJK, emoji, and
    pieces the split pattern treats specially (space runs, contractions, ZWJ)."""
    out = []
    for _ in range(length):
        if rng.random() < 0.2:
            out.append(rng.choice([" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "'s", "'ll", "'S", "\u200d",
                                   "\u3000", "\xa0", "the", " of", "123"]))
        else:
            lo, hi = rng.choice(ranges)
            c = rng.randint(lo, hi)
            out.append(chr(c if not 0xD800 <= c <= 0xDFFF else 0xFFFD))
    return "".join(out)


def byte_token(enc, b):
    """The id of the token for the single byte `b`."""
    return enc.encoder[enc.byte_encoder[b]]


@pytest.mark.parametrize("text,ids", REFERENCE_IDS)
def test_ids_equal_the_reference_encoders(enc, text, ids):
    assert enc.encode(text) == ids


@pytest.mark.parametrize("text,ids", REFERENCE_IDS)
def test_decode_inverts_encode_on_the_golden_texts(enc, text, ids):
    assert enc.decode(ids) == text


def test_bundled_vocabulary_is_the_released_one():
    for name, digest in RELEASED_SHA256.items():
        with open(os.path.join(encoder.default_vocab_dir(), name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, name


def test_end_of_text_id_and_vocabulary_size(enc):
    assert enc.eot_token == encoder.EOT_TOKEN == encoder.Encoder.eot_token == 50256
    assert enc.n_vocab == 50257
    assert enc.decode([enc.eot_token]) == "<|endoftext|>"
    # In text it is ordinary characters, as in the reference, never the separator id.
    assert enc.eot_token not in enc.encode("<|endoftext|>")


def test_round_trip_on_random_valid_text(enc):
    rng = random.Random(1234)
    for _ in range(400):
        text = random_text(rng, rng.randint(0, 80))
        ids = enc.encode(text)
        assert all(0 <= i < enc.n_vocab for i in ids)
        assert enc.decode(ids) == text


def test_merges_every_occurrence_of_the_best_pair_before_newer_pairs():
    # Toy merges listed out of order: ("ab", "a") outranks the ("a", "b") that creates "ab".
    # Expected pieces from the reference encoder's bpe() on the same toy vocabulary.
    vocab = {"a": 0, "b": 1, "ab": 2, "aba": 3}
    toy = encoder.Encoder(vocab, [("ab", "a"), ("a", "b")])
    assert toy.bpe("abab") == "ab ab"
    assert toy.bpe("ababa") == "ab aba"
    assert toy.bpe("aab") == "a ab"
    # Overlapping occurrences of a pair of equal symbols merge left to right.
    runs = encoder.Encoder({"a": 0, "aa": 1, "aaaa": 2}, [("a", "a"), ("aa", "aa")])
    assert [runs.bpe("a" * n) for n in range(1, 8)] == \
        ["a", "aa", "aa a", "aaaa", "aaaa a", "aaaa aa", "aaaa aa a"]


def test_long_unspaced_run(enc):
    # One 4002-letter word: the reference gives 1000 "aaaa" tokens and a final "aa".
    assert enc.encode("a" * 4002) == [24794] * 1000 + [7252]


def test_cached_and_uncached_encoders_agree(enc):
    vocab = encoder.default_vocab_dir()
    uncached = encoder.Encoder.from_dir(vocab, cache_size=0)
    tiny_cache = encoder.Encoder.from_dir(vocab, cache_size=3)  # evicts constantly
    rng = random.Random(7)
    texts = [random_text(rng, 50) for _ in range(40)] + [text for text, _ in REFERENCE_IDS]
    texts += texts  # second pass hits the cache
    for text in texts:
        assert enc.encode(text) == uncached.encode(text) == tiny_cache.encode(text)
    assert enc._word_ids.cache_info().hits > 0 and uncached._word_ids.cache_info().currsize == 0


def test_invalid_utf8_decodes_as_replacement_characters(enc):
    euro = "\u20ac".encode("utf-8")  # three bytes
    ids = [byte_token(enc, b) for b in euro]
    assert enc.decode(ids) == "\u20ac"
    assert enc.decode_bytes(ids[:2]) == euro[:2]
    assert enc.decode(ids[:2]) == "\ufffd"  # a truncated character
    assert enc.decode([byte_token(enc, 0x80)]) == "\ufffd"  # a lone continuation byte
    assert enc.decode([64, byte_token(enc, 0xFF), 65]) == "a\ufffdb"  # never valid in UTF-8


def test_decode_accepts_numpy_ids_and_rejects_unknown_ids(enc):
    np = pytest.importorskip("numpy")
    assert enc.decode(np.array([15496, 995], np.int32)) == "Hello world"
    for bad in (50257, -1):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            enc.decode([15496, bad])


def test_lone_surrogate_is_rejected_like_the_reference(enc):
    # Not encodable as UTF-8; the reference raises the same error from str.encode.
    with pytest.raises(UnicodeEncodeError):
        enc.encode("x\ud800")


def test_reference_tables_match_the_vocabulary_files():
    """`decoder` and `bpe_ranks` (built on first use) are the reference's tables, read from the files."""
    vocab = encoder.default_vocab_dir()
    enc = encoder.Encoder.from_dir(vocab)
    with open(os.path.join(vocab, "encoder.json"), encoding="utf-8") as f:
        token_ids = json.load(f)
    with open(os.path.join(vocab, "vocab.bpe"), encoding="utf-8") as f:
        pairs = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    assert enc.decoder == {i: t for t, i in token_ids.items()}
    assert enc.bpe_ranks == dict(zip(pairs, range(len(pairs))))
    assert len(enc.bpe_ranks) == 50000


def test_from_files_loads_the_bundled_vocabulary():
    vocab = encoder.default_vocab_dir()
    assert os.path.isdir(vocab) and os.path.dirname(vocab) == os.path.dirname(os.path.abspath(encoder.__file__))
    enc = encoder.Encoder.from_files(os.path.join(vocab, "encoder.json"), os.path.join(vocab, "vocab.bpe"))
    assert enc.encode("Hello world") == [15496, 995]


def test_get_encoder_reads_a_model_directory_and_expands_the_path(tmp_path, monkeypatch):
    shutil.copytree(encoder.default_vocab_dir(), tmp_path / "124M")
    monkeypatch.setenv("GPT2_TEST_MODELS", str(tmp_path))
    enc = encoder.get_encoder("117M", "$GPT2_TEST_MODELS")  # legacy name of 124M
    assert enc.encode("hello world") == [31373, 995]


def test_missing_model_says_how_to_download(tmp_path):
    with pytest.raises(UserError, match=r"model '124M' not found in .*download_model\.py 124M"):
        encoder.get_encoder("124M", str(tmp_path))


@pytest.mark.parametrize("missing", ["encoder.json", "vocab.bpe"])
def test_missing_vocab_file_says_how_to_download(tmp_path, missing):
    shutil.copytree(encoder.default_vocab_dir(), tmp_path / "124M")
    os.remove(tmp_path / "124M" / missing)
    with pytest.raises(UserError, match=rf"{missing} is missing: run: python download_model\.py 124M"):
        encoder.get_encoder("124M", str(tmp_path))


def test_missing_vocab_file_of_an_unreleased_model_says_where_to_copy_from(tmp_path):
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match=r"encoder\.json is missing: copy .*download_model\.py") as info:
        encoder.get_encoder("mine", str(tmp_path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name,content,message", [
    ("encoder.json", "<html>503 Service Unavailable</html>", "cannot read the vocabulary"),
    ("encoder.json", "[1, 2, 3]", "not a token -> id table"),
    ("encoder.json", '{"a": 0}', "lacks tokens for single bytes"),
    ("vocab.bpe", "#version: 0.2\nĠ t\n<html>503 Service Unavailable</html>\n", "not one merge pair"),
])
def test_malformed_vocabulary_is_a_user_error(tmp_path, name, content, message):
    shutil.copytree(encoder.default_vocab_dir(), tmp_path / "124M")
    (tmp_path / "124M" / name).write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=f"{message}.*download_model.py 124M"):
        encoder.get_encoder("124M", str(tmp_path))


def test_docstring_examples_run():
    results = doctest.testmod(encoder)
    assert results.attempted >= 10 and results.failed == 0


def test_matches_hugging_face_tokenizer_when_installed(enc):
    transformers = pytest.importorskip("transformers")
    vocab = encoder.default_vocab_dir()
    hf = transformers.GPT2Tokenizer(os.path.join(vocab, "encoder.json"), os.path.join(vocab, "vocab.bpe"))
    rng = random.Random(99)
    # Its regex engine has older Unicode tables (U+18DCF, a Tangut letter since 2020, is a
    # symbol to it), so random text stays where the letter classes agree.
    # Hugging Face turns a literal "<|endoftext|>" into the special id; the reference does not.
    corpus = [text for text, _ in REFERENCE_IDS if "<|endoftext|>" not in text]
    corpus += [random_text(rng, rng.randint(1, 200), STABLE_RANGES) for _ in range(300)]
    corpus.append("\n".join(corpus))
    for text in corpus:
        assert enc.encode(text) == hf.encode(text), text
