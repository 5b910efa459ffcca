#!/usr/bin/env python3
"""Measures generation speed and memory on a model directory or on random weights of a named size."""
import json as json_lib
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import cli
import runtime


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
        logits, _ = sampler.prefill(tokens, pad, tf.constant(prompt_length + 1))
        np.asarray(logits)
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


def train_rate(model_dir, batch, length, steps, precision="float32", xla=True, optimizer="adam",
               memory_saving_gradients=False, lora_rank=0, base_dtype=None):
    """Fine-tuning tokens/s (`optimizer`, in `precision`; LoRA adapters of `lora_rank` on every
    target when > 0) on batches of random windows, the best of `steps` steps after two warm-up
    steps (the first compiles), and the model trained."""
    import tensorflow as tf

    import checkpoint
    import lora
    import model_files
    import trainer

    hp = model_files.load_hparams(model_dir)
    strategy = tf.distribute.get_strategy()
    adapters = lora.Config(lora_rank) if lora_rank else None
    # Read one tensor at a time, as train.py does: a dict of them all would be a second copy.
    lm = trainer.build_model(hp, checkpoint.open_weights(model_dir, hp), strategy, precision, lora=adapters,
                             base_dtype=base_dtype)
    t = trainer.Trainer(lm, strategy, optimizer=optimizer, memory_saving_gradients=memory_saving_gradients, xla=xla)
    rng = np.random.default_rng(0)
    best = float("inf")
    for step in range(steps + 2):
        tokens = rng.integers(0, hp.n_vocab, (batch, min(length, hp.n_ctx))).astype(np.int32)
        start = time.perf_counter()
        t.train_step([tokens], step)
        if step >= 2:
            best = min(best, time.perf_counter() - start)
    return tokens.size / best, lm


def hf_train_rate(lm, batch, length, steps):
    """Hugging Face transformers (PyTorch, CPU) fine-tuning tokens/s on the same weights, with Adam."""
    import torch

    import hf_compat

    hf = hf_compat.to_hf(lm)
    hf.train()
    optimizer = torch.optim.Adam(hf.parameters(), lr=2e-5)
    generator = torch.Generator().manual_seed(0)
    best = float("inf")
    for step in range(steps + 2):
        ids = torch.randint(0, lm.hparams.n_vocab, (batch, min(length, lm.hparams.n_ctx)), generator=generator)
        start = time.perf_counter()
        optimizer.zero_grad()
        hf(ids, labels=ids).loss.backward()
        optimizer.step()
        if step >= 2:
            best = min(best, time.perf_counter() - start)
    return ids.numel() / best


