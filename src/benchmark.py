#!/usr/bin/env python3
"""Measures generation speed and memory on a model directory or on random weights of a named size."""
import json as json_lib
import os
import platform
import resource
import shutil
import tempfile
import time

import cli


def _timed_generate(sampler, contexts, length, max_chunk=32, top_k=40, seed=1):
    """Generates and returns (seconds to the first token, total seconds)."""
    start = time.perf_counter()
    first = None
    for _ in sampler.generate(contexts, length, top_k=top_k, seed=seed, max_chunk=max_chunk):
        if first is None:
            first = time.perf_counter() - start
    return first, time.perf_counter() - start


def decode_rate(sampler, batch, prompt_length, new_tokens, repeats=2, **kw):
    """Best of `repeats`: decode tokens/s (after the first token) and the first-token latency."""
    contexts = [[(17 * i + 3) % 50000 for i in range(prompt_length)]] * batch
    best = None
    for _ in range(repeats):
        first, total = _timed_generate(sampler, contexts, new_tokens, **kw)
        rate = batch * (new_tokens - 1) / (total - first)
        if best is None or rate > best[0]:
            best = (rate, first)
    return best


def prefill_rate(sampler, prompt_length, repeats=2):
    import tensorflow as tf

    tokens = tf.constant([[(31 * i + 7) % 50000 for i in range(prompt_length)]], tf.int32)
    pad = tf.zeros([1], tf.int32)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call of a new shape is a warm-up
        start = time.perf_counter()
        logits, _ = sampler._prefill(tokens, pad, tf.constant(prompt_length + 1))
        logits.numpy()
        best = min(best, time.perf_counter() - start)
    return prompt_length / best


def hf_rates(lm, batch_sizes, prompt_length, new_tokens):
    """Hugging Face transformers (PyTorch, CPU) on the same weights: decode tokens/s by batch size."""
    import torch

    import hf_compat

    hf = hf_compat.to_hf(lm)
    rates = {}
    for batch in batch_sizes:
        ids = torch.tensor([[(17 * i + 3) % 50000 for i in range(prompt_length)]] * batch)
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=4, do_sample=True, top_k=40, pad_token_id=50256)
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, do_sample=True, top_k=40, pad_token_id=50256)
            first = time.perf_counter() - start
            start = time.perf_counter()
            hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=40,
                        pad_token_id=50256)
            total = time.perf_counter() - start
        rates[batch] = batch * (new_tokens - 1) / (total - first)
    return rates


def benchmark(model_name="124M", models_dir="models", random=None, batch_size=8, prompt_length=32,
              length=128, dtype="float32", hf=True, json=False, keep_grappler=False):
    """Measures decode speed at batch 1 and batch_size, latency, prefill speed and peak memory.

    Args:
        model_name: Model directory under models_dir (ignored with --random).
        models_dir: Directory holding model directories.
        random: A size (124M, 355M, 774M, 1558M): benchmark random weights of that shape,
            written to a temporary directory in the released format.
        batch_size: The larger batch to measure besides batch 1.
        prompt_length: Prompt tokens for the decode measurements.
        length: New tokens per decode measurement (top_k 40).
        dtype: float32 or bfloat16.
        hf: Add a Hugging Face transformers row when transformers and torch are installed.
        json: Print one JSON object instead of a table.
        keep_grappler: Keep TensorFlow's Grappler graph rewrites on (the scripts turn them off).
    """
    if not keep_grappler:
        cli.fast_start()
    import tensorflow as tf

    import checkpoint
    import hparams as hparams_lib
    import model as model_lib
    import sample

    temporary = None
    if random is not None:
        if str(random) not in hparams_lib.SIZES:
            raise cli.UserError(f"--random takes one of {', '.join(hparams_lib.SIZES)}, got {random!r}")
        temporary = tempfile.mkdtemp(prefix="gpt2-bench-")
        checkpoint.write_random_model(os.path.join(temporary, str(random)), hparams_lib.SIZES[str(random)])
        model_name, models_dir = str(random), temporary
    try:
        results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}",
                   "tensorflow": tf.__version__, "model": model_name, "dtype": dtype,
                   "prompt_length": prompt_length, "new_tokens": length}
        start = time.perf_counter()
        lm = model_lib.load_model(model_name, models_dir, dtype=dtype)
        results["load_seconds"] = time.perf_counter() - start
        sampler = sample.Sampler(lm)
        start = time.perf_counter()
        _timed_generate(sampler, [[1, 2, 3]], 8)
        results["first_call_seconds"] = time.perf_counter() - start
        for batch in (1, batch_size):
            rate, first = decode_rate(sampler, batch, prompt_length, length)
            results[f"decode_tok_s_batch{batch}"] = rate
            results[f"first_token_ms_batch{batch}"] = first * 1000
        results["prefill_tok_s_512"] = prefill_rate(sampler, min(512, lm.hparams.n_ctx - 1))
        far = min(900, lm.hparams.n_ctx - 32)
        near = min(100, far // 2)
        for position in (near, far):
            results[f"decode_tok_s_at_position_{position}"] = decode_rate(sampler, 1, position, 32)[0]
        # Alternated, best of three each, so drift on a shared machine hits both alike.
        streamed, whole = 0.0, 0.0
        for _ in range(3):
            streamed = max(streamed, decode_rate(sampler, 1, prompt_length, length, repeats=1)[0])
            whole = max(whole, decode_rate(sampler, 1, prompt_length, length, repeats=1, max_chunk=length)[0])
        results["streaming_cost_percent"] = 100 * (1 - streamed / whole)
        results["retraces"] = sum(f.experimental_get_tracing_count() - 1 for f in
                                  (sampler._prefill, sampler._run_chunk, sampler._sample_last))
        if hf:
            try:
                import torch  # noqa: F401
                import transformers  # noqa: F401
            except ImportError:
                results["hf"] = "not installed"
            else:
                for batch, rate in hf_rates(lm, (1, batch_size), prompt_length, length).items():
                    results[f"hf_decode_tok_s_batch{batch}"] = rate
        results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)
    if json:
        print(json_lib.dumps(results, indent=2))
    else:
        width = max(len(k) for k in results)
        for key, value in results.items():
            print(f"{key:<{width}}  {value:.1f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    cli.run(benchmark)
