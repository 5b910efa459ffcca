"""benchmark.py runs end to end and reports every figure; its numbers are not judged here."""
import json

from conftest import run_main


def test_json_report_on_a_model_directory(tiny_models_dir):
    result = run_main("benchmark.py", "--model_name", "tiny", "--models_dir", tiny_models_dir, "--batch_size", 2,
                      "--prompt_length", 4, "--length", 6, "--hf", "False", "--json", "--train_length", 16,
                      "--train_steps", 1)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ["decode_tok_s_batch1", "decode_tok_s_batch2", "first_token_ms_batch1", "prefill_tok_s_512",
                "streaming_cost_percent", "peak_rss_mib", "load_seconds", "first_call_seconds"]:
        assert key in report, key
    assert report["decode_tok_s_batch1"] > 0 and report["peak_rss_mib"] > 100
    assert report["retraces"] == 0  # new prompt lengths and batch sizes reuse one trace
    assert sum(k.startswith("decode_tok_s_at_position_") for k in report) == 2
    assert report["train_tok_s"] > 0 and report["train_length"] == 16
    assert report["train_peak_rss_mib"] >= report["peak_rss_mib"]
    # The script runs as a user starts it; its length is capped by the tiny model's 64-token window.
    for key in ["script_seconds_length8", "script_seconds_length64"]:
        assert report[key] > 0.5, key
    assert report["script_seconds_length8"] <= report["script_seconds_length8_median"]  # the fastest of the runs
    for key in ["script_peak_rss_mib_length8", "script_peak_rss_mib_length64"]:
        assert 100 < report[key] < report["peak_rss_mib"] + 1000, key


def test_training_alone(tiny_models_dir):
    result = run_main("benchmark.py", "--model_name", "tiny", "--models_dir", tiny_models_dir, "--generate", "False",
                      "--train_batch", 2, "--train_length", 8, "--train_steps", 1, "--hf", "False", "--json",
                      "--train_precision", "mixed_bfloat16")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["train_batch"] == 2 and report["train_tok_s"] > 0 and "decode_tok_s_batch1" not in report
    assert report["train_precision"] == "mixed_bfloat16"
    assert not any(key.startswith("script_") for key in report)


def test_unknown_training_precision_is_a_one_line_error_before_any_measuring(tiny_models_dir):
    result = run_main("benchmark.py", "--model_name", "tiny", "--models_dir", tiny_models_dir,
                      "--train_precision", "float8", "--hf", "False")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--train_precision must be one of" in result.stderr and "decode" not in result.stdout


def test_unknown_random_size_is_a_one_line_error():
    result = run_main("benchmark.py", "--random", "7B")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--random takes one of 124M, 355M, 774M, 1558M" in result.stderr
