"""export.py: the SavedModel is run by plain TensorFlow in processes that never import this project."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import SRC_DIR

PROMPTS = ["The meaning of life is", "Hello"]
NEW_TOKENS = 7
PROJECT_MODULES = sorted(name[:-3] for name in os.listdir(SRC_DIR) if name.endswith(".py"))

# Runs in a fresh interpreter with no path to src/: loads the export, calls its signatures and
# reports the outputs, the errors and whether any of the project's modules got imported.
RUNNER = """
import json, sys
import tensorflow as tf

path, calls, project = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
loaded = tf.saved_model.load(path)
results = []
for signature, inputs in calls:
    dtypes = {k: tf.float32 if isinstance(v, float) else tf.int32 for k, v in inputs.items()}
    try:
        out = loaded.signatures[signature](**{k: tf.constant(v, dtypes[k]) for k, v in inputs.items()})
        results.append({k: v.numpy().tolist() for k, v in out.items()})
    except tf.errors.InvalidArgumentError as e:
        results.append({"error": e.message})
print(json.dumps({"results": results, "project_imported": [m for m in project if m in sys.modules],
                  "signatures": sorted(loaded.signatures)}))
"""


def right_padded(token_lists):
    width = max(map(len, token_lists))
    return [t + [0] * (width - len(t)) for t in token_lists], [len(t) for t in token_lists]


def knobs(tokens, lengths, temperature=0.0, top_k=0, top_p=1.0, seed=0, max_new_tokens=NEW_TOKENS):
    return dict(tokens=tokens, lengths=lengths, max_new_tokens=max_new_tokens, temperature=float(temperature),
                top_p=float(top_p), top_k=top_k, seed=seed)


def plain_env(tmp_path):
    """An environment in which `python` cannot find the project's modules."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return dict(env, TF_CPP_MIN_LOG_LEVEL="2", HOME=str(tmp_path))


@pytest.fixture(scope="module")
def gpt(tiny_gpt):
    return tiny_gpt


@pytest.fixture(scope="module")
def exported(tiny_models_dir, tmp_path_factory):
    import export

    out = tmp_path_factory.mktemp("serving")
    return export.export_saved_model("tiny", tiny_models_dir, str(out), "float32")


@pytest.fixture(scope="module")
def token_lists(gpt):
    return [gpt.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def runs(exported, token_lists, tmp_path_factory):
    """The export's answers, from tf.saved_model.load in a process that never saw the project."""
    tokens, lengths = right_padded(token_lists)
    one, one_length = right_padded(token_lists[:1])
    calls = [
        ("serving_default", knobs(tokens, lengths)),
        ("serving_default", knobs(one, one_length, temperature=1.0, top_k=5, seed=7)),
        ("serving_default", knobs(one, one_length, temperature=0.8, top_p=0.9, seed=3)),
        ("generate_with_controls", dict(knobs(tokens, lengths), repetition_penalty=1.5, presence_penalty=0.5,
                                        frequency_penalty=0.25, min_length=0)),
        ("serving_default", knobs(tokens, lengths, max_new_tokens=64)),
        ("serving_default", knobs(tokens, lengths, top_p=0.0)),
    ]
    tmp = tmp_path_factory.mktemp("runner")
    result = subprocess.run([sys.executable, "-I", "-c", RUNNER, exported, json.dumps(calls),
                             json.dumps(PROJECT_MODULES)], capture_output=True, text=True, cwd=tmp,
                            env=plain_env(tmp), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def expected(gpt, token_lists, **options):
    """The API's tokens and log-probabilities (what the sampling scripts print), one list per row."""
    rows = gpt.generate(token_lists, NEW_TOKENS, logprobs=0, **options)
    return [[t["id"] for t in r["tokens"]] for r in rows], [[t["logprob"] for t in r["tokens"]] for r in rows]


def test_the_export_is_in_tf_servings_layout(exported):
    assert os.path.basename(exported) == "1"
    assert {"saved_model.pb", "variables"} <= set(os.listdir(exported))
    assert os.listdir(os.path.dirname(exported)) == ["1"]  # nothing half-written beside it


def test_no_module_of_the_project_is_imported_by_the_loading_process(runs):
    assert runs["project_imported"] == []
    assert runs["signatures"] == ["generate_with_controls", "serving_default"]


def test_greedy_tokens_and_logprobs_equal_the_apis_for_right_padded_rows(runs, gpt, token_lists):
    ids, logprobs = expected(gpt, token_lists, temperature=0)
    assert runs["results"][0]["output_ids"] == ids
    np.testing.assert_allclose(runs["results"][0]["logprobs"], logprobs, rtol=1e-5, atol=1e-5)


def test_a_seed_gives_the_apis_sampled_tokens(runs, gpt, token_lists):
    assert runs["results"][1]["output_ids"] == expected(gpt, token_lists[:1], temperature=1, top_k=5, seed=7)[0]
    assert runs["results"][2]["output_ids"] == expected(gpt, token_lists[:1], temperature=0.8, top_p=0.9,
                                                        seed=3)[0]


def test_the_controls_signature_gives_the_apis_tokens_with_the_same_controls(runs, gpt, token_lists):
    ids, _ = expected(gpt, token_lists, temperature=0, repetition_penalty=1.5, presence_penalty=0.5,
                      frequency_penalty=0.25)
    assert runs["results"][3]["output_ids"] == ids
    assert ids != runs["results"][0]["output_ids"]  # the controls changed something


def test_bad_inputs_fail_the_call_with_a_message(runs):
    assert "fit the window of 64" in runs["results"][4]["error"]
    assert "top_p must be in (0, 1]" in runs["results"][5]["error"]


def test_saved_model_cli_runs_the_default_signature(exported, runs, token_lists, tmp_path):
    tokens, lengths = right_padded(token_lists)
    inputs = []
    for name, value in knobs(tokens, lengths).items():
        np.save(tmp_path / f"{name}.npy", np.array(value, np.float32 if isinstance(value, float) else np.int32))
        inputs.append(f"{name}={tmp_path / name}.npy")
    result = subprocess.run(["saved_model_cli", "run", "--dir", exported, "--tag_set", "serve", "--signature_def",
                             "serving_default", "--inputs", ";".join(inputs), "--outdir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path, env=plain_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.load(tmp_path / "out" / "output_ids.npy").tolist() == runs["results"][0]["output_ids"]


def test_versions_count_up_from_the_highest_there(tmp_path):
    import export

    assert export.next_version(str(tmp_path / "missing")) == 1
    for name in ("1", "7", "notes", ".8.partial"):
        os.makedirs(tmp_path / name)
    assert export.next_version(str(tmp_path)) == 8


def test_an_unknown_format_or_no_out_is_a_one_line_error(tiny_models_dir, tmp_path):
    from conftest import run_script

    result = run_script("export.py", "--format", "onnx", "--out", tmp_path, "--models_dir", tiny_models_dir)
    assert result.returncode == 2 and result.stderr.strip() == \
        "error: --format must be one of saved_model, tflite, got 'onnx'"
    result = run_script("export.py", "--model_name", "tiny", "--models_dir", tiny_models_dir)
    assert result.returncode == 2 and "give --out" in result.stderr
