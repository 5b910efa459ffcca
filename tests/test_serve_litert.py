"""The server on the LiteRT engine: the batcher drives it from the host, moving and joining rows
in its cache, and answers as the API does on the same engine."""
import pytest

from test_serve import beside_others, complete, models_dir, serving  # noqa: F401  (models_dir: the same tiny model)

pytest.importorskip("ai_edge_litert")


@pytest.fixture(scope="module")
def served(models_dir):
    yield from serving(models_dir, engine="litert", progress=False)


def test_the_server_runs_on_litert_and_gives_the_apis_text(served):
    assert served.gpt.engine is served.batcher.engine  # the LiteRT engine, not TensorFlow's
    for options in (dict(temperature=0), dict(seed=5, temperature=0.9, top_p=0.95)):
        answer = complete(served, "The meaning of life is", max_tokens=12, **options)
        assert answer.choices[0].text == served.gpt.generate("The meaning of life is", 12, stop_at_eot=True,
                                                             **options)


def test_rows_joining_and_leaving_a_litert_batch_keep_their_tokens(served):
    options = dict(max_tokens=30, seed=21, temperature=1.0, top_p=0.9)
    alone = complete(served, "Alone or not", **options).choices[0].text
    others = [(p, dict(max_tokens=200, seed=i))
              for i, p in enumerate(["A longer prompt than the one we check, by several words", "x", "Hey"])]
    batched, rows_after = beside_others(served, others, lambda: complete(served, "Alone or not", **options))
    assert rows_after >= 3
    assert batched.choices[0].text == alone
    # A row that joined a running batch was prefilled apart and its cache moved in beside theirs.
    assert served.batcher.stats["prefilled_rows"] >= 5


def test_rows_with_their_own_controls_get_the_apis_text_on_litert(served):
    from test_serve import CONTROLS

    options = dict(max_tokens=20, seed=9, temperature=0.9)
    api_controls = dict(CONTROLS, logit_bias={int(k): v for k, v in CONTROLS["logit_bias"].items()})
    expected = served.gpt.generate("Controls on", 20, seed=9, temperature=0.9, stop_at_eot=True, **api_controls)
    others = [("y", dict(max_tokens=200, seed=1, extra_body=dict(frequency_penalty=-1.5)))]
    batched, _ = beside_others(served, others, lambda: complete(served, "Controls on", **options,
                                                                 extra_body=CONTROLS))
    assert batched.choices[0].text == expected
    assert complete(served, "Controls on", **options, extra_body=CONTROLS).choices[0].text == expected
