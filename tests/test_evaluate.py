"""evaluate.py against numpy arithmetic on the tiny model's logits, on small files in the real formats."""
import json
import math

import numpy as np
import pytest

import api
import evaluate
import score
from cli import UserError
from conftest import run_script

PASSAGES = ["the cat sat on the mat and looked at the door", "she opened the box and found a small key",
            "rain fell over the town all night long"]
CBT = """1 The boy walked to the river .
2 He saw a fish in the water .
21 The boy saw a XXXXX in the water .\tfish\t\tdog|fish|tree
1 Mary had a red ball .
2 She gave the ball to Tom .
21 Tom took the XXXXX from Mary .\tball\t\tball|cake|hat
"""


@pytest.fixture(scope="module")
def gpt(tiny_models_dir):
    return api.load("tiny", tiny_models_dir)


def numpy_logprobs(gpt, tokens):
    """log p(token_i | <|endoftext|>, tokens before i), from one full pass and a numpy log-softmax."""
    logits = gpt.lm([[gpt.eot_token] + tokens])["logits"].numpy()[0].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return logp[np.arange(len(tokens)), tokens], logp[:len(tokens)].argmax(-1) == np.array(tokens)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_hits_mark_the_greedy_choice(gpt):
    context = gpt.encode("the cat sat on the")
    greedy = int(gpt.lm([[gpt.eot_token] + context])["logits"].numpy()[0, -1].argmax())
    other = (greedy + 1) % gpt.hparams.n_vocab
    _, hits = score.score_tokens(gpt.lm, [context + [greedy], context + [other]], gpt.eot_token, with_hits=True)
    assert hits[0][-1] is True and hits[1][-1] is False


def test_lambada_matches_numpy(gpt):
    result = evaluate.evaluate_lambada(gpt, PASSAGES, batch_size=2)
    nll, correct = [], []
    for passage in PASSAGES:
        context, word = passage.rsplit(" ", 1)
        target = gpt.encode(" " + word)
        logp, hit = numpy_logprobs(gpt, gpt.encode(context) + target)
        nll.append(-logp[-len(target):].sum())
        correct.append(hit[-len(target):].all())
    assert result["examples"] == 3
    assert result["perplexity"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)
    assert result["accuracy"] == pytest.approx(100 * np.mean(correct))


def test_both_lambada_formats_give_the_same_result(gpt, tmp_path):
    jsonl = write(tmp_path, "lambada_test.jsonl", "".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    plain = write(tmp_path, "lambada_plain.txt", "\n".join(PASSAGES) + "\n")
    assert evaluate.run_task(gpt, "lambada", jsonl) == evaluate.run_task(gpt, "lambada", plain)
    assert evaluate.run_task(gpt, "lambada", jsonl, limit=2)["examples"] == 2


def test_perplexity_and_bits_match_numpy(gpt, tmp_path):
    text = "The tower is 324 metres tall , about the same height as an 81 @-@ storey building ."
    tokens = gpt.encode(text)
    nll = -numpy_logprobs(gpt, tokens)[0].sum()
    path = write(tmp_path, "wiki.test.tokens", text)
    result = evaluate.run_task(gpt, "wikitext2", path)
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / len(tokens)), rel=1e-4)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / len(text.split())), rel=1e-4)
    assert evaluate.run_task(gpt, "enwik8", path)["bits_per_byte"] == pytest.approx(
        nll / math.log(2) / len(text.encode("utf-8")), rel=1e-4)
    assert evaluate.run_task(gpt, "text8", path)["bits_per_character"] == pytest.approx(
        nll / math.log(2) / len(text), rel=1e-4)


def test_cbt_picks_the_candidate_numpy_finds_likeliest(gpt, tmp_path):
    examples = evaluate.read_cbt(CBT, "cbt")
    assert [e[2] for e in examples] == ["fish", "ball"] and examples[0][3] == ["dog", "fish", "tree"]
    correct = 0
    for context, question, answer, candidates in examples:
        totals = []
        for c in candidates:
            line = gpt.encode(" " + question.replace("XXXXX", c))
            totals.append(numpy_logprobs(gpt, gpt.encode(context) + line)[0][-len(line):].sum())
        correct += candidates[int(np.argmax(totals))] == answer
    result = evaluate.run_task(gpt, "cbt-cn", write(tmp_path, "cbtest_CN_test_2500ex.txt", CBT))
    assert result == {"examples": 2, "accuracy": 50.0 * correct}


def test_script_prints_a_table_with_the_paper_column(tiny_models_dir, tmp_path):
    path = write(tmp_path, "lambada_test.jsonl", "".join(json.dumps({"text": p}) + "\n" for p in PASSAGES))
    result = run_script("evaluate.py", "lambada", "--data", path, "--model_name", "tiny", "--models_dir",
                        tiny_models_dir)
    assert result.returncode == 0, result.stderr
    assert "paper (tiny)" in result.stdout and "accuracy" in result.stdout and "—" in result.stdout
    as_json = run_script("evaluate.py", "lambada", "--data", path, "--model_name", "tiny", "--models_dir",
                         tiny_models_dir, "--json")
    report = json.loads(as_json.stdout)
    assert report["examples"] == 3 and report["paper"] == {"accuracy": None, "perplexity": None}


def test_the_paper_figures_sit_beside_ours_for_released_sizes():
    rows = dict((m, (ours, paper)) for m, ours, paper in evaluate.table("lambada", "117M", {"accuracy": 40.0}))
    assert rows["accuracy"] == ("40.00", "45.99")


@pytest.mark.parametrize("task,content,message", [
    ("lambada", None, "lambada_test.jsonl"),
    ("lambada", '{"text": "a passage here"}\nnot json\n', "line 2: expected a JSON object"),
    ("cbt-ne", "1 Some context .\n21 No blank here\tanswer\n", "line 2: expected '21 <question with XXXXX>"),
    ("cbt-cn", "1 Only context .\n", "holds no Children's Book Test question"),
    ("ptb", "", "holds no text"),
])
def test_bad_data_is_a_one_line_error(gpt, tmp_path, task, content, message):
    path = str(tmp_path / "missing.txt") if content is None else write(tmp_path, "data.txt", content)
    with pytest.raises(UserError) as excinfo:
        evaluate.run_task(gpt, task, path)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


@pytest.mark.parametrize("args,message", [
    (["squad", "--data", "x"], "unknown task 'squad': choose one of lambada"),
    (["enwik8"], "--data is required for enwik8: get the last 5,000,000 bytes of enwik8"),
    (["ptb", "--data", "nowhere.txt"], "not found: get https://raw.githubusercontent.com/wojzaremba"),
])
def test_script_errors(tiny_models_dir, args, message):
    result = run_script("evaluate.py", *args, "--model_name", "tiny", "--models_dir", tiny_models_dir)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_stride_beyond_the_window_is_an_error(tiny_models_dir, tmp_path):
    path = write(tmp_path, "ptb.test.txt", "some words here")
    result = run_script("evaluate.py", "ptb", "--data", path, "--stride", "64", "--model_name", "tiny",
                        "--models_dir", tiny_models_dir)
    assert result.returncode == 2 and "--stride must be a whole number from 1 to 63" in result.stderr
