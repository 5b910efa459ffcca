"""The Python API: generate, stream, stop strings, end-of-text, prompts of different lengths."""
import numpy as np
import pytest

import api
from cli import UserError


@pytest.fixture(scope="module")
def gpt(tiny_gpt):
    return tiny_gpt


def greedy_tokens(gpt, prompt, length):
    """Greedy continuation by repeated full passes: independent of the cached decode loop."""
    tokens = gpt.encode(prompt)
    for _ in range(length):
        logits = gpt.lm(np.array([tokens], np.int32))["logits"].numpy()[0, -1]
        tokens.append(int(np.argmax(logits)))
    return tokens[len(gpt.encode(prompt)):]


def test_greedy_generation_equals_repeated_full_passes(gpt):
    for prompt in ["Hello", "The quick brown fox jumps over"]:
        expected = gpt.decode(greedy_tokens(gpt, prompt, 10))
        assert gpt.generate(prompt, length=10, temperature=0) == expected


def sliding_greedy(gpt, prompts, length):
    """Greedy continuations past the window by full passes, with TokenStream's rule written out
    independently: rows share left-padded columns; when a row's window would exceed n_ctx after a
    token, the window restarts at the last half of it (the same columns for every row)."""
    n_ctx, keep = gpt.hparams.n_ctx, gpt.hparams.n_ctx // 2
    longest = max(len(p) for p in prompts)
    columns = [[None] * (longest - len(p)) + list(p) for p in prompts]
    start = 0
    for _ in range(length):
        for row in columns:
            context = [t for t in row[start:] if t is not None]
            row.append(int(np.argmax(gpt.lm(np.array([context], np.int32))["logits"].numpy()[0, -1])))
        if len(columns[0]) - start > n_ctx:
            start = len(columns[0]) - keep
    return [row[longest:] for row in columns]


def test_generation_slides_the_window_for_any_length(gpt):
    # Three windows' worth of new tokens, from prompts of two lengths sharing the batch.
    prompts = [gpt.encode("Hi"), gpt.encode(" word" * 40)]
    length = 3 * gpt.hparams.n_ctx
    expected = sliding_greedy(gpt, prompts, length)
    got = np.concatenate(list(gpt.sampler.generate(prompts, length, temperature=0)), axis=1)
    assert got.shape == (2, length)
    assert got.tolist() == expected


def test_truncate_left_keeps_the_last_tokens_of_a_long_prompt(gpt):
    long_prompt = " ".join(str(i) for i in range(100))
    tokens = gpt.encode(long_prompt)
    assert len(tokens) > gpt.hparams.n_ctx
    with pytest.raises(UserError, match=rf"the prompt is {len(tokens)} tokens and the window 64: use a prompt "
                                        rf"{len(tokens) - 64} tokens shorter, or use truncate left"):
        gpt.generate(long_prompt, 5)
    kept = gpt.generate(long_prompt, 5, truncate="left", top_k=5, seed=3)
    assert kept == gpt.generate(tokens[-64:], 5, top_k=5, seed=3)[0]
    with pytest.raises(UserError, match="truncate must be error or left, not 'right'"):
        gpt.generate(long_prompt, 5, truncate="right")


def test_a_batch_of_different_lengths_equals_each_prompt_alone(gpt):
    prompts = ["Hi", "A considerably longer prompt than the first", "Mid length one"]
    batch = gpt.generate(prompts, length=8, temperature=0)
    assert batch == [gpt.generate(p, length=8, temperature=0) for p in prompts]


def test_stream_yields_pieces_as_they_are_made(gpt):
    pieces = list(gpt.stream("Streaming", length=30, temperature=0))
    assert len(pieces) > 3  # chunks of 1, 2, 4, 8, ... tokens arrive one by one
    assert {row for row, _ in pieces} == {0}
    assert "".join(p for _, p in pieces) == gpt.generate("Streaming", length=30, temperature=0)


def test_stream_rejects_bad_options_when_called_not_when_first_read(gpt):
    # Scripts print a header between the call and the first piece; the error must come first.
    with pytest.raises(UserError, match="window"):
        gpt.stream(" word" * (gpt.hparams.n_ctx + 1), length=4)
    with pytest.raises(UserError, match="top_p"):
        gpt.stream("Hi", length=4, top_p=0)


