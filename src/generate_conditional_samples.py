#!/usr/bin/env python3
"""Continues prompts given as an argument, a file or standard input, without a prompt loop."""
import sys

import cli
import runtime
from errors import UserError


def read_text(prompt=None, prompt_file=None):
    """The prompt text: the argument, else the file, else standard input, as strict UTF-8."""
    if prompt is not None and prompt_file is not None:
        raise UserError("give the prompt as an argument or with --prompt_file, not both")
    if prompt is not None:
        try:
            prompt.encode("utf-8")  # an argument's undecodable bytes arrive as lone surrogates
        except UnicodeEncodeError as e:
            raise UserError(f"the prompt is not valid UTF-8 (character {e.start + 1}): convert it to UTF-8") from None
        return prompt
    if prompt_file is not None:
        try:
            with open(prompt_file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"cannot read --prompt_file {prompt_file}: {e.strerror}") from None
        source = prompt_file
    else:
        data = sys.stdin.buffer.read()
        source = "standard input"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not valid UTF-8 (byte {e.start}: {e.reason}): convert it to UTF-8") from None


@cli.documented(
    "Prints samples continuing a prompt (or one prompt per line), then exits.\n\nEach prompt's samples are numbered from 1 and followed by a line of 80 '='.",
    prompt='The prompt text. Without it, --prompt_file is read, else standard input.',
    prompt_file='A UTF-8 file holding the prompt.',
    per_line='Treat each non-empty line as its own prompt; a batch can then mix prompts of different lengths, and nsamples need not be a multiple of batch_size.',
    nsamples='Samples to print for each prompt.',
    batch_size='Samples generated at once.',
    length="New tokens per sample (default: half the model's window, 512).")
def sample_model(prompt: str = None, prompt_file: str = None, per_line: bool = False, model_name: str = "124M",
                 seed: int = None, nsamples: int = 1, batch_size: int = 1, length: int = None, temperature=1,
                 top_k: int = 0, top_p=1, models_dir: str = "models", stop_at_eot: bool = False,
                 stop: cli.str_or_list = None, dtype: str = "float32", engine: str = "auto",
                 repetition_penalty=1, presence_penalty=0, frequency_penalty=0, logit_bias: str = None,
                 bad_words: cli.str_or_list = None, min_length: int = 0, json: bool = False, logprobs: int = None,
                 truncate: str = "error"):
    # Imported here so --help answers without starting TensorFlow.
    import litert_engine

    litert_engine.preload(model_name, models_dir, dtype, engine)  # before TensorFlow, for a lower peak
    runtime.fast_start(system_allocator=True)
    import api
    import console
    import sample

    console.use_safe_stdout()
    text = read_text(prompt, prompt_file)
    prompts = [line for line in text.splitlines() if line.strip()] if per_line else [text]
    if not prompts or not all(prompts):
        raise UserError("the prompt is empty: give some text")
    cli.check_counts(nsamples, batch_size if not per_line else 1)
    cli.check_counts(batch_size, batch_size)  # batch_size itself: a whole number >= 1
    sample.check_truncate(truncate)
    controls = cli.sampling_controls(temperature, top_k, top_p, repetition_penalty, presence_penalty,
                                     frequency_penalty, logit_bias, bad_words, min_length, json=json, logprobs=logprobs)
    gpt = api.load(model_name, models_dir, dtype=dtype, engine=engine)
    if length is None:
        length = gpt.hparams.n_ctx // 2
    contexts = []
    for p, text in enumerate(prompts):
        tokens = gpt.encode(text)
        try:
            contexts.append(sample.fit_prompt(tokens, gpt.hparams.n_ctx, truncate))
        except UserError as e:
            raise UserError(f"prompt {p + 1}: {e}" if per_line else str(e)) from None
        if len(contexts[-1]) < len(tokens):
            console.note_truncated(len(contexts[-1]), len(tokens), p + 1 if per_line else None)
    # Every (prompt, sample) pair is a row; batches are cut from them in order.
    rows = [(p, n) for p in range(len(contexts)) for n in range(nsamples)]
    base_seed = sample.new_seed(seed)
    for batch, start in enumerate(range(0, len(rows), batch_size)):
        batch_rows = rows[start:start + batch_size]
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=sample.batch_seed(base_seed, batch),
                       stop_at_eot=stop_at_eot, stop=stop, **controls)
        if json:
            batch_prompts = [prompts[p] for p, _ in batch_rows]
            console.print_json(batch_prompts, gpt.generate(batch_prompts, length, logprobs=logprobs, truncate=truncate,
                                                           **options))
            continue
        pieces = gpt.stream([contexts[p] for p, _ in batch_rows], length, **options)

        def separator(row, batch_rows=batch_rows):
            return "=" * 80 if batch_rows[row][1] == nsamples - 1 else None

        console.print_batch(pieces, [n + 1 for _, n in batch_rows], after_row=separator)


if __name__ == "__main__":
    cli.run(sample_model, quick_exit=True)
