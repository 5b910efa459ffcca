"""batching.py: rows with their own knobs and generation controls join and leave a running batch
and get the tokens `api.generate` gives each alone."""
import threading

import pytest

from conftest import TINY_HPARAMS


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    import api
    import checkpoint
    from hparams import HParams

    models = tmp_path_factory.mktemp("models")
    checkpoint.write_random_model(str(models / "tiny"), HParams(**dict(TINY_HPARAMS, n_ctx=128)), seed=3, std=0.2)
    return api.load("tiny", str(models))


@pytest.fixture(scope="module")
def batcher(gpt):
    import batching

    batcher = batching.Batcher(gpt.sampler.engine, gpt.eot_token, max_rows=4)
    batcher.start()
    yield batcher
    batcher.stop()


# Each row's prompt, new tokens, knobs and controls (as api.generate takes them); rows 2 and 3 join
# while the others run, and row 1 ends first, so the tallies move with their rows.
ROWS = [
    ("The meaning of life is", 24, dict(temperature=0.8, seed=5),
     dict(presence_penalty=1.5, frequency_penalty=0.7, logit_bias={13: 4.0, 11: -100}, bad_words=[[262, 3290]])),
    ("Hi", 5, dict(temperature=0, seed=1), dict()),
    ("Once upon a time there was", 18, dict(temperature=1.0, top_k=20, seed=8),
     dict(repetition_penalty=1.6, min_length=10, logit_bias={50256: 100}, bad_words=[[11, 290, 262], [198]])),
    ("x", 12, dict(temperature=0.7, top_p=0.9, seed=2), dict(frequency_penalty=-1.0, logit_bias={50256: -100})),
]


def generate_alone(gpt, prompt, length, knobs, controls):
    """api.generate's tokens for one row, end-of-text ending it as in the batcher."""
    out = gpt.generate(prompt, length, logprobs=0, stop_at_eot=True, **knobs, **controls)
    return [t["id"] for t in out["tokens"]]


def run_rows(gpt, batcher, rows, join_after=3):
    """Runs `rows` in the batcher: the first two at once, each next one joining when the first
    has made `join_after` more tokens. Returns every row's tokens (end-of-text cut)."""
    import batching
    import processors

    tokens = [[] for _ in rows]
    ended = [threading.Event() for _ in rows]
    built = []
    for i, (prompt, length, knobs, controls) in enumerate(rows):
        checked = processors.Controls.check(**controls, n_vocab=gpt.hparams.n_vocab)

        def on_token(row, token, report, i=i):
            if token != gpt.eot_token:
                tokens[i].append(token)
            if i == 0 and len(tokens[0]) % join_after == 0 and len(tokens[0]) // join_after + 1 < len(built):
                batcher.submit([built[len(tokens[0]) // join_after + 1]])
            return False

        built.append(batching.Row(gpt.encode(prompt), length, controls=checked, on_token=on_token,
                                  on_end=lambda row, reason, i=i: ended[i].set(), **knobs))
    batcher.submit(built[:2])
    for event in ended:
        assert event.wait(120)
    return tokens


def test_rows_with_their_own_controls_get_the_apis_tokens_while_others_join_and_leave(gpt, batcher):
    alone = [generate_alone(gpt, *row) for row in ROWS]
    largest = batcher.stats["largest_batch"]
    assert run_rows(gpt, batcher, ROWS) == alone
    assert batcher.stats["largest_batch"] >= 3 or largest >= 3
    # The controls changed what the rows would draw without them.
    plain = [generate_alone(gpt, prompt, length, knobs, {}) for prompt, length, knobs, _ in ROWS]
    assert plain[0] != alone[0] and plain[2] != alone[2] and plain[3] != alone[3]
    assert 11 not in alone[0] and 198 not in alone[2] and 50256 not in alone[3]
    assert len(alone[2]) == 10  # end-of-text, biased up, came as soon as min_length let it


def test_the_same_rows_in_another_order_get_the_same_tokens(gpt, batcher):
    alone = [generate_alone(gpt, *row) for row in ROWS]
    order = [2, 3, 0, 1]
    batched = run_rows(gpt, batcher, [ROWS[i] for i in order], join_after=2)
    assert batched == [alone[i] for i in order]