def test_stop_string_cuts_the_text_and_ends_the_row(gpt):
    full = gpt.generate("Once", length=30, temperature=0)
    stop = full[5:9]
    assert stop and stop in full
    cut = gpt.generate("Once", length=30, temperature=0, stop=stop)
    assert cut == full[:full.index(stop)]
    # A list of stop strings: the earliest match wins.
    assert gpt.generate("Once", length=30, temperature=0, stop=["zzzz-never", stop]) == cut


def test_row_text_stops_at_eot_and_holds_back_a_possible_stop_string(gpt):
    enc = gpt.encoder
    ids = enc.encode("Hello world, and goodbye")
    row = api.RowText(enc, stop=None, stop_at_eot=True)
    assert row.feed(ids[:2]) == "Hello world"
    assert row.feed(ids[2:] + [enc.eot_token] + enc.encode(" after")) == ", and goodbye"
    assert row.finished and row.feed(enc.encode("more")) == ""
    # A stop string split across chunks: the part that could start it is held back.
    row = api.RowText(enc, stop="and good", stop_at_eot=False)
    first = row.feed(enc.encode("Hello world, and"))
    assert first == "Hello world, " and not row.finished
    assert row.feed(enc.encode(" goodbye")) == ""
    assert row.finished
    # Held-back text that turns out not to be a stop string comes out in the end.
    row = api.RowText(enc, stop="and good", stop_at_eot=False)
    text = row.feed(enc.encode("Hello world, and")) + row.feed(enc.encode(" so")) + row.finish()
    assert text == "Hello world, and so"


def test_a_character_split_across_tokens_comes_out_whole(gpt):
    enc = gpt.encoder
    ids = enc.encode("\U0001d518")  # one character, three tokens
    assert len(ids) == 3
    row = api.RowText(enc, stop=None, stop_at_eot=False)
    pieces = [row.feed([t]) for t in ids] + [row.finish()]
    assert pieces[-2:] == ["\U0001d518", ""] and all(p == "" for p in pieces[:-2])


def test_same_seed_same_text(gpt):
    a = gpt.generate("Seeded", length=12, top_k=40, seed=7)
    b = gpt.generate("Seeded", length=12, top_k=40, seed=7)
    c = gpt.generate("Seeded", length=12, top_k=40, seed=8)
    assert a == b and a != c


def test_empty_prompt_is_a_user_error(gpt):
    with pytest.raises(UserError, match="Prompt should not be empty"):
        gpt.generate("", length=3)


def test_multibyte_characters_are_never_split_in_the_stream(gpt):
    # Whatever the model makes, each piece decodes on its own (no stray U+FFFD from a split
    # character) and the pieces join to the full text.
    pieces = [p for _, p in gpt.stream("日本語", length=40, top_k=0, seed=3)]
    full = gpt.generate("日本語", length=40, top_k=0, seed=3)
    assert "".join(pieces) == full


def test_features_are_the_residual_stream(gpt):
    hp = gpt.hparams
    final = gpt.features("Feature text")
    every = gpt.features("Feature text", layers=range(hp.n_layer + 1))
    assert len(every) == hp.n_layer + 1 and final.shape == (len(gpt.encode("Feature text")), hp.n_embd)
    np.testing.assert_array_equal(every[-1], final)
    # The final state times the tied embedding gives the model's logits: an independent check.
    wte = gpt.lm.weights["model/wte"].numpy()
    logits = gpt.lm(np.array([gpt.encode("Feature text")], np.int32))["logits"].numpy()[0]
    np.testing.assert_allclose(final @ wte.T, logits, atol=1e-3)
    # Layer 0 is token plus position embeddings.
    ids = gpt.encode("Feature text")
    expected = wte[ids] + gpt.lm.weights["model/wpe"].numpy()[:len(ids)]
    np.testing.assert_allclose(every[0], expected, atol=1e-6)


def test_fine_tune_learns_a_text_in_place_and_save_writes_a_loadable_model(tiny_models_dir, tmp_path):
    gpt = api.load("tiny", tiny_models_dir)  # its own copy: training changes it
    text = "Rain falls softly on the quiet hills of the old north country."
    before = gpt.score(text)["nll"]
    losses = gpt.fine_tune([text], steps=80, learning_rate=1e-2, seed=0, run_dir=str(tmp_path / "run"))
    assert len(losses) == 80 and losses[-1] < 0.2 < losses[0]
    assert gpt.score(text)["nll"] != before  # the model in use is the one trained
    prompt = "Rain falls softly"
    assert gpt.generate(prompt, length=12, temperature=0).startswith(text[len(prompt):len(prompt) + 20])

    gpt.save(str(tmp_path / "models" / "learned"))
    again = api.load("learned", str(tmp_path / "models"))
    assert again.score(text)["nll"] == pytest.approx(gpt.score(text)["nll"], rel=1e-5)
    # The run directory is a model directory too, and train.py can resume it.
    import runs
    assert runs.latest_step(str(tmp_path / "run")) == 80
    assert api.load("run", str(tmp_path)).score(text)["nll"] == pytest.approx(gpt.score(text)["nll"], rel=1e-5)


