#!/usr/bin/env python3
"""Fine-tunes GPT-2 on a text corpus, with the flags of the nshepperd/gpt-2 fork's train.py.

Saves go to `checkpoint/<run_name>/`, a complete model directory: sample from it with
`--models_dir checkpoint --model_name <run_name>`.
"""
import os
import sys

import cli
from cli import UserError

HELP = dict(
    dataset="Training text: a file, a directory, a glob, or .npz files made by encode.py.",
    model_name="Model to start from, under models_dir: 124M, 355M, 774M, 1558M.",
    run_name="Run directory name under checkpoint_dir (and sample_dir): one folder name, no / or ..",
    checkpoint_dir="Where run directories go.",
    sample_dir="Where samples-<step> files go, under <sample_dir>/<run_name>.",
    combine="Join text files, separated by <|endoftext|>, into chunks of at least this many characters "
            "(0: one chunk per file).",
    encoding="Text encoding of the dataset files.",
    batch_size="Windows per step (split across devices with --strategy).",
    learning_rate="Optimizer step size (default 2e-5 for adam and sgd). For adafactor, a fixed relative step (each "
                  "update is this times the weight's RMS); default the paper's min(1e-2, 1/sqrt(step)).",
    accumulate_gradients="Batches whose gradients are averaged into each update.",
    memory_saving_gradients="Recompute each block's activations during backprop: less memory, more time.",
    only_train_transformer_layers="Train the transformer blocks only, not the embeddings or final norm.",
    optimizer="adam, sgd, or adafactor (factored second moments: a row and a column per matrix instead of Adam's "
              "two copies of the weights).",
    adafactor_beta1="Adafactor's first-moment decay (default 0: none, as in the paper; 0.9 keeps one, a copy of "
                    "the weights).",
    adafactor_clip_threshold="Adafactor's update clipping: each update's RMS is at most this (default 1).",
    lora_rank="Train LoRA adapters of this rank (a whole number >= 1) beside frozen weights, instead of the "
              "weights; saves merge them in, so every script loads the run (default: train the weights).",
    lora_alpha="LoRA's alpha: the adapters' change is scaled by alpha / rank (default: alpha = rank).",
    lora_targets="Comma-separated matrices of each block that get adapters: attn/c_attn, attn/c_proj, mlp/c_fc, "
                 "mlp/c_proj (default: all four).",
    base_dtype="What LoRA's frozen weights are held in: bfloat16 (the default: half the memory, training on the "
               "weights rounded to bfloat16) or float32 (exact). Saves merge the adapters into the float32 "
               "weights either way.",
    noise="Probability of replacing each input token by a random one (a regulariser).",
    top_k="top_k for the samples printed during training (0: off).",
    top_p="top_p for the samples printed during training (0 or 1: off).",
    restore_from="latest (continue this run, else start from the model), fresh (start from the model), "
                 "or a path: a model directory or a checkpoint prefix such as checkpoint/run1/model-500.",
    sample_every="Print and save samples every this many steps (0: never).",
    sample_length="Tokens per sample (default: 1023, or n_ctx - 1 for models with a shorter window).",
    sample_num="Samples each time.",
    save_every="Save every this many steps (and always at the end, on Ctrl-C and on SIGTERM).",
    val_dataset="Validation text, like --dataset (default: no validation).",
    val_batch_size="Windows per validation batch.",
    val_batch_count="Validation batches, drawn once at the start.",
    val_every="Report validation loss every this many steps (0: never).",
    max_steps="Stop and save after this step (the count continues across restarts; default: run until Ctrl-C).",
    max_to_keep="Saves of the model kept in the run directory.",
    strategy="default (one device), mirrored (all local GPUs), or multi_worker (machines listed in TF_CONFIG).",
    precision="float32, mixed_bfloat16 or mixed_float16: float32 weights, matrix products in 16 bits (for GPUs, "
              "and mixed_bfloat16 for CPUs with AVX-512 BF16: ~1.4x float32's speed there).",
    seed="Integer seed for the data order and noise (default: random).",
    xla="Compile the loss and gradients with XLA: faster after ~10 s of compiling (one device, not with "
        "memory_saving_gradients, not for 16-bit precisions on a CPU). --noxla turns it off.",
)


@cli.documented("Fine-tunes a GPT-2 model on your text. Ctrl-C or SIGTERM stops it after the step and saves "
                "(exit status 0); a closed standard output (| head) stops the printing, not the training.", **HELP)