def _hf_installed():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def generation_figures(model_name, models_dir, dtype, batch_size, prompt_length, length, hf, engine="tf"):
    import api

    results = {}
    start = time.perf_counter()
    gpt = api.load(model_name, models_dir, dtype=dtype, engine=engine)
    results["load_seconds"] = time.perf_counter() - start
    if gpt.engine is not None:  # the first load may convert; the second reads the cache
        results["litert_first_load_seconds"] = results["load_seconds"]
        start = time.perf_counter()
        gpt = api.load(model_name, models_dir, dtype=dtype, engine=engine)
        results["load_seconds"] = time.perf_counter() - start
    sampler = gpt.sampler
    start = time.perf_counter()
    _timed_generate(sampler, [[1, 2, 3]], 8)
    results["first_call_seconds"] = time.perf_counter() - start
    for batch in (1, batch_size):
        rate, first = decode_rate(sampler, batch, prompt_length, length)
        results[f"decode_tok_s_batch{batch}"] = rate
        results[f"first_token_ms_batch{batch}"] = first * 1000
    results["prefill_tok_s_512"] = prefill_rate(sampler, min(512, gpt.hparams.n_ctx - 1))
    far = min(900, gpt.hparams.n_ctx - 32)
    near = min(100, far // 2)
    for position in (near, far):
        results[f"decode_tok_s_at_position_{position}"] = decode_rate(sampler, 1, position, 32)[0]
    # Alternated, best of three each, so drift on a shared machine hits both alike.
    streamed, whole = 0.0, 0.0
    for _ in range(3):
        streamed = max(streamed, decode_rate(sampler, 1, prompt_length, length, repeats=1)[0])
        whole = max(whole, decode_rate(sampler, 1, prompt_length, length, repeats=1, max_chunk=length)[0])
    results["streaming_cost_percent"] = 100 * (1 - streamed / whole)
    results["retraces"] = sum(max(count - 1, 0) for count in sampler.traces().values())
    if dtype == "int8":
        exact = api.load(model_name, models_dir, dtype="float32", engine="litert", progress=False)
        results.update(int8_fidelity(exact.engine, gpt.engine))
    if not hf:
        return results
    if not _hf_installed():
        results["hf"] = "not installed"
        return results
    for batch, rate in hf_rates(gpt.lm, (1, batch_size), prompt_length, length).items():
        results[f"hf_decode_tok_s_batch{batch}"] = rate
    return results


def int8_fidelity(exact, quantized, steps=32):
    """How far int8 weights move the logits from float32's, over a prompt's pass and `steps`
    decode steps fed float32's greedy tokens: the largest and mean absolute logit error, how
    often the two argmaxes agree, and the mean KL divergence KL(float32 || int8) in nats."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    prompt = np.array([[(17 * i + 3) % 50000 for i in range(8)]], np.int32)
    pad = np.zeros([1], np.int32)
    a, a_state = exact.prefill(prompt, pad, prompt.shape[1] + steps)
    b, b_state = quantized.prefill(prompt, pad, prompt.shape[1] + steps)
    pairs = [(a, b)]
    for pos in range(prompt.shape[1], prompt.shape[1] + steps):
        token = a.argmax(-1).astype(np.int32)
        a, a_state = exact.step(token, pos, pad, a_state)
        b, b_state = quantized.step(token, pos, pad, b_state)
        pairs.append((a, b))
    x, y = (np.concatenate(side) for side in zip(*pairs))
    p, q = log_softmax(x.astype(np.float64)), log_softmax(y.astype(np.float64))
    return {"int8_max_logit_error": float(np.abs(x - y).max()), "int8_mean_logit_error": float(np.abs(x - y).mean()),
            "int8_argmax_agreement": float((x.argmax(-1) == y.argmax(-1)).mean()),
            "int8_mean_kl_nats": float((np.exp(p) * (p - q)).sum(-1).mean())}


# Runs a script and, as it exits, writes its VmHWM (peak RSS) to a file. The child's own rusage
# is no use: a child forked from this process inherits its peak RSS across exec on Linux.
_PEAK_REPORTER = """
import atexit, os, runpy, sys
report, script = sys.argv[1], sys.argv[2]
def write_peak():
    try:
        with open("/proc/self/status") as status:
            peak = next((line.split()[1] for line in status if line.startswith("VmHWM")), "")
    except OSError:
        return  # not Linux: no figure
    with open(report, "w") as out:
        out.write(peak)
atexit.register(write_peak)
quick_exit = os._exit  # the sampling scripts end through os._exit, which skips atexit
os._exit = lambda status: (write_peak(), quick_exit(status))
sys.argv = sys.argv[2:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
"""


# Start-up is timed over several fresh processes: on a shared machine one run can be a second off.
START_UP_RUNS = 3


def script_figures(model_name, models_dir, dtype, n_ctx, engine="tf"):
    """Wall seconds and peak RSS (Linux) of generate_unconditional_samples.py runs, each a fresh
    process as a user starts it: `--length 8` (start-up; the fastest and the median of
    START_UP_RUNS runs) and `--length 264` (memory while generating)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "generate_unconditional_samples.py")
    results = {}
    with tempfile.TemporaryDirectory(prefix="gpt2-bench-") as scratch:
        report = os.path.join(scratch, "peak")

        def run(length):
            start = time.perf_counter()
            child = subprocess.run([sys.executable, "-c", _PEAK_REPORTER, report, script, "--model_name", model_name,
                                    "--models_dir", models_dir, "--nsamples", "1", "--length", str(length),
                                    "--dtype", dtype, "--engine", engine, "--seed", "1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            seconds = time.perf_counter() - start
            if child.returncode != 0:
                last = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
                raise cli.UserError(f"generate_unconditional_samples.py failed: {last}")
            peak_kib = ""
            if os.path.exists(report):
                with open(report) as f:
                    peak_kib = f.read().strip()
                os.remove(report)
            return seconds, int(peak_kib) / 1024 if peak_kib else None

        start_up = [run(8) for _ in range(START_UP_RUNS)]
        results["script_seconds_length8"] = min(seconds for seconds, _ in start_up)
        results["script_seconds_length8_median"] = sorted(seconds for seconds, _ in start_up)[START_UP_RUNS // 2]
        long_run = min(264, n_ctx)
        generating = run(long_run)
        results[f"script_seconds_length{long_run}"] = generating[0]
        for length, runs in ((8, start_up), (long_run, [generating])):
            peaks = [mib for _, mib in runs if mib is not None]
            if peaks:
                results[f"script_peak_rss_mib_length{length}"] = max(peaks)
    return results


def _streamed_completion(port, body):
    """One streamed request to serve.py: (seconds to the first event with text, seconds in all,
    completion tokens). Raises RuntimeError for an error answer."""
    import http.client

    body = dict(body, stream=True, stream_options={"include_usage": True})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    try:
        connection.request("POST", "/v1/completions", json_lib.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}: {response.read()[:200]!r}")
        first, tokens = None, None
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            event = json_lib.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and any(c["text"] for c in event["choices"]):
                first = time.perf_counter() - start
        if tokens is None:
            raise RuntimeError("the stream ended without its usage event")
        return first, time.perf_counter() - start, tokens
    finally:
        connection.close()


def _rss_mib(pid):
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _percentiles(name, seconds):

    seconds = [s for s in seconds if s is not None]
    return {f"{name}_p50_ms": float(np.percentile(seconds, 50)) * 1000,
            f"{name}_p99_ms": float(np.percentile(seconds, 99)) * 1000}


def _mixed_figures(port, pid, model_name, mixed, mixed_clients):
    """`mixed` requests of mixed sizes from `mixed_clients` clients to serve.py on `port`."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    results = {}
    rng = random.Random(0)
    words = [f" w{i}" for i in range(500)]
    bodies = [dict(model=model_name, prompt="".join(rng.choices(words, k=rng.randint(1, 100))),
                   max_tokens=rng.randint(1, 64), n=rng.choice([1, 1, 1, 2]), temperature=rng.choice([0, 0.7, 1]),
                   top_p=rng.choice([0.9, 1.0]), seed=i, stop=rng.choice([None, "\n", [" w1", " w2"]]))
              for i in range(mixed)]
    rss, errors, timings = [_rss_mib(pid)], 0, []

    def send(body):
        try:
            return _streamed_completion(port, body)
        except (RuntimeError, OSError):
            return None

    start = time.perf_counter()
    with ThreadPoolExecutor(mixed_clients) as pool:
        for i, timing in enumerate(pool.map(send, bodies)):
            errors += timing is None
            timings.append(timing)
            if (i + 1) % max(1, mixed // 10) == 0:
                rss.append(_rss_mib(pid))
    seconds = time.perf_counter() - start
    done = [t for t in timings if t is not None]
    results.update({f"serve_mixed{mixed}_errors": errors, f"serve_mixed{mixed}_seconds": seconds,
                    f"serve_mixed{mixed}_tok_s": sum(t for _, _, t in done) / seconds,
                    f"serve_mixed{mixed}_rss_mib_by_tenth": " ".join(f"{r:.0f}" for r in rss)})
    results.update(_percentiles(f"serve_mixed{mixed}_latency", [total for _, total, _ in done]))
    results.update(_percentiles(f"serve_mixed{mixed}_first_token", [first for first, _, _ in done]))
    return results


# Generation controls for the serve figures' controlled round: every one the batch tallies per row.
SERVE_CONTROLS = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={"50256": -100})


def serve_figures(model_name, models_dir, dtype, clients=8, new_tokens=64, mixed=1000, mixed_clients=16, engine="tf"):
    """serve.py as a user starts it, measured over HTTP: `clients` concurrent requests of
    `new_tokens` tokens against the same requests one after another (tokens/s), latencies, the
    concurrent ones again with generation controls on, and `mixed` requests of mixed sizes from
    `mixed_clients` clients (errors, the server's RSS; 0 skips them)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")
    server = subprocess.Popen([sys.executable, script, "--model_name", model_name, "--models_dir", models_dir,
                               "--port", str(port), "--max_batch", str(max(clients, mixed_clients)), "--dtype", dtype,
                               "--engine", engine],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    results = {}
    try:
        results["serve_start_line"] = server.stdout.readline().strip()
        prompts = [" ".join(f"word{(7 * i + j) % 97}" for j in range(8)) for i in range(clients)]
        fixed = [dict(model=model_name, prompt=p, max_tokens=new_tokens, seed=i, temperature=1.0)
                 for i, p in enumerate(prompts)]
        for _ in range(60):
            try:
                _streamed_completion(port, fixed[0])  # up, and warm
                break
            except OSError:
                time.sleep(1)
        start = time.perf_counter()
        alone = [_streamed_completion(port, body) for body in fixed]
        sequential = sum(t for _, _, t in alone) / (time.perf_counter() - start)
        with ThreadPoolExecutor(clients) as pool:
            start = time.perf_counter()
            together = list(pool.map(lambda body: _streamed_completion(port, body), fixed))
            concurrent = sum(t for _, _, t in together) / (time.perf_counter() - start)
        results.update({"serve_sequential_tok_s": sequential, f"serve_concurrent{clients}_tok_s": concurrent,
                        f"serve_concurrent{clients}_gain": concurrent / sequential})
        results.update(_percentiles("serve_sequential_latency", [total for _, total, _ in alone]))
        results.update(_percentiles(f"serve_concurrent{clients}_latency", [total for _, total, _ in together]))
        results.update(_percentiles(f"serve_concurrent{clients}_first_token", [first for first, _, _ in together]))
        with ThreadPoolExecutor(clients) as pool:
            start = time.perf_counter()
            controlled = list(pool.map(lambda body: _streamed_completion(port, dict(body, **SERVE_CONTROLS)), fixed))
            with_controls = sum(t for _, _, t in controlled) / (time.perf_counter() - start)
        results.update({f"serve_concurrent{clients}_controls_tok_s": with_controls,
                        f"serve_concurrent{clients}_controls_over_off": with_controls / concurrent})
        if mixed:
            results.update(_mixed_figures(port, server.pid, model_name, mixed, mixed_clients))
    finally:
        server.terminate()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
    results["serve_exit_status"] = server.returncode
    return results


def benchmark(model_name="124M", models_dir="models", random=None, batch_size=8, prompt_length=32,
              length=128, dtype="float32", hf=True, json=False, keep_grappler=False, generate=True,
              script=True, train=True, train_batch=1, train_length=256, train_steps=4, train_precision="float32",
              serve=False, engine="tf", train_optimizer="adam", train_lora_rank=0,
              memory_saving_gradients=False, serve_mixed=1000, train_base_dtype=None):
    """Measures decode speed at batch 1 and batch_size, latency, prefill speed and peak memory.

    Args:
        model_name: Model directory under models_dir (ignored with --random).
        models_dir: Directory holding model directories.
        random: A size (124M, 355M, 774M, 1558M): benchmark random weights of that shape,
            written to a temporary directory in the released format.
        batch_size: The larger batch to measure besides batch 1.
        prompt_length: Prompt tokens for the decode measurements.
        length: New tokens per decode measurement (top_k 40).
        dtype: float32, bfloat16 or int8 (LiteRT engine).
        engine: tf, litert or auto, the generation engine measured (as the scripts' --engine).
        hf: Add a Hugging Face transformers row when transformers and torch are installed.
        json: Print one JSON object instead of a table.
        keep_grappler: Keep TensorFlow's Grappler graph rewrites on for generation (the
            sampling scripts turn them off; training always keeps them).
        generate: Measure generation (--generate False measures training alone, for its memory).
        script: Also time generate_unconditional_samples.py (--length 8 and 264) as fresh processes,
            with their peak RSS.
        train: Measure fine-tuning speed (Adam) and memory, after generation.
        train_batch: Windows per training step.
        train_length: Tokens per training window.
        train_steps: Timed training steps (after two warm-up steps).
        train_precision: float32, mixed_bfloat16 or mixed_float16, as train.py's --precision.
        serve: Measure serve.py over HTTP: 8 concurrent clients of 64 tokens against the same
            requests one after another, latencies, the same with generation controls on, and
            `serve_mixed` mixed requests from 16 clients.
        train_optimizer: adam, sgd or adafactor, as train.py's --optimizer.
        train_lora_rank: Train LoRA adapters of this rank on every target instead of the weights (0: off).
        memory_saving_gradients: Recompute each block's activations in training, as train.py's flag.
        serve_mixed: Mixed requests for --serve (0: none, for a quick round).
        train_base_dtype: bfloat16 or float32, what LoRA's frozen weights are held in, as train.py's
            --base_dtype (default bfloat16).
    """
    if not keep_grappler:
        runtime.fast_start()
    import tensorflow as tf

    import checkpoint
    import hparams as hparams_lib
    import model_files
    import trainer

    if train:
        trainer.parse_precision(train_precision, "--train_precision")  # before minutes of generation figures
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
                   "prompt_length": prompt_length, "new_tokens": length, "engine": engine}
        if generate:
            results.update(generation_figures(model_name, models_dir, dtype, batch_size, prompt_length, length, hf,
                                              engine))
            results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if generate and script:
            n_ctx = model_files.load_hparams(hparams_lib.model_dir(model_name, models_dir)).n_ctx
            results.update(script_figures(model_name, models_dir, dtype, n_ctx, engine))
        if train:
            tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": False})
            results["train_batch"], results["train_length"] = train_batch, train_length
            results["train_precision"] = train_precision
            results["train_optimizer"], results["train_lora_rank"] = train_optimizer, train_lora_rank
            results["memory_saving_gradients"] = memory_saving_gradients
            path = hparams_lib.model_dir(model_name, models_dir)
            results["train_tok_s"], trained = train_rate(path, train_batch, train_length, train_steps,
                                                         train_precision, optimizer=train_optimizer,
                                                         memory_saving_gradients=memory_saving_gradients,
                                                         lora_rank=train_lora_rank, base_dtype=train_base_dtype)
            if train_lora_rank:
                results["train_base_dtype"] = trained.base_dtype.name
            results["train_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            if hf and _hf_installed():
                results["hf_train_tok_s"] = hf_train_rate(trained, train_batch, train_length, train_steps)
        if serve:
            results.update(serve_figures(model_name, models_dir, dtype, mixed=serve_mixed, engine=engine))
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
