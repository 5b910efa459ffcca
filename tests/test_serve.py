"""serve.py and batching.py: the official `openai` client against a server on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import SRC_DIR, TINY_HPARAMS, sigint_as_at_a_terminal


# A window long enough that a stream of a thousand tokens is still going when its client leaves.
N_CTX = 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, seconds=60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    import checkpoint
    from hparams import HParams

    models = tmp_path_factory.mktemp("models")
    checkpoint.write_random_model(str(models / "tiny"), HParams(**dict(TINY_HPARAMS, n_ctx=N_CTX)), seed=3, std=0.2)
    return str(models)


class Served:
    def __init__(self, gpt, batcher, url):
        self.gpt, self.batcher, self.url = gpt, batcher, url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def post(self, data):
        """POSTs raw bytes to /v1/completions: the status and the decoded JSON answer."""
        request = urllib.request.Request(self.url + "/v1/completions", data=data, method="POST")
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


def serving(models_dir, **load_options):
    """The app on uvicorn in a thread of this process, with its batcher at hand, over the tiny
    model loaded with `load_options` (`api.load`'s); a generator, for a fixture to yield from."""
    import uvicorn

    import api
    import batching
    import serve

    gpt = api.load("tiny", models_dir, **load_options)
    batcher = batching.Batcher(gpt.sampler.engine, gpt.eot_token, max_rows=4)
    batcher.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(serve.create_app(batcher, gpt.encoder, "tiny"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started)
    yield Served(gpt, batcher, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join()
    batcher.stop()


@pytest.fixture(scope="module")
def served(models_dir):
    yield from serving(models_dir)


def complete(served, prompt, **options):
    return served.client.completions.create(model="tiny", prompt=prompt, **options)


def test_models_and_health(served):
    assert [m.id for m in served.client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(served.url + "/health") as response:
        assert json.loads(response.read())["status"] == "ok"


def test_a_completion_is_the_apis_text_for_the_same_seed(served):
    answer = complete(served, "The meaning of life is", max_tokens=12, seed=5, temperature=0.9, top_p=0.95)
    expected = served.gpt.generate("The meaning of life is", 12, seed=5, temperature=0.9, top_p=0.95,
                                   stop_at_eot=True)
    assert answer.object == "text_completion" and answer.model == "tiny"
    assert [c.text for c in answer.choices] == [expected]
    assert answer.choices[0].finish_reason == "length"
    prompt_tokens = len(served.gpt.encode("The meaning of life is"))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 12)


def test_logprobs_are_the_apis(served):
    answer = complete(served, "Hello", max_tokens=6, temperature=0, logprobs=2, extra_body={"top_k": 3})
    expected = served.gpt.generate("Hello", 6, temperature=0, logprobs=2, stop_at_eot=True)
    logprobs = answer.choices[0].logprobs
    assert logprobs.tokens == [t["text"] for t in expected["tokens"]]
    assert logprobs.token_logprobs == pytest.approx([t["logprob"] for t in expected["tokens"]], abs=1e-5)
    assert [list(top) for top in logprobs.top_logprobs] == [[text for text, _ in t["top_logprobs"]]
                                                            for t in expected["tokens"]]
    assert answer.choices[0].text == "".join(logprobs.tokens)


def test_a_list_of_prompts_with_n_gives_a_choice_per_prompt_and_sample(served):
    answer = complete(served, ["Once upon a time", "Hi"], max_tokens=5, n=2, seed=11)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.choices[0].text == served.gpt.generate("Once upon a time", 5, seed=11, stop_at_eot=True)
    assert len({c.text for c in answer.choices}) == 4
    ids = served.gpt.encode("Hi")
    assert complete(served, [ids], max_tokens=5, seed=7).choices[0].text == \
        complete(served, "Hi", max_tokens=5, seed=7).choices[0].text


def test_streaming_gives_the_same_text_in_pieces_and_stop_strings_cut_it(served):
    whole = complete(served, "Stream this", max_tokens=20, seed=2).choices[0].text
    chunks = list(complete(served, "Stream this", max_tokens=20, seed=2, stream=True))
    assert len(chunks) > 5
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    stop = whole[len(whole) // 2:len(whole) // 2 + 3]
    cut = list(complete(served, "Stream this", max_tokens=20, seed=2, stream=True, stop=stop))
    assert "".join(c.choices[0].text for c in cut) == whole[:whole.index(stop)]
    assert cut[-1].choices[0].finish_reason == "stop"


def beside_others(served, others, request):
    """`request()` while streamed requests hold rows of the batch, one per (prompt, options) of
    `others`: its answer, and how many rows ran just after it."""
    streams = [complete(served, prompt, stream=True, **options) for prompt, options in others]
    for stream in streams:
        next(iter(stream))  # its row is in the batch now
    answer = request()
    rows_after = served.batcher.load()[0]
    for stream in streams:
        stream.close()
    wait_until(lambda: served.batcher.load() == (0, 0))  # closing them freed their rows
    return answer, rows_after


def test_a_seeded_request_gets_the_same_tokens_alone_or_in_a_batch(served):
    options = dict(max_tokens=30, seed=21, temperature=1.0, top_p=0.9)
    alone = complete(served, "Alone or not", **options).choices[0].text
    others = [(p, dict(max_tokens=N_CTX - 20, seed=i))
              for i, p in enumerate(["A longer prompt than the one we check, by several words", "x", "Hey"])]
    batched, rows_after = beside_others(served, others, lambda: complete(served, "Alone or not", **options))
    assert rows_after >= 3  # the others ran before it joined and after it left
    assert batched.choices[0].text == alone


# OpenAI's controls, and api.generate's under its names (extensions: the client's extra_body).
CONTROLS = dict(presence_penalty=1.2, frequency_penalty=0.6, logit_bias={"13": 3.0, "11": -100}, repetition_penalty=1.3,
                bad_words=["the"], min_length=4)


def test_controls_give_the_apis_text_alone_and_beside_requests_with_other_controls(served):
    options = dict(max_tokens=30, seed=9, temperature=0.9)
    alone = complete(served, "Controls on", **options, extra_body=CONTROLS).choices[0].text
    api_controls = dict(CONTROLS, logit_bias={int(k): v for k, v in CONTROLS["logit_bias"].items()})
    assert alone == served.gpt.generate("Controls on", 30, seed=9, temperature=0.9, stop_at_eot=True, **api_controls)
    assert alone != complete(served, "Controls on", **options).choices[0].text
    others = [(p, dict(max_tokens=N_CTX - 20, seed=i, extra_body=extra))
              for i, (p, extra) in enumerate([("Other knobs here", dict(frequency_penalty=-1.5, bad_words=[[11, 13]])),
                                              ("y", dict(logit_bias={"262": 5})), ("None at all", {})])]
    batched, rows_after = beside_others(served, others,
                                        lambda: complete(served, "Controls on", **options, extra_body=CONTROLS))
    assert rows_after >= 3
    assert batched.choices[0].text == alone


def test_a_logit_bias_of_minus_100_on_the_greedy_token_changes_it(served):
    greedy = complete(served, "Bias me", max_tokens=1, temperature=0, logprobs=0).choices[0]
    token = served.gpt.generate("Bias me", 1, temperature=0, logprobs=0)["tokens"][0]
    assert greedy.text == token["text"]
    banned = complete(served, "Bias me", max_tokens=1, temperature=0, logit_bias={str(token["id"]): -100})
    assert banned.choices[0].text != greedy.text
    assert banned.choices[0].text == served.gpt.generate("Bias me", 1, temperature=0, logit_bias={token["id"]: -100})


def test_text_offsets_say_where_each_token_begins_in_the_choice_streamed_or_not(served):
    options = dict(max_tokens=12, seed=3, logprobs=1)
    whole = complete(served, "Offsets", **options).choices[0]
    offsets = whole.logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] > 0
    assert all(whole.text.startswith(token, offset) for token, offset in zip(whole.logprobs.tokens, offsets))
    streamed = [c.choices[0].logprobs for c in complete(served, "Offsets", **options, stream=True)]
    assert [o for lp in streamed if lp for o in lp.text_offset] == offsets


def test_a_client_that_leaves_mid_stream_frees_its_row(served):
    wait_until(lambda: served.batcher.load() == (0, 0))
    cancelled = served.batcher.stats["ended_cancelled"]
    tokens = served.batcher.stats["tokens"]
    stream = complete(served, "Go on", max_tokens=N_CTX - 2, stream=True, seed=1)
    for _, _ in zip(stream, range(3)):
        pass
    stream.close()
    wait_until(lambda: served.batcher.load() == (0, 0))
    assert served.batcher.stats["ended_cancelled"] == cancelled + 1
    assert served.batcher.stats["tokens"] - tokens < N_CTX // 2


@pytest.mark.parametrize("options, param, words", [
    (dict(model="gpt-4"), "model", "does not exist"),
    (dict(prompt="word " * N_CTX), "prompt", "the window 1024"),
    (dict(max_tokens=0), "max_tokens", "from 1 to 1024"),
    (dict(max_tokens=N_CTX + 1), "max_tokens", "from 1 to 1024"),
    (dict(prompt="word " * 1000, max_tokens=100), "max_tokens", "use max_tokens"),
    (dict(temperature=-1), "temperature", ">= 0"),
    (dict(top_p=0), "top_p", "(0, 1]"),
    (dict(n=0), "n", "from 1 to 128"),
    (dict(logprobs=6), "logprobs", "from 0 to 5"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (dict(seed="one"), "seed", "whole number"),
    (dict(prompt=[[50257]]), "prompt", "ids from 0 to 50256"),
    (dict(prompt=[]), "prompt", "a list of strings"),
    (dict(stream="yes"), "stream", "true or false"),
    (dict(echo=True), "echo", "not supported"),
    (dict(presence_penalty=2.5), "presence_penalty", "from -2 to 2"),
    (dict(frequency_penalty="1"), "frequency_penalty", "must be a number"),
    (dict(logit_bias={"50257": 1}), "logit_bias", "token ids from 0 to 50256"),
    (dict(logit_bias={"hello": 1}), "logit_bias", "keys must be token ids"),
    (dict(logit_bias={"5": 101}), "logit_bias", "from -100 (bans) to 100"),
    (dict(logit_bias={"5": "up"}), "logit_bias", "values must be numbers"),
    (dict(logit_bias=[5]), "logit_bias", "must map token ids"),
    (dict(repetition_penalty=0), "repetition_penalty", "> 0"),
    (dict(min_length=-1), "min_length", "whole number >= 0"),
    (dict(min_length=1.5), "min_length", "whole number >= 0"),
    (dict(bad_words=[""]), "bad_words", "at least one token"),
    (dict(bad_words=[[50300]]), "bad_words", "token ids from 0 to 50256"),
    (dict(colour="red"), "colour", "Unrecognized request argument"),
])
def test_bad_requests_get_openai_style_400s_and_the_server_keeps_serving(served, options, param, words):
    body = dict(dict(model="tiny", prompt="Hi", max_tokens=3), **options)
    status, answer = served.post(json.dumps(body).encode())
    assert status == 400
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert words in answer["error"]["message"]
    assert complete(served, "Still here", max_tokens=2).choices[0].finish_reason == "length"


def test_the_openai_client_raises_its_bad_request_error(served):
    with pytest.raises(openai.BadRequestError) as raised:
        complete(served, "Hi", max_tokens=0)
    assert raised.value.status_code == 400 and raised.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as raised:
        served.client.completions.create(model="tiny-but-not-this", prompt="Hi")
    assert raised.value.body["code"] == "model_not_found"


def test_malformed_json_and_unknown_paths_get_json_errors(served):
    status, answer = served.post(b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    assert served.post(b"[1, 2]")[0] == 400
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(served.url + "/v1/chat")
    assert raised.value.code == 404 and "error" in json.loads(raised.value.read())


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_taking_requests_finishes_those_in_flight_and_exits_0(models_dir, stop_signal):
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(SRC_DIR, "serve.py"), "--model_name", "tiny",
                               "--models_dir", models_dir, "--port", str(port), "--max_batch", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              preexec_fn=sigint_as_at_a_terminal)
    try:
        started = server.stdout.readline()
        assert "up to 2 rows a step" in started and "at most 1.0 MiB (2 rows x 1024 positions)" in started
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        wait_until(lambda: _answers(client))
        stream = client.completions.create(model="tiny", prompt="Finish me", max_tokens=300, stream=True, seed=4,
                                           logprobs=0)
        chunks = [next(iter(stream))]
        server.send_signal(stop_signal)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert sum(len(c.choices[0].logprobs.tokens) for c in chunks if c.choices[0].logprobs) == 300
        with pytest.raises(openai.APIConnectionError):
            client.completions.create(model="tiny", prompt="Too late", max_tokens=2)
        out, err = server.communicate(timeout=60)
    finally:
        server.kill()
    assert server.returncode == 0, err
    assert "stopped: every request in flight was answered" in out


def _answers(client):
    try:
        return bool(client.models.list().data)
    except openai.APIConnectionError:
        return False
