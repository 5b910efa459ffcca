"""The sampling filters and the decode loop, tested with a stub model and no weights."""
import numpy as np
import pytest
import tensorflow as tf

import sample
from errors import UserError
from hparams import HParams


def reference_top_p(logits, p):
    """The reference's nucleus rule, written out in numpy for one row."""
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits.max())
    probs /= probs.sum()
    keep = max(int(np.sum(np.cumsum(probs) <= p)), 1)
    threshold = logits[order][keep - 1]
    return np.where(logits < threshold, -1e10, logits)


def sample_logits(logits, temperature, top_k, top_p, seed):
    knobs = sample.Knobs(temperature, top_k, top_p).tensors()
    return sample.sample_logits(logits, knobs, tf.cast(seed, tf.int64))


def test_top_k_keeps_the_k_largest_and_ties():
    logits = tf.constant([[1.0, 5.0, 3.0, 3.0, 0.0], [9.0, 8.0, 7.0, 6.0, 5.0]])
    out = sample.top_k_logits(logits, 3).numpy()
    # Row 0: the third largest value (3.0) is tied, and both copies are kept.
    np.testing.assert_array_equal(out[0], [-1e10, 5.0, 3.0, 3.0, -1e10])
    np.testing.assert_array_equal(out[1], [9.0, 8.0, 7.0, -1e10, -1e10])


def test_top_k_zero_is_off_and_large_k_keeps_all():
    logits = tf.random.stateless_normal([2, 7], seed=[1, 2])
    np.testing.assert_array_equal(sample.top_k_logits(logits, 0), logits)
    np.testing.assert_array_equal(sample.top_k_logits(logits, 100), logits)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_matches_the_reference_rule_for_every_row(p):
    logits = tf.random.stateless_normal([4, 50], seed=[3, 4]) * 3
    out = sample.top_p_logits(logits, p).numpy()
    for row in range(4):
        np.testing.assert_array_equal(out[row], reference_top_p(logits[row].numpy(), p))


def test_top_p_excludes_the_token_that_crosses_p():
    # Probabilities 0.5, 0.3, 0.2: with p = 0.7 only the first stays (0.5 + 0.3 crosses 0.7).
    logits = tf.math.log(tf.constant([[0.5, 0.3, 0.2]]))
    out = sample.top_p_logits(logits, 0.7).numpy()[0]
    assert out[0] > -1e9 and out[1] == -1e10 and out[2] == -1e10
    # p = 0.8 keeps the first two.
    assert (sample.top_p_logits(logits, 0.85).numpy()[0] > -1e9).tolist() == [True, True, False]


def test_top_p_always_keeps_one_and_one_is_off():
    logits = tf.constant([[0.0, 10.0, 1.0]])
    assert (sample.top_p_logits(logits, 1e-6).numpy() > -1e9).sum() == 1
    np.testing.assert_array_equal(sample.top_p_logits(logits, 1.0), logits)


