#!/usr/bin/env python3
"""Samples text from GPT-2 with no prompt (each sample starts after <|endoftext|>)."""
import itertools

import cli


def sample_model(model_name="124M", seed=None, nsamples=0, batch_size=1, length=None, temperature=1,
                 top_k=0, top_p=1, models_dir="models", stop_at_eot=False, stop=None, dtype="float32"):
    """Prints unconditional samples, numbered from 1, until nsamples are out (or forever).

    Args:
        model_name: Model directory under models_dir: 124M, 355M, 774M, 1558M (117M, 345M: legacy names).
        seed: Integer seed; the same seed gives the same samples run after run.
        nsamples: Number of samples to print; 0 runs until Ctrl-C.
        batch_size: Samples generated at once; nsamples must be a multiple of it.
        length: Tokens per sample (default: the model's window, 1024).
        temperature: Randomness: logits are divided by it; 0 is greedy (always the likeliest token).
        top_k: Sample only from the k likeliest tokens; 0 turns it off (40 is a good value).
        top_p: Sample only from the smallest set of likeliest tokens whose probability stays within
            top_p (the reference's nucleus rule); 1 turns it off.
        models_dir: Directory holding the model directories (~ and $VARS are expanded).
        stop_at_eot: End a sample at <|endoftext|>.
        stop: A string, or a list like '["\\n\\n", "THE END"]', that ends a sample when generated.
        dtype: float32 (default, exact) or bfloat16 (faster on GPUs and some CPUs).
    """
    # Imported here so --help answers without starting TensorFlow.
    cli.fast_start()
    import api
    import console
    import sample

    console.use_safe_stdout()
    cli.check_counts(nsamples, batch_size, allow_forever=True)
    sample.check_knobs(temperature, top_k, top_p)
    gpt = api.load(model_name, models_dir, dtype=dtype)
    if length is None:
        length = gpt.hparams.n_ctx

    base_seed = sample.new_seed(seed)
    generated = 0
    try:
        for batch in itertools.count():
            if nsamples and generated >= nsamples:
                break
            contexts = [[gpt.eot_token]] * batch_size
            pieces = gpt.stream(contexts, length, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=sample.batch_seed(base_seed, batch), stop_at_eot=stop_at_eot, stop=stop)
            console.print_batch(pieces, [generated + r + 1 for r in range(batch_size)])
            generated += batch_size
    except KeyboardInterrupt:
        print(flush=True)  # Ctrl-C is how an endless run is stopped: not an error.


if __name__ == "__main__":
    cli.run(sample_model)