def train(dataset=None, model_name="124M", models_dir="models", run_name="run1", checkpoint_dir="checkpoint",
          sample_dir="samples", combine=50000, encoding="utf-8", batch_size=1, learning_rate=None,
          accumulate_gradients=1, memory_saving_gradients=False, only_train_transformer_layers=False,
          optimizer="adam", adafactor_beta1=None, adafactor_clip_threshold=None, lora_rank=None, lora_alpha=None,
          lora_targets=None, base_dtype=None, noise=0.0, top_k=40, top_p=0.0, restore_from="latest", sample_every=100,
          sample_length=None, sample_num=1, save_every=1000, val_dataset=None, val_batch_size=2,
          val_batch_count=40, val_every=0, max_steps=None, max_to_keep=5, strategy="default",
          precision="float32", seed=None, xla=True):
    if not dataset:
        raise UserError("--dataset is required: a text file, directory, glob or .npz from encode.py")
    for name, least in (("batch_size", 1), ("accumulate_gradients", 1), ("sample_every", 0), ("sample_num", 0),
                        ("save_every", 0), ("val_batch_size", 1), ("val_batch_count", 1), ("val_every", 0),
                        ("max_to_keep", 1), ("combine", 0), ("top_k", 0)):
        cli.check_whole(name, locals()[name], least)
    if max_steps is not None:
        cli.check_whole("max_steps", max_steps, 1)
    if learning_rate is not None and (not isinstance(learning_rate, (int, float)) or learning_rate <= 0):
        raise UserError(f"--learning_rate must be a number > 0, got {learning_rate!r}")
    if not isinstance(noise, (int, float)) or not 0 <= noise < 1:
        raise UserError(f"--noise must be a probability in [0, 1), got {noise!r}")
    top_p = 1.0 if top_p == 0 else top_p  # the fork's 0 means off, as our 1 does
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1] (0 or 1: off), got {top_p!r}")
    if optimizer not in ("adam", "sgd", "adafactor"):
        raise UserError(f"--optimizer must be adam, sgd or adafactor, got {optimizer!r}")
    if lora_rank is None and (lora_alpha is not None or lora_targets is not None):
        raise UserError("--lora_alpha and --lora_targets need --lora_rank: give the adapters' rank too")
    if lora_rank is not None:
        cli.check_whole("lora_rank", lora_rank, 1)
    if lora_rank is None and base_dtype is not None:
        raise UserError("--base_dtype is for LoRA's frozen weights: give --lora_rank too (without LoRA every weight "
                        "trains, in float32)")
    run_name = check_run_name(run_name)
    run_dir = os.path.join(os.path.expanduser(checkpoint_dir), run_name)
    check_directory("checkpoint_dir", run_dir)
    samples_dir = os.path.join(os.path.expanduser(sample_dir), run_name)
    if sample_every and sample_num:
        check_directory("sample_dir", samples_dir)

    import runtime

    runtime.import_tensorflow()
    import checkpoint
    import dataset as dataset_lib
    import encoder as encoder_lib
    import finetune
    import lora
    import model_files
    import runs
    import sample
    import trainer as trainer_lib

    out = finetune.Output(sys.stdout)
    source_dir, prefix, start_step = resolve_start(restore_from, run_dir, model_name, models_dir)
    if max_steps and start_step >= max_steps:
        out.print(f"{run_dir} is already at step {start_step} and --max_steps is {max_steps}: nothing to do "
                  "(raise --max_steps to train further)")
        return
    adapters_config = None if lora_rank is None else lora.Config(lora_rank, lora_alpha, lora_targets or lora.TARGETS)
    optimizer_options = dict(adafactor_beta1=adafactor_beta1, adafactor_clip_threshold=adafactor_clip_threshold)
    trainer_lib.optimizer_keywords(optimizer, **optimizer_options)  # its checks, before any work
    if base_dtype is not None:
        lora.parse_base_dtype(base_dtype)
    runtime.configure_devices()
    strategy = trainer_lib.make_strategy(strategy)
    trainer_lib.parse_precision(precision)
    hp = model_files.load_hparams(source_dir)
    if sample_length is None:
        sample_length = min(1023, hp.n_ctx - 1)
    cli.check_whole("sample_length", sample_length, 1)
    if sample_length > hp.n_ctx - 1:
        raise UserError(f"--sample_length ({sample_length}) must be at most n_ctx - 1 ({hp.n_ctx - 1}): "
                        "samples start from one <|endoftext|> token")
    enc = encoder_lib.Encoder.from_dir(source_dir)
    seed = sample.new_seed(seed)

    out.print("Loading dataset...")
    data = dataset_lib.TokenSampler(dataset_lib.load_dataset(enc, dataset, combine, encoding), seed=seed)
    window = data.window_length(hp.n_ctx)
    out.print(f"dataset has {data.total_tokens} tokens; training on windows of {window} tokens")
    val_batches = []
    if val_dataset and val_every:
        val_data = dataset_lib.TokenSampler(dataset_lib.load_dataset(enc, val_dataset, combine, encoding), seed=1)
        val_batches = finetune.validation_batches(val_data, val_batch_size, val_batch_count, hp.n_ctx)

    weights = checkpoint.open_weights(source_dir, hp, prefix=prefix)
    adapters = lora_start(run_dir, start_step, adapters_config, out) if start_step else None
    if adapters is not None:
        weights = lora.UnmergedWeights(weights, adapters)  # the frozen weights the adapters were trained on
    lm = trainer_lib.build_model(hp, weights, strategy, precision, lora=adapters_config, adapters=adapters, seed=seed,
                                 base_dtype=base_dtype)
    trainer = trainer_lib.Trainer(lm, strategy, optimizer=optimizer, learning_rate=learning_rate,
                                  optimizer_options=optimizer_options,
                                  accumulate_gradients=accumulate_gradients,
                                  memory_saving_gradients=memory_saving_gradients,
                                  only_train_transformer_layers=only_train_transformer_layers, noise=noise, seed=seed,
                                  xla=xla)
    trainer.check_batch_size(batch_size)
    if val_batches:
        trainer.check_batch_size(val_batch_size)
    if start_step and runs.restore_optimizer(run_dir, start_step, trainer.optimizer, lm.compute_dtype):
        out.print(f"Resuming {run_dir} at step {start_step} with its optimizer state")
    if strategy.extended.should_checkpoint:  # under multi-worker training, only the chief writes
        runs.prepare(run_dir, source_dir, hp)
    schedule = finetune.Schedule(
        batch_size=batch_size, sample_every=sample_every, sample_length=sample_length, sample_num=sample_num,
        top_k=top_k, top_p=top_p, save_every=save_every, val_every=val_every, max_steps=max_steps or 0,
        max_to_keep=max_to_keep, sample_dir=samples_dir)
    out.print("Training...")
    finetune.fine_tune(trainer, enc, data, run_dir, schedule, start_step=start_step, val_batches=val_batches,
                       out=out)