def test_temperature_zero_is_greedy():
    logits = tf.constant([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    tokens = sample_logits(logits, 0.0, 0, 1.0, tf.constant([1, 2]))
    assert tokens.numpy().tolist() == [1, 0]


def test_draws_follow_the_tempered_distribution():
    rows = 20000
    logits = tf.tile(tf.constant([[0.0, 1.0, 2.0]]), [rows, 1])
    tokens = sample_logits(logits, 2.0, 0, 1.0, tf.constant([7, 8])).numpy()
    freq = np.bincount(tokens, minlength=3) / rows
    expected = np.exp([0.0, 0.5, 1.0]) / np.exp([0.0, 0.5, 1.0]).sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_top_k_draws_stay_inside_the_top_k():
    rows = 5000
    logits = tf.tile(tf.range(10, dtype=tf.float32)[None] * 0.1, [rows, 1])
    tokens = sample_logits(logits, 1.0, 3, 1.0, tf.constant([1, 1])).numpy()
    assert set(tokens.tolist()) == {7, 8, 9}


def test_top_k_draws_follow_the_tempered_distribution_of_the_k_best():
    rows = 20000
    logits = tf.tile(tf.constant([[4.0, 0.0, 3.0, 1.0, 2.0]]), [rows, 1])
    tokens = sample_logits(logits, 2.0, 3, 1.0, tf.constant([5, 6])).numpy()
    freq = np.bincount(tokens, minlength=5) / rows
    expected = np.array([np.exp(2.0), 0, np.exp(1.5), 0, np.exp(1.0)])
    np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.015)


def test_top_k_keeps_every_token_tied_with_the_k_th_as_the_reference_does():
    rows = 4000
    logits = tf.tile(tf.constant([[3.0, 1.0, 2.0, 2.0, 0.0]]), [rows, 1])  # 2nd best is a tie
    tokens = sample_logits(logits, 1.0, 2, 1.0, tf.constant([1, 3])).numpy()
    assert set(tokens.tolist()) == {0, 2, 3}


def test_top_k_larger_than_the_vocabulary_keeps_all():
    rows = 2000
    logits = tf.zeros([rows, 4])
    tokens = sample_logits(logits, 1.0, 50, 1.0, tf.constant([2, 2])).numpy()
    assert set(tokens.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("p", [0.3, 0.7, 0.95])
def test_top_k_then_top_p_draws_stay_inside_the_reference_nucleus(p):
    rng = np.random.default_rng(3)
    row = rng.normal(size=50).astype(np.float32) * 2
    top10 = np.where(row < np.sort(row)[-10], -1e10, row)
    allowed = set(np.flatnonzero(reference_top_p(top10, p) > -1e10).tolist())
    tokens = sample_logits(tf.tile(row[None], [3000, 1]), 1.0, 10, p, tf.constant([9, 9])).numpy()
    assert set(tokens.tolist()) == allowed


def test_same_seed_same_draws_other_seed_other_draws():
    logits = tf.zeros([64, 1000])
    a = sample_logits(logits, 1.0, 0, 1.0, tf.constant([3, 0])).numpy()
    b = sample_logits(logits, 1.0, 0, 1.0, tf.constant([3, 0])).numpy()
    c = sample_logits(logits, 1.0, 0, 1.0, tf.constant([4, 0])).numpy()
    assert (a == b).all() and (a != c).any()


class CountingModel:
    """A stub engine: the next token is always (previous token + 1) mod vocab, with a margin
    of 5 logits; it also counts its decode steps in its state."""

    hparams = HParams(n_vocab=12, n_ctx=16, n_embd=4, n_head=1, n_layer=1)
    state_spec = [tf.TensorSpec([None], tf.int32)]

    def _logits(self, previous):
        return tf.one_hot((previous + 1) % self.hparams.n_vocab, self.hparams.n_vocab) * 5.0

    def prefill(self, tokens, pad, capacity):
        return self._logits(tokens[:, -1]), [tf.zeros([1], tf.int32)]

    def step(self, token, pos, pad, state):
        return self._logits(token), [state[0] + 1]


@pytest.fixture(scope="module")
def stub_sampler():
    return sample.Sampler(CountingModel(), eot_token=11)


def generate(sampler, contexts, length, **kw):
    chunks = list(sampler.generate(contexts, length, **kw))
    return np.concatenate(chunks, axis=1)


def test_loop_feeds_each_token_back(stub_sampler):
    out = generate(stub_sampler, [[3], [0, 1, 2, 5, 6]], 5, temperature=0)
    assert out.tolist() == [[4, 5, 6, 7, 8], [7, 8, 9, 10, 11]]


def test_chunking_does_not_change_the_tokens(stub_sampler):
    a = generate(stub_sampler, [[1], [2]], 9, top_k=5, seed=11)
    b = generate(stub_sampler, [[1], [2]], 9, top_k=5, seed=11, max_chunk=1)
    c = generate(stub_sampler, [[1], [2]], 9, top_k=5, seed=12)
    assert (a == b).all() and (a != c).any()


def test_stop_at_eot_ends_rows_and_the_loop(stub_sampler):
    # Vocabulary 12: the end-of-text id is 11. Row 0 reaches it after 2 tokens, row 1 after 5.
    stream = stub_sampler.generate([[9], [6]], 10, temperature=0, stop_at_eot=True)
    out = np.concatenate(list(stream), axis=1)
    assert out.tolist() == [[10, 11, 11, 11, 11], [7, 8, 9, 10, 11]]
    assert stream.done.all()


def test_without_stop_at_eot_generation_runs_on(stub_sampler):
    out = generate(stub_sampler, [[9]], 6, temperature=0)
    assert out.tolist() == [[10, 11, 0, 1, 2, 3]]


def test_stop_rows_from_outside(stub_sampler):
    stream = stub_sampler.generate([[0], [0]], 8, temperature=0, max_chunk=1)
    seen = []
    for chunk in stream:
        seen.append(chunk)
        if len(seen) == 2:
            stream.stop([1])
    out = np.concatenate(seen, axis=1)
    assert out[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert out[1].tolist()[:2] == [1, 2] and set(out[1].tolist()[2:]) == {11}


def test_the_loop_goes_on_past_the_window(stub_sampler):
    # Window 16: three windows' worth, each slide re-reading the last half as a prompt.
    out = generate(stub_sampler, [[3], [0, 1, 2, 5, 6]], 48, temperature=0, max_chunk=5)
    assert out.tolist() == [[(4 + i) % 12 for i in range(48)], [(7 + i) % 12 for i in range(48)]]


@pytest.mark.parametrize("length,prompt,message", [
    (5, 20, "the prompt is 20 tokens and the window 16: use a prompt 4 tokens shorter, or use truncate left to "
            "keep its last 16$"),
    (0, 1, "length must be a whole number >= 1"),
])
def test_window_errors_say_how_much_room_there_is(stub_sampler, length, prompt, message):
    with pytest.raises(UserError, match=message):
        stub_sampler.generate([[1] * prompt], length)


def test_a_prompt_that_exactly_fits(stub_sampler):
    # 8 prompt tokens + 9 new: the last new token is never fed back, so 16 positions suffice.
    assert generate(stub_sampler, [[1] * 8], 9, temperature=0).shape == (1, 9)


@pytest.mark.parametrize("knobs,message", [
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
])
def test_bad_knobs_are_user_errors(stub_sampler, knobs, message):
    with pytest.raises(UserError, match=message):
        stub_sampler.generate([[1]], 3, **knobs)


def test_stop_at_eot_inside_the_compiled_loop(stub_sampler):
    # The first tokens are made one call each; end-of-text at the 11th token falls in the loop.
    stream = stub_sampler.generate([[0]], 15, temperature=0, stop_at_eot=True)
    out = np.concatenate(list(stream), axis=1)
    assert out.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def test_a_tie_with_the_k_th_past_the_fetched_values_keeps_every_tied_token():
    # More tokens tie with the k-th than the k-best path fetches: the full pass keeps them all.
    rows = 6000
    tied = sample.TIE_ROOM + 4
    row = [5.0] + [2.0] * tied + [0.0, 1.0]
    tokens = sample_logits(tf.tile(tf.constant([row]), [rows, 1]), 1.0, 2, 1.0, tf.constant([4, 2])).numpy()
    assert set(tokens.tolist()) == set(range(tied + 1))


def test_ties_within_the_fetched_values_keep_the_reference_distribution():
    rows = 20000
    row = np.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.5, 0.0, -1.0] + [-2.0] * 20, np.float32)
    tokens = sample_logits(tf.tile(tf.constant(row[None]), [rows, 1]), 1.0, 2, 1.0, tf.constant([8, 1])).numpy()
    kept = row >= 2.0  # the 2nd best (2.0) is tied three ways: all three stay, as in the reference
    expected = np.where(kept, np.exp(row), 0) / np.exp(row[kept]).sum()
    np.testing.assert_allclose(np.bincount(tokens, minlength=len(row)) / rows, expected, atol=0.015)


def test_top_p_after_a_tie_past_the_fetched_values_counts_every_tied_token():
    # The reference's nucleus is taken over everything top-k kept, ties included.
    rows = 4000
    row = np.array([5.0] + [2.0] * (sample.TIE_ROOM + 4) + [0.0, 1.0], np.float32)
    kept_by_top_k = np.where(row < np.sort(row)[-2], -1e10, row)
    allowed = set(np.flatnonzero(reference_top_p(kept_by_top_k, 0.7) > -1e10).tolist())
    tokens = sample_logits(tf.tile(row[None], [rows, 1]), 1.0, 2, 0.7, tf.constant([3, 5])).numpy()
    assert set(tokens.tolist()) == allowed


def test_a_rows_draw_does_not_depend_on_its_neighbours():
    # Row 1 has a tie running past the fetched values and takes the full pass; row 0's draw
    # must be the one it gets alone in a batch of the same size.
    rng = np.random.default_rng(0)
    plain = rng.normal(size=40).astype(np.float32)
    tied = np.array([5.0] + [2.0] * (sample.TIE_ROOM + 4) + [0.0] * 27, np.float32)
    for seed in range(50):
        mixed = sample_logits(tf.constant(np.stack([plain, tied])), 1.0, 2, 1.0, [seed, 0]).numpy()
        alone = sample_logits(tf.constant(np.stack([plain, plain])), 1.0, 2, 1.0, [seed, 0]).numpy()
        assert mixed[0] == alone[0]


def test_seeds_use_all_64_bits_and_say_their_range():
    logits = tf.zeros([64, 1000])
    a = sample_logits(logits, 1.0, 0, 1.0, [sample.new_seed(0), 0]).numpy()
    b = sample_logits(logits, 1.0, 0, 1.0, [sample.new_seed(2 ** 31), 0]).numpy()
    assert (a != b).any()
    assert sample.new_seed(2 ** 63 - 1) == 2 ** 63 - 1
    with pytest.raises(UserError, match="seed must be a whole number from -2\\*\\*63 to 2\\*\\*63 - 1"):
        sample.new_seed(2 ** 63)
    assert sample.batch_seed(2 ** 63 - 1, 1) == -2 ** 63 + 1000002  # wraps within 64 bits


def test_retraces_are_counted_for_every_compiled_function(stub_sampler):
    generate(stub_sampler, [[1]], 12, top_k=3, seed=1)
    before = stub_sampler.traces()
    generate(stub_sampler, [[1, 2, 3]], 10, top_k=5, top_p=0.5, temperature=0.7, seed=2)
    assert set(before) == {"prefill", "chunk", "chunk_one_row", "sample_last"}
    assert stub_sampler.traces() == before  # other knobs and prompt lengths reuse the traces


class FixedModel(CountingModel):
    """A stub engine whose next-token logits are always the same row, so only the controls change
    which token is likeliest."""

    row = np.array([3.0, 2.55, 2.13, 1.71, 1.37, 0.93, 0.61, 0.17, -0.23, -0.67, -1.09, 2.87], np.float32)

    def _logits(self, previous):
        return tf.tile(tf.constant(self.row)[None], [tf.shape(previous)[0], 1])


@pytest.fixture(scope="module")
def fixed_sampler():
    return sample.Sampler(FixedModel(), eot_token=11)


def reference_greedy(row, prompt, length, repetition=1.0, presence=0.0, frequency=0.0):
    """Greedy decoding with the penalties written out for one row, token by token."""
    out = []
    for _ in range(length):
        logits = row.astype(np.float64).copy()
        for token in set(prompt) | set(out):
            logits[token] = logits[token] * repetition if logits[token] < 0 else logits[token] / repetition
        for token in set(out):
            logits[token] -= frequency * out.count(token) + presence
        best, second = np.sort(logits)[-2:][::-1]
        assert best - second > 1e-3, "a near tie: float32 rounding would decide it"
        out.append(int(np.argmax(logits)))
    return out


@pytest.mark.parametrize("penalties", [dict(repetition=1.5), dict(repetition=3.0), dict(presence=0.5),
                                       dict(frequency=0.3), dict(repetition=1.2, presence=0.2, frequency=0.1)])
def test_penalties_in_the_loop_match_them_written_out(fixed_sampler, penalties):
    prompt = [1, 9]
    names = dict(repetition="repetition_penalty", presence="presence_penalty", frequency="frequency_penalty")
    out = generate(fixed_sampler, [prompt], 14, temperature=0, max_chunk=4,
                   **{names[k]: v for k, v in penalties.items()})
    want = reference_greedy(FixedModel.row, prompt, 14, **penalties)
    assert out[0].tolist() == want
    assert len(set(want)) > 1  # the penalty did move the choice off the likeliest token


def test_bad_words_are_never_generated_one_token_or_several(stub_sampler):
    # The stub counts up: 3 -> 4, 5, 6, ... Banning 4 alone, or 6 after 5, changes the greedy path.
    plain = generate(stub_sampler, [[3]], 5, temperature=0)[0].tolist()
    single = generate(stub_sampler, [[3]], 5, temperature=0, bad_words=[[4]])[0].tolist()
    multi = generate(stub_sampler, [[3]], 5, temperature=0, bad_words=[[5, 6]])[0].tolist()
    assert plain == [4, 5, 6, 7, 8]
    assert 4 not in single and single[0] != 4
    assert multi[:2] == [4, 5] and multi[2] != 6
    # The word's first tokens may end the prompt.
    assert generate(stub_sampler, [[2, 5]], 1, temperature=0, bad_words=[[5, 6]])[0].tolist() != [6]


def test_a_banned_token_is_never_drawn(stub_sampler):
    out = generate(stub_sampler, [[3]] * 64, 6, seed=4, logit_bias={4: -100, 7: -100})
    assert not np.isin(out, [4, 7]).any()
    free = generate(stub_sampler, [[3]] * 64, 6, seed=4)
    assert np.isin(free, [4, 7]).any()


def test_min_length_holds_end_of_text_back(stub_sampler):
    # From 9 the stub reaches end-of-text (11) at once: with min_length 5 not before 5 new tokens.
    stream = stub_sampler.generate([[9]], 12, temperature=0, stop_at_eot=True, min_length=5, max_chunk=2)
    out = np.concatenate(list(stream), axis=1)[0].tolist()
    assert 11 not in out[:5] and out[0] == 10
    plain = generate(stub_sampler, [[9]], 12, temperature=0, stop_at_eot=True)[0].tolist()
    assert plain == [10, 11]


def test_controls_off_give_the_tokens_of_no_controls(stub_sampler):
    off = dict(repetition_penalty=1, presence_penalty=0, frequency_penalty=0, logit_bias={}, bad_words=[],
               min_length=0)
    for seed, knobs in [(1, {}), (2, dict(top_k=4)), (3, dict(top_p=0.7, temperature=0.8))]:
        a = generate(stub_sampler, [[1], [5, 6]], 9, seed=seed, **knobs)
        b = generate(stub_sampler, [[1], [5, 6]], 9, seed=seed, **knobs, **off)
        assert (a == b).all()


def test_other_control_values_reuse_the_traces(stub_sampler):
    generate(stub_sampler, [[1]], 12, top_k=3, seed=1, repetition_penalty=1.3, bad_words=[[2]])
    before = stub_sampler.traces()
    generate(stub_sampler, [[1, 2, 3]], 10, seed=2, presence_penalty=0.4, logit_bias={3: 2.0, 5: -100},
             bad_words=[[1, 2, 3], [4]], min_length=3)
    generate(stub_sampler, [[1, 2, 3]], 10, seed=2)
    assert stub_sampler.traces() == before


def test_logprobs_are_the_models_own_before_controls_and_filters(fixed_sampler):
    stream = fixed_sampler.generate([[1], [2]], 9, top_k=3, seed=5, repetition_penalty=2.0, logprobs=4, max_chunk=2)
    raw = FixedModel.row - np.log(np.exp(FixedModel.row.astype(np.float64)).sum())
    order = np.argsort(-raw)[:4]
    for chunk in stream:
        own, top, top_ids = stream.logprobs
        assert own.shape == chunk.shape and top.shape == top_ids.shape == chunk.shape + (4,)
        np.testing.assert_allclose(own, raw[chunk], atol=1e-5)
        assert (top_ids == order).all()
        np.testing.assert_allclose(top, np.broadcast_to(raw[order], top.shape), atol=1e-5)


def test_logprobs_zero_reports_the_tokens_own_only_and_none_is_none(stub_sampler):
    stream = stub_sampler.generate([[3]], 4, temperature=0, logprobs=0)
    for chunk in stream:
        assert stream.logprobs[0].shape == chunk.shape and stream.logprobs[1].shape == chunk.shape + (0,)
    stream = stub_sampler.generate([[3]], 4, temperature=0)
    assert [stream.logprobs for _ in stream] == [None] * 4


def test_asking_for_logprobs_reuses_the_traces_and_keeps_the_tokens(stub_sampler):
    plain = generate(stub_sampler, [[1], [4]], 12, top_k=5, seed=3)
    before = stub_sampler.traces()
    assert (generate(stub_sampler, [[1], [4]], 12, top_k=5, seed=3, logprobs=3) == plain).all()
    generate(stub_sampler, [[1]], 12, seed=2, logprobs=0)
    assert stub_sampler.traces() == before


def test_logprobs_must_be_a_whole_number(stub_sampler):
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="logprobs must be a whole number >= 0"):
            stub_sampler.generate([[1]], 3, logprobs=bad)
