#!/usr/bin/env python3
"""Asks for prompts and prints GPT-2's continuations as they are generated.

End a line with a backslash to continue the prompt on the next line. Ctrl-D (end of input)
or Ctrl-C quits.
"""
import sys

import cli
import runtime
from errors import UserError

PROMPT = "Model prompt >>> "
CONTINUATION = "... "


def read_prompt():
    """Reads one prompt; lines ending in a backslash continue on the next line.

    Raises:
        EOFError: at the end of input.
    """
    lines = []
    line = input(PROMPT)
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(CONTINUATION)
    lines.append(line)
    return "\n".join(lines)


@cli.documented(
    'Prompts for text and prints continuations, until end of input or Ctrl-C (exit status 0).\n\nA line ending in a backslash continues the prompt on the next line, for multi-line prompts.',
    nsamples='Samples to print for each prompt.',
    length="New tokens per sample (default: half the model's window, 512).")
def interact_model(model_name: str = "124M", seed: int = None, nsamples: int = 1, batch_size: int = 1,
                   length: int = None, temperature=1, top_k: int = 0, top_p=1, models_dir: str = "models",
                   stop_at_eot: bool = False, stop: cli.str_or_list = None, dtype: str = "float32", engine: str = "auto",
                   repetition_penalty=1, presence_penalty=0, frequency_penalty=0, logit_bias: str = None,
                   bad_words: cli.str_or_list = None, min_length: int = 0, truncate: str = "error"):
    # Imported here so --help answers without starting TensorFlow.
    import litert_engine

    litert_engine.preload(model_name, models_dir, dtype, engine)  # before TensorFlow, for a lower peak
    runtime.fast_start(system_allocator=True)
    import api
    import console
    import sample

    console.use_safe_stdout()
    if sys.stdin is not None:
        # A C.UTF-8 locale decodes stdin with surrogateescape, which lets bad bytes reach the encoder.
        sys.stdin.reconfigure(errors="strict")
    cli.check_counts(nsamples, batch_size)
    controls = cli.sampling_controls(temperature, top_k, top_p, repetition_penalty, presence_penalty,
                                     frequency_penalty, logit_bias, bad_words, min_length)
    if length is not None:
        cli.check_whole("length", length, 1)
    sample.check_truncate(truncate)
    gpt = api.load(model_name, models_dir, dtype=dtype, engine=engine)
    if length is None:
        length = gpt.hparams.n_ctx // 2
    base_seed = sample.new_seed(seed)
    prompts_done = 0
    try:
        while True:
            raw_text = read_prompt()
            while not raw_text:
                print("Prompt should not be empty!")
                raw_text = read_prompt()
            tokens = gpt.encode(raw_text)
            try:
                context = sample.fit_prompt(tokens, gpt.hparams.n_ctx, truncate)
            except UserError as e:
                print(f"error: {cli.as_flags(str(e), interact_model)}", file=sys.stderr, flush=True)
                continue
            if len(context) < len(tokens):
                console.note_truncated(len(context), len(tokens))
            for batch in range(nsamples // batch_size):
                seed_ = sample.batch_seed(base_seed, prompts_done * (nsamples // batch_size) + batch)
                pieces = gpt.stream([context] * batch_size, length, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed_, stop_at_eot=stop_at_eot, stop=stop, **controls)
                console.print_batch(pieces, [batch * batch_size + r + 1 for r in range(batch_size)])
            print("=" * 80, flush=True)
            prompts_done += 1
    except (EOFError, KeyboardInterrupt):
        print(flush=True)
    except UnicodeDecodeError as e:
        raise UserError(f"the input is not valid UTF-8 ({e.reason} at byte {e.start}): type or pipe UTF-8 text")


if __name__ == "__main__":
    cli.run(interact_model, quick_exit=True)
