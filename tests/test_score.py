"""score.py: log-likelihoods checked against direct arithmetic on the model's logits."""
import json
import math

import numpy as np
import pytest

import score
from conftest import run_main, run_script
from test_generate_unconditional_samples import assert_one_line_error

TEXT = "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times."


@pytest.fixture(scope="module")
def gpt(tiny_gpt):
    return tiny_gpt


def direct_logprobs(lm, context, targets_from):
    """log p(context[j] | context[:j]) for j >= targets_from, from one full pass, in numpy."""
    logits = lm(np.array([context], np.int32))["logits"].numpy()[0].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return [logp[j - 1, context[j]] for j in range(targets_from, len(context))]


@pytest.mark.parametrize("n_tokens,n_ctx,stride", [(10, 64, 32), (200, 64, 32), (200, 64, 64), (200, 64, 1),
                                                    (63, 64, 10), (64, 64, 10)])
def test_windows_score_every_token_once_with_enough_context(n_tokens, n_ctx, stride):
    spans = score.windows(n_tokens, n_ctx, stride)
    scored = [j for _, end, first in spans for j in range(first, end)]
    assert scored == list(range(1, n_tokens + 1))
    for k, (start, end, first) in enumerate(spans):
        assert end - start <= n_ctx and first > start
        if k:  # after the first window, each token sees at least n_ctx - stride tokens (and one)
            assert first - start >= max(n_ctx - stride, 1)


def test_perplexity_equals_numpy_on_the_models_logits(gpt):
    tokens = gpt.encode(TEXT)
    expected = direct_logprobs(gpt.lm, [gpt.eot_token] + tokens, 1)
    report = gpt.score(TEXT)
    np.testing.assert_allclose(report["token_logprobs"], expected, rtol=0, atol=1e-4)
    nll = -sum(expected) / len(tokens)
    assert report["tokens"] == len(tokens)
    assert report["nll"] == pytest.approx(nll, abs=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert report["bits_per_byte"] == pytest.approx(nll * len(tokens) / math.log(2) / len(TEXT.encode()), rel=1e-5)


@pytest.mark.parametrize("stride", [1, 7, 32, 64])
def test_a_text_that_fits_one_window_scores_the_same_for_any_stride(gpt, stride):
    one = gpt.score(TEXT)
    assert gpt.score(TEXT, stride=stride)["token_logprobs"] == pytest.approx(one["token_logprobs"], abs=1e-5)


def test_sliding_window_equals_direct_passes_over_each_window(gpt):
    long_text = " ".join([TEXT] * 8)  # far more than the tiny model's 64-token window
    tokens = gpt.encode(long_text)
    full = [gpt.eot_token] + tokens
    expected = []
    for start, end, first in score.windows(len(tokens), gpt.hparams.n_ctx, 16):
        expected += direct_logprobs(gpt.lm, full[start:end], first - start)
    got = gpt.score(long_text, stride=16, batch_size=3)["token_logprobs"]
    assert len(got) == len(tokens)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_batching_texts_of_different_lengths_changes_nothing(gpt):
    texts = ["Short one.", TEXT, " ".join([TEXT] * 3)]
    together = gpt.score(texts, stride=20, batch_size=4)
    alone = [gpt.score(t, stride=20, batch_size=1) for t in texts]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a["token_logprobs"], b["token_logprobs"], atol=1e-4)


def test_perplexity_equals_hugging_face_transformers(gpt):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_compat

    hf = hf_compat.to_hf(gpt.lm)
    ids = torch.tensor([[gpt.eot_token] + gpt.encode(TEXT)])
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss.item()  # mean NLL of tokens 1.. given the ones before
    assert gpt.score(TEXT)["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_cli_reports_files_and_json_tokens(tiny_models_dir, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "b.txt").write_text("Another text.", encoding="utf-8")
    result = run_script("score.py", tmp_path / "a.txt", tmp_path / "b.txt", "--model_name", "tiny",
                        "--models_dir", tiny_models_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and "perplexity" in lines[0] and lines[1].startswith(str(tmp_path / "b.txt"))
    result = run_main("score.py", "--model_name", "tiny", "--models_dir", tiny_models_dir, "--json", stdin=TEXT)
    report = json.loads(result.stdout)
    assert report["input"] == "<stdin>" and report["tokens"] == len(report["token_logprobs"])
    assert "".join(t["text"] for t in report["token_logprobs"]) == TEXT
    assert all(t["logprob"] <= 0 for t in report["token_logprobs"])


@pytest.mark.parametrize("content,args,pattern", [
    (b"", [], r"is empty: nothing to score"),
    (b"\x00\x01binary\x00", [], r"looks binary"),
    (b"caf\xe9", [], r"not valid UTF-8"),
    (b"fine text", ["--stride", 65], r"--stride must be a whole number from 1 to the window size 64"),
    (b"fine text", ["--stride", 0], r"--stride must be"),
])
def test_bad_input_gets_a_one_line_error(tiny_models_dir, tmp_path, content, args, pattern):
    (tmp_path / "in.txt").write_bytes(content)
    result = run_main("score.py", tmp_path / "in.txt", "--model_name", "tiny", "--models_dir", tiny_models_dir, *args)
    assert_one_line_error(result, pattern)