def test_fine_tune_needs_float32_and_some_text(tiny_models_dir):
    with pytest.raises(UserError, match="float32"):
        api.load("tiny", tiny_models_dir, dtype="bfloat16").fine_tune(["some text"], steps=1)
    with pytest.raises(UserError, match="no text"):
        api.load("tiny", tiny_models_dir).fine_tune(["", ""], steps=1)


def test_numpy_prompts_work_like_lists(gpt):
    ids = gpt.encode("Hello there")
    want = gpt.generate([ids], length=5, temperature=0)
    assert gpt.generate(np.array(ids, np.int32), length=5, temperature=0) == want
    assert gpt.generate([np.array(ids)], length=5, temperature=0) == want
    assert gpt.generate([[np.int64(t) for t in ids]], length=5, temperature=0) == want


def test_token_prompts_out_of_the_vocabulary_are_user_errors(gpt):
    with pytest.raises(UserError, match="token ids from 0 to 50256"):
        gpt.generate([[1, 50257]], length=3)


@pytest.mark.parametrize("stride", [0, -3, 65, 2.5])
def test_score_checks_its_stride(gpt, stride):
    with pytest.raises(UserError, match="stride must be a whole number from 1 to the window size 64"):
        gpt.score("some text to score", stride=stride)


def test_controls_left_off_give_todays_samples(gpt):
    off = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias={}, bad_words=[],
               min_length=0)
    for options in [dict(top_k=40, seed=3), dict(seed=5), dict(top_p=0.9, temperature=0.8, seed=9),
                    dict(temperature=0)]:
        prompts = ["Hello there", "A"]
        assert gpt.generate(prompts, length=20, **options) == gpt.generate(prompts, length=20, **options, **off)


def test_bad_words_as_text_ban_their_tokens_as_written_and_after_a_space(gpt):
    plain = gpt.generate("Hello there", length=12, temperature=0)
    first = gpt.decode(gpt.encode(plain)[:1]).strip()
    as_text = gpt.generate("Hello there", length=12, temperature=0, bad_words=[first])
    as_ids = gpt.generate("Hello there", length=12, temperature=0,
                          bad_words=[gpt.encode(first), gpt.encode(" " + first)])
    assert as_text == as_ids != plain


def test_logit_bias_takes_one_token_strings_for_their_ids(gpt):
    plain = gpt.generate("Hello there", length=12, temperature=0)
    token = gpt.encode(plain)[0]
    by_text = gpt.generate("Hello there", length=12, temperature=0, logit_bias={gpt.decode([token]): -100})
    assert by_text == gpt.generate("Hello there", length=12, temperature=0, logit_bias={token: -100}) != plain


