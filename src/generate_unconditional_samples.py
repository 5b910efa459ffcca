#!/usr/bin/env python3
"""Samples text from GPT-2 with no prompt (each sample starts after <|endoftext|>)."""
import itertools

import cli
import runtime


@cli.documented(
    'Prints unconditional samples, numbered from 1, until nsamples are out (or forever).',
    nsamples='Number of samples to print; 0 runs until Ctrl-C.',
    length="Tokens per sample (default: the model's window, 1024).")
def sample_model(model_name: str = "124M", seed: int = None, nsamples: int = 0, batch_size: int = 1,
                 length: int = None, temperature=1, top_k: int = 0, top_p=1, models_dir: str = "models",
                 stop_at_eot: bool = False, stop: cli.str_or_list = None, dtype: str = "float32", engine: str = "auto",
                 repetition_penalty=1, presence_penalty=0, frequency_penalty=0, logit_bias: str = None,
                 bad_words: cli.str_or_list = None, min_length: int = 0, json: bool = False, logprobs: int = None):
    # Imported here so --help answers without starting TensorFlow.
    import litert_engine

    litert_engine.preload(model_name, models_dir, dtype, engine)  # before TensorFlow, for a lower peak
    runtime.fast_start(system_allocator=True)
    import api
    import console
    import sample

    console.use_safe_stdout()
    cli.check_counts(nsamples, batch_size, allow_forever=True)
    controls = cli.sampling_controls(temperature, top_k, top_p, repetition_penalty, presence_penalty,
                                     frequency_penalty, logit_bias, bad_words, min_length, json=json, logprobs=logprobs)
    gpt = api.load(model_name, models_dir, dtype=dtype, engine=engine)
    if length is None:
        length = gpt.hparams.n_ctx

    base_seed = sample.new_seed(seed)
    generated = 0
    try:
        for batch in itertools.count():
            if nsamples and generated >= nsamples:
                break
            contexts = [[gpt.eot_token]] * batch_size
            options = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=sample.batch_seed(base_seed, batch), stop_at_eot=stop_at_eot, stop=stop, **controls)
            if json:
                results = gpt.generate(contexts, length, logprobs=logprobs, **options)
                console.print_json([gpt.decode(c) for c in contexts], results)
            else:
                console.print_batch(gpt.stream(contexts, length, **options),
                                    [generated + r + 1 for r in range(batch_size)])
            generated += batch_size
    except KeyboardInterrupt:
        print(flush=True)  # Ctrl-C is how an endless run is stopped: not an error.


if __name__ == "__main__":
    cli.run(sample_model, quick_exit=True)