def lora_start(run_dir, step, config, out):
    """The adapters saved with step `step` of `run_dir` when resuming with LoRA (a `lora.Config`,
    checked against them), else None: fresh adapters start on the saved weights."""
    import lora
    import runs

    adapters = runs.read_adapters(run_dir, step)
    if adapters is None or config is None:
        if adapters is not None:
            out.print(f"{run_dir} holds LoRA adapters, merged into its weights: training all weights now "
                      "(resume with --lora_rank to train the adapters)")
        return None
    saved = lora.Config.of_adapters(adapters)
    if saved != config:
        raise UserError(f"{run_dir} was trained with LoRA rank {saved.rank}, alpha {saved.alpha:g} and targets "
                        f"{','.join(saved.targets)}: resume with those, or start over with --restore_from fresh")
    return adapters


def check_run_name(run_name):
    """`run_name` as a str when it is one folder name, else a UserError: a run stays inside
    --checkpoint_dir and --sample_dir."""
    name = str(run_name) if isinstance(run_name, int) and not isinstance(run_name, bool) else run_name
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or os.path.isabs(name)):
        raise UserError(f"--run_name must be one folder name (not empty, no /, \\ or ..), got {run_name!r}")
    return name


def check_directory(flag, path):
    """A UserError when `path`, or the nearest part of it that exists, is not a directory: caught
    before training rather than at the first save or sample."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        also = " or --run_name" if probe == os.path.abspath(path) else ""
        raise UserError(f"{probe} is a file, so {path} cannot be a directory: choose another --{flag}{also}")


def resolve_start(restore_from, run_dir, model_name, models_dir):
    """Where the starting weights come from: (model directory, checkpoint prefix or None, step)."""
    import hf_format
    import hparams as hparams_lib
    import model_files
    import runs

    if restore_from == "latest":
        step = runs.latest_step(run_dir)
        if step is not None:
            return run_dir, os.path.join(run_dir, f"model-{step}"), step
        return hparams_lib.model_dir(model_name, models_dir), None, 0
    if restore_from == "fresh":
        return hparams_lib.model_dir(model_name, models_dir), None, 0
    path = os.path.expanduser(str(restore_from))
    if os.path.isdir(path):
        return path, None if hf_format.is_hf_dir(path) else model_files.checkpoint_prefix(path), 0
    if os.path.exists(path + ".index"):
        return os.path.dirname(path) or ".", path, 0
    raise UserError(f"--restore_from must be latest, fresh, a model directory or a checkpoint prefix; "
                    f"'{restore_from}' is none of these")


if __name__ == "__main__":
    cli.run(train)
