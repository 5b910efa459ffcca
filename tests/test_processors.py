"""The generation controls' logits processors and their checked values, without a model."""
import numpy as np
import pytest
import tensorflow as tf

import processors
from errors import UserError
from processors import MASKED, Controls


def test_bias_adds_to_every_row_and_minus_100_bans():
    logits = tf.constant([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
    out = processors.bias_logits(logits, tf.constant([0.5, -100.0, 0.0])).numpy()
    np.testing.assert_array_equal(out, [[1.5, MASKED, 3.0], [0.5, MASKED, 5.0]])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = tf.constant([[2.0, -2.0, 4.0, -4.0, 0.0]])
    seen = tf.constant([[True, True, False, False, True]])
    out = processors.repetition_penalty_logits(logits, seen, 2.0).numpy()
    np.testing.assert_array_equal(out, [[1.0, -4.0, 4.0, -4.0, 0.0]])


def test_presence_and_frequency_penalties_follow_the_openai_formula():
    logits = tf.constant([[1.0, 1.0, 1.0]])
    counts = tf.constant([[0, 1, 3]])
    out = processors.presence_frequency_logits(logits, counts, 0.5, 0.25).numpy()
    np.testing.assert_allclose(out, [[1.0, 1.0 - 0.25 - 0.5, 1.0 - 0.75 - 0.5]])


def test_bad_words_ban_a_last_token_only_after_the_rest_of_the_word():
    controls = Controls.check(bad_words=[[7], [1, 2, 3], [2, 4]], n_vocab=8).tensors(8)
    history = tf.constant([[1, 2], [5, 2], [processors.NONE, 2], [2, 0]])  # each row's last two tokens
    out = processors.bad_words_logits(tf.zeros([4, 8]), history, controls.bad_prefixes, controls.bad_last).numpy()
    banned = [set(np.flatnonzero(row == MASKED).tolist()) for row in out]
    # Every row: 7 (a one-token word); rows ending in 1, 2: 3; rows ending in 2: 4.
    assert banned == [{7, 3, 4}, {7, 4}, {7, 4}, {7}]


def test_min_length_bans_end_of_text_until_enough_new_tokens():
    logits = tf.zeros([2, 5])
    for new_tokens in range(5):
        out = processors.min_length_logits(logits, new_tokens, 3, 4).numpy()
        assert (out[:, 4] == MASKED).all() == (new_tokens < 3)
        assert (out[:, :4] == 0).all()


def test_the_tally_holds_the_prompt_and_its_last_tokens():
    controls = Controls.check(bad_words=[[1, 2, 3]], n_vocab=10)
    tally = controls.tally([[4, 5, 6, 7], [8]], 10)
    assert tally.history.numpy().tolist() == [[6, 7], [processors.NONE, 8]]
    assert [set(np.flatnonzero(row).tolist()) for row in tally.in_prompt.numpy()] == [{4, 5, 6, 7}, {8}]
    tally = processors.record(tally, tf.constant([2, 2]))
    assert tally.history.numpy().tolist() == [[7, 2], [8, 2]]
    assert tally.counts.numpy()[:, 2].tolist() == [1, 1] and tally.counts.numpy().sum() == 2


def test_the_order_is_bias_then_repetition_then_presence_then_bans():
    # Bias first: a biased token that was seen is penalised on its biased logit, (1 + 3) / 2.
    controls = Controls.check(logit_bias={0: 3}, repetition_penalty=2, presence_penalty=1, frequency_penalty=0.5,
                              bad_words=[[2]], min_length=5, n_vocab=4)
    tally = processors.record(controls.tally([[0]], 4), tf.constant([0]))
    out = processors.process(tf.constant([[1.0, 1.0, 1.0, 1.0]]), controls.tensors(4), tally, 1, 3).numpy()[0]
    np.testing.assert_allclose(out[:2], [(1 + 3) / 2 - 1 - 0.5, 1.0])
    assert out[2] == MASKED and out[3] == MASKED


def test_all_off_is_off_and_any_control_is_on():
    assert not Controls().on and not Controls.check(logit_bias={}, bad_words=[], n_vocab=5).on
    for change in [dict(repetition_penalty=1.1), dict(presence_penalty=-1), dict(frequency_penalty=0.1),
                   dict(logit_bias={1: 0}), dict(bad_words=[[1]]), dict(min_length=1)]:
        assert Controls.check(**change, n_vocab=5).on, change


def test_off_controls_build_nothing_per_row():
    tally = Controls().tally([[1, 2]], 50257)
    assert tally.counts.shape == (1, 0) and tally.in_prompt.shape == (1, 0)
    assert Controls().tensors(50257).logit_bias.shape == (0,)


@pytest.mark.parametrize("values,message", [
    (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
    (dict(repetition_penalty=-1.5), "repetition_penalty must be a number > 0"),
    (dict(repetition_penalty="a lot"), "repetition_penalty must be a number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a number > 0"),
    (dict(presence_penalty=2.5), "presence_penalty must be a number from -2 to 2"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be a number from -2 to 2"),
    (dict(min_length=-1), "min_length must be a whole number >= 0"),
    (dict(min_length=1.5), "min_length must be a whole number >= 0"),
    (dict(logit_bias={1: "x"}), "logit_bias must be a number from -100 \\(bans\\) to 100, got 'x'"),
    (dict(logit_bias={1: 101}), "logit_bias must be a number from -100"),
    (dict(logit_bias={10: 1}), "logit_bias must hold token ids from 0 to 9, got 10"),
    (dict(logit_bias={-1: 1}), "logit_bias must hold token ids from 0 to 9, got -1"),
    (dict(logit_bias=[1, 2]), "logit_bias must map token ids to numbers"),
    (dict(bad_words=[[]]), "bad_words must be strings or token-id lists of one token or more, got \\[\\]"),
    (dict(bad_words=[[3, 12]]), "bad_words must hold token ids from 0 to 9, got 12"),
    (dict(bad_words=[1.5]), "bad_words must be strings or token-id lists"),
])
def test_bad_values_are_one_line_user_errors(values, message):
    with pytest.raises(UserError, match=message) as error:
        Controls.check(**values, n_vocab=10)
    assert "\n" not in str(error.value)


def test_before_the_encoder_text_is_taken_and_numbers_are_checked():
    Controls.check(logit_bias={" the": 2, 5: -100}, bad_words=["foo", "bar baz"])
    with pytest.raises(UserError, match="bad_words must be strings or token-id lists of one token or more, got ''"):
        Controls.check(bad_words=["fine", ""])
    with pytest.raises(UserError, match="logit_bias must be a number"):
        Controls.check(logit_bias={" the": "high"})


def test_rows_with_their_own_controls_get_each_its_own_processing():
    first = Controls.check(logit_bias={1: 2.0}, presence_penalty=1.0, bad_words=[[3, 2]], min_length=2, n_vocab=5)
    second = Controls.check(repetition_penalty=2.0, bad_words=[[0]], n_vocab=5)
    controls, word_rows = processors.row_tensors([first, Controls(), second], 5)
    assert word_rows.numpy().tolist() == [0, 2] and controls.logit_bias.shape == (3, 5)
    width, depth = processors.rows_shape([first, Controls(), second], 5)
    tallies = [c.tally([[3]], 5).fit(width, depth) for c in (first, Controls(), second)]
    tally = processors.record(processors.Tally(*(tf.concat(t, axis=0) for t in zip(*tallies))), tf.constant([4, 4, 4]))
    out = processors.process(tf.fill([3, 5], 2.0), controls, tally, tf.constant([[1], [1], [1]]), 4,
                             word_rows).numpy()
    alone = [processors.process(tf.fill([1, 5], 2.0), c.tensors(5), processors.record(c.tally([[3]], 5),
                                                                                     tf.constant([4])), 1, 4).numpy()[0]
             for c in (first, second)]
    np.testing.assert_array_equal(out[0], alone[0])
    np.testing.assert_array_equal(out[1], np.full([5], 2.0))  # controls off: untouched
    np.testing.assert_array_equal(out[2], alone[1])
    assert out[0, 4] == MASKED and out[2, 4] != MASKED  # min_length is the first row's alone


def test_a_tally_fits_a_batch_by_adding_columns_or_cutting_its_oldest_history():
    tally = Controls.check(bad_words=[[1, 2, 3]], n_vocab=6).tally([[4, 5]], 6)
    wider = tally.fit(6, 4)
    assert wider.history.numpy().tolist() == [[processors.NONE, processors.NONE, 4, 5]]
    assert wider.fit(6, 1).history.numpy().tolist() == [[5]]
    assert Controls().tally([[4]], 6).fit(6, 0).counts.shape == (1, 6)
    assert tally.fit(0, 2).in_prompt.shape == (1, 0)