@pytest.mark.parametrize("options,message", [
    (dict(logit_bias={"two words": 1}), "logit_bias must map strings of one token; 'two words' is 2 tokens"),
    (dict(logit_bias={50257: 1}), "logit_bias must hold token ids from 0 to 50256, got 50257"),
    (dict(logit_bias={" the": "up"}), "logit_bias must be a number"),
    (dict(bad_words=["ok", ""]), "bad_words must be strings of at least one token, got ''"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
])
def test_bad_controls_are_user_errors_before_any_text(gpt, options, message):
    with pytest.raises(UserError, match=message):
        gpt.stream("Hello", length=3, **options)


PARITY_PROMPT = "The cat sat on the mat and then"


@pytest.fixture(scope="module")
def hf_greedy(gpt):
    """Greedy tokens from Hugging Face transformers' `generate` on our weights (skips without it)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import hf_compat

    hf = hf_compat.to_hf(gpt.lm)
    ids = gpt.encode(PARITY_PROMPT)

    def run(length, **options):
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=length, do_sample=False, pad_token_id=gpt.eot_token,
                              eos_token_id=gpt.eot_token, **options)
        return out[0, len(ids):].tolist()

    return run


def our_greedy(gpt, length, **controls):
    chunks = gpt.sampler.generate([gpt.encode(PARITY_PROMPT)], length, temperature=0, stop_at_eot=True, **controls)
    return np.concatenate(list(chunks), axis=1)[0].tolist()


@pytest.mark.parametrize("case", ["repetition_penalty", "banned_token", "banned_pair", "min_length", "together"])
def test_greedy_controls_match_hugging_face_generate(gpt, hf_greedy, case):
    plain = our_greedy(gpt, 20)
    assert plain == hf_greedy(20)
    eot = gpt.eot_token
    ours, theirs = {
        "repetition_penalty": (dict(repetition_penalty=1.8), dict(repetition_penalty=1.8)),
        "banned_token": (dict(bad_words=[plain[:1]]), dict(bad_words_ids=[plain[:1]])),
        "banned_pair": (dict(bad_words=[plain[3:5]]), dict(bad_words_ids=[plain[3:5]])),
        # A bias makes end-of-text the likeliest token, so only the minimum length holds it back.
        "min_length": (dict(logit_bias={eot: 100}, min_length=7),
                       dict(sequence_bias={(eot,): 100.0}, min_new_tokens=7)),
        "together": (dict(repetition_penalty=1.3, bad_words=[plain[1:2]], logit_bias={eot: 100}, min_length=11),
                     dict(repetition_penalty=1.3, bad_words_ids=[plain[1:2]], sequence_bias={(eot,): 100.0},
                          min_new_tokens=11)),
    }[case]
    got = our_greedy(gpt, 20, **ours)
    assert got == hf_greedy(20, **theirs)
    assert got != plain


def full_pass_logprobs(gpt, context, tokens):
    """Log-softmax of one full pass over context + tokens at each new token's position."""
    ids = list(context) + list(tokens)
    logits = gpt.lm(np.array([ids], np.int32))["logits"].numpy()[0].astype(np.float64)
    logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    return logprobs[len(context) - 1:len(ids) - 1]


def test_logprobs_equal_scores_of_the_same_tokens(gpt):
    import score

    sample = gpt.generate([[gpt.eot_token]], 20, top_k=40, seed=2, logprobs=3)[0]
    ids = [t["id"] for t in sample["tokens"]]
    assert len(ids) == 20 and gpt.decode(ids) == sample["text"] and sample["prompt"] == "<|endoftext|>"
    scored = score.score_tokens(gpt.lm, [ids], gpt.eot_token)[0]
    np.testing.assert_allclose([t["logprob"] for t in sample["tokens"]], scored, atol=1e-4)


def test_logprobs_and_alternatives_are_the_models_before_the_controls(gpt):
    result = gpt.generate("Hello there", 10, temperature=0.7, seed=4, logprobs=5, repetition_penalty=3.0,
                          bad_words=["the"])
    assert result["prompt"] == "Hello there"
    ids = [t["id"] for t in result["tokens"]]
    expected = full_pass_logprobs(gpt, gpt.encode("Hello there"), ids)
    for token, row in zip(result["tokens"], expected):
        assert token["logprob"] == pytest.approx(row[token["id"]], abs=1e-4)
        best = np.argsort(-row)[:5]
        assert [text for text, _ in token["top_logprobs"]] == [gpt.decode([int(i)]) for i in best]
        np.testing.assert_allclose([lp for _, lp in token["top_logprobs"]], row[best], atol=1e-4)
        assert token["text"] == gpt.decode([token["id"]])


def test_logprobs_zero_lists_no_alternatives_and_end_of_text_is_not_a_token(gpt):
    results = gpt.generate(["Hi", "Some longer prompt"], 12, temperature=0, logprobs=0, stop_at_eot=True,
                           logit_bias={gpt.eot_token: 100}, min_length=4)
    for result, prompt in zip(results, ["Hi", "Some longer prompt"]):
        assert result["prompt"] == prompt and len(result["tokens"]) == 4
        assert all(t["top_logprobs"] == [] for t in result["tokens"])
        assert gpt.eot_token not in [t["id"] for t in result["tokens"]]
        assert result["text"] == gpt.decode([t["id"] for t in result["tokens"]])


def test_logprobs_keep_the_text(gpt):
    for options in [dict(temperature=0), dict(top_k=40, seed=8)]:
        assert gpt.generate("Seeded", 15, logprobs=2, **options)["text"] == gpt.generate("Seeded", 15, **options)
