"""The byte-level BPE encoder, checked against ids from the reference encoder."""
import os
import random
import shutil

import pytest

import encoder
from cli import UserError

# (text, ids) pairs produced by the reference encoder (openai/gpt-2 src/encoder.py, commit
# 9b63575) on the released vocabulary, run in a scratch folder outside this repository.
REFERENCE_IDS = [
    ('Hello world', [15496, 995]),
    ('hello world', [31373, 995]),
    ('caf\xe9 na\xefve r\xe9sum\xe9', [66, 1878, 2634, 41492, 40560, 16345, 2634]),
    ('\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8', [33768, 98, 17312, 105, 45739, 252, 5641, 24336, 25084, 43302]),
    ('\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd', [50227, 40010, 27072, 147, 251, 14360, 95, 27072, 40010, 147, 251]),
    ('\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645', [25405, 26897, 148, 255, 39848, 12919, 17550, 101, 23525, 44690, 23525, 25405]),
    ('a  b   c    d', [64, 220, 275, 220, 220, 269, 220, 220, 220, 288]),
    ('tab\there\t\tand\nnewlines\n\n\nend', [8658, 197, 1456, 197, 197, 392, 198, 3605, 6615, 628, 198, 437]),
    ('trailing spaces   ', [9535, 4386, 9029, 220, 220, 220]),
    ('   leading', [220, 220, 3756]),
    (' \n \n', [220, 198, 220, 198]),
    ("I'm you're we've they'll he'd it's don't", [40, 1101, 345, 821, 356, 1053, 484, 1183, 339, 1549, 340, 338, 836, 470]),
    ("HE'S SHE'LL I'M", [13909, 6, 50, 48052, 6, 3069, 314, 6, 44]),
    ("'s's't", [338, 338, 470]),
    ('12345 3.14159 -42 1,000,000 \u2460\u2461', [10163, 2231, 513, 13, 1415, 19707, 532, 3682, 352, 11, 830, 11, 830, 2343, 239, 254, 158, 239, 94]),
    ('emoji \U0001f642 family \U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466 flag \U0001f1eb\U0001f1f7', [368, 31370, 32485, 1641, 50169, 101, 447, 235, 41840, 102, 447, 235, 41840, 100, 447, 235, 41840, 99, 6056, 12520, 229, 104, 8582, 229, 115]),
    ('control \x00\x01\x07\x1b[0m \x7f', [13716, 220, 188, 189, 195, 215, 58, 15, 76, 220, 221]),
    ('<|endoftext|>', [27, 91, 437, 1659, 5239, 91, 29]),
    ('text<|endoftext|>more', [5239, 27, 91, 437, 1659, 5239, 91, 29, 3549]),
    ('def f(x):\n    return x**2  # comment', [4299, 277, 7, 87, 2599, 198, 220, 220, 220, 1441, 2124, 1174, 17, 220, 1303, 2912]),
    ('\xc0\xc9\xce\xd5\xdc \xdf \ufb01', [127, 222, 38351, 127, 236, 127, 243, 127, 250, 6184, 253, 27332, 105, 223]),
    ('\r\n windows\r\n', [201, 198, 9168, 201, 198]),
    ('\u200bzero\u200bwidth', [9525, 22570, 9525, 10394])
]


@pytest.fixture(scope="module")
def enc():
    return encoder.Encoder.from_dir(encoder.DEFAULT_VOCAB_DIR)


@pytest.mark.parametrize("text,ids", REFERENCE_IDS)
def test_ids_equal_the_reference_encoders(enc, text, ids):
    assert enc.encode(text) == ids


@pytest.mark.parametrize("text,ids", REFERENCE_IDS)
def test_decode_inverts_encode_on_the_golden_texts(enc, text, ids):
    assert enc.decode(ids) == text


def test_end_of_text_id_and_vocabulary_size(enc):
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.decode([enc.eot_token]) == "<|endoftext|>"
    # In text it is ordinary characters, as in the reference, never the separator id.
    assert enc.eot_token not in enc.encode("<|endoftext|>")


def random_text(rng, length):
    """Mixed code points: ASCII, Latin-1, CJK, emoji, combining marks, whitespace, controls."""
    ranges = [(0x20, 0x7E), (0x00, 0x1F), (0xA0, 0xFF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F),
              (0x0300, 0x036F), (0x0590, 0x06FF)]
    out = []
    for _ in range(length):
        if rng.random() < 0.15:
            out.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "'s", "'ll", "\u200d"]))
        else:
            lo, hi = rng.choice(ranges)
            out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_round_trip_on_random_valid_text(enc):
    rng = random.Random(1234)
    for _ in range(300):
        text = random_text(rng, rng.randint(0, 60))
        assert enc.decode(enc.encode(text)) == text


def test_bytes_of_a_split_character_decode_as_replacement(enc):
    ids = enc.encode("€")  # three bytes, more than one token
    raw = enc.decode_bytes(ids)
    assert raw == "€".encode("utf-8")
    partial = [t for t in ids][:-1] if len(ids) > 1 else None
    if partial:
        assert "\ufffd" in enc.decode(partial)
    # A lone continuation byte is not UTF-8: errors='replace' gives U+FFFD.
    lone = enc.encoder[enc.byte_encoder[0x80]]
    assert enc.decode([lone]) == "\ufffd"


def test_decode_accepts_numpy_ids_and_rejects_unknown_ids(enc):
    np = pytest.importorskip("numpy")
    assert enc.decode(np.array([15496, 995], np.int32)) == "Hello world"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        enc.decode([50257])


def test_get_encoder_reads_a_model_directory(tmp_path):
    model_dir = tmp_path / "124M"
    shutil.copytree(encoder.DEFAULT_VOCAB_DIR, model_dir)
    assert encoder.get_encoder("117M", str(tmp_path)).encode("hello world") == [31373, 995]


def test_missing_model_says_how_to_download(tmp_path):
    with pytest.raises(UserError, match="download_model.py 124M"):
        encoder.get_encoder("124M", str(tmp_path))


def test_missing_vocab_file_is_a_user_error(tmp_path):
    shutil.copytree(encoder.DEFAULT_VOCAB_DIR, tmp_path / "m")
    os.remove(tmp_path / "m" / "vocab.bpe")
    with pytest.raises(UserError, match="vocab.bpe is missing.*download_model.py"):
        encoder.get_encoder("m", str(tmp_path))


def test_malformed_vocabulary_is_a_user_error(tmp_path):
    shutil.copytree(encoder.DEFAULT_VOCAB_DIR, tmp_path / "m")
    (tmp_path / "m" / "encoder.json").write_text("<html>503</html>")
    with pytest.raises(UserError, match="cannot read the vocabulary"):
        encoder.get_encoder("m", str(tmp_path))


def test_matches_hugging_face_tokenizer_when_installed(enc):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Tokenizer(os.path.join(encoder.DEFAULT_VOCAB_DIR, "encoder.json"),
                                    os.path.join(encoder.DEFAULT_VOCAB_DIR, "vocab.bpe"))
    rng = random.Random(99)
    for _ in range(100):
        text = random_text(rng, 40).replace("<|endoftext|>", "")
        assert enc.encode(text) == hf.encode(text)
