"""Run directories: fine-tuning saves into `checkpoint/<run_name>/`, a model directory in the
released format, so every sampling script loads it with `--models_dir checkpoint --model_name <run_name>`.

A save writes `model-<step>.{index,data-00000-of-00001}` (the model's variables under their TF1
names; under LoRA the weights with the adapters merged in, written in parts of PART_BYTES, one data
file each), `optimizer-<step>.*` (the optimizer's
state, for resuming), `lora-<step>.*` (LoRA's adapters, for resuming), then the `checkpoint` file
that names the newest save, and last `counter`. TensorFlow writes each bundle under a temporary
name and renames it; until `checkpoint` is replaced, readers see the previous complete save.
What a killed or failed save leaves behind is removed by the next `prepare` of the directory.
"""
import os
import re
import secrets

import numpy as np

import lora
from checkpoint import CheckpointWeights, to_checkpoint_layout, to_model_layout
from errors import UserError
from encoder import VOCAB_FILES, vocab_texts
from runtime import tf

STEP_PREFIX = re.compile(r"^model-(\d+)$")
# A bundle's files, TensorFlow's temporary names for them (`<file>.tempstate<digits>`), and the parts
# a bundle read tensor by tensor is written in before they are merged (`<bundle>.part-<i>-of-<n>.<file>`).
BUNDLE_FILE = re.compile(r"^(model|optimizer|lora)-(\d+)(\.part-\d+-of-\d+)?\.(index|data-\d+-of-\d+)"
                         r"(\.tempstate\d+)?$")
# Bytes of float32 tensors a bundle read tensor by tensor holds in memory at once while it is written.
PART_BYTES = 1 << 30
# write_atomically's temporary names.
TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")


def write_atomically(path, text):
    """Writes `text` to `path` through a temporary file in the same directory and a rename. The
    file gets the mode the user's umask gives, as TensorFlow's bundles do."""
    directory, base = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def prepare(run_dir, source_dir, hparams):
    """Creates `run_dir` with the model's hparams.json and vocabulary, copied from `source_dir`,
    and removes what an interrupted save left there."""
    os.makedirs(run_dir, exist_ok=True)
    remove_leftovers(run_dir)
    write_atomically(os.path.join(run_dir, "hparams.json"), hparams.to_json())
    if os.path.abspath(source_dir) == os.path.abspath(run_dir):
        return
    for text, name in zip(vocab_texts(source_dir), VOCAB_FILES):
        write_atomically(os.path.join(run_dir, name), text)


def saved_steps(run_dir):
    """Steps of the saves the `checkpoint` file lists, oldest first; the last is the newest."""
    state = tf.train.get_checkpoint_state(run_dir) if os.path.isdir(run_dir) else None
    if state is None:
        return []
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    if state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    steps = []
    for path in paths:
        match = STEP_PREFIX.match(os.path.basename(path))
        if match and int(match.group(1)) not in steps:
            steps.append(int(match.group(1)))
    newest = STEP_PREFIX.match(os.path.basename(state.model_checkpoint_path))
    if newest:
        steps.remove(int(newest.group(1)))
        steps.append(int(newest.group(1)))
    return steps


def latest_step(run_dir):
    """The step of the newest save in `run_dir`, or None when there is none."""
    steps = saved_steps(run_dir)
    return steps[-1] if steps else None


def _save_bundle(prefix, tensors):
    """Writes `tensors` (name -> value) as the bundle `prefix`. A mapping that reads its values on
    lookup (one with `shapes`, as `lora.MergedWeights`) is written in parts of at most PART_BYTES
    of float32 values, merged into one bundle (one data file per part), so it is never read whole."""
    shapes = getattr(tensors, "shapes", None)
    groups, size = [[]], 0
    for name in tensors:
        nbytes = 4 * int(np.prod(shapes[name])) if shapes is not None else 0
        if groups[-1] and size + nbytes > PART_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    parts = [prefix if len(groups) == 1 else f"{prefix}.part-{i:05d}-of-{len(groups):05d}" for i in range(len(groups))]
    for part, names in zip(parts, groups):
        tf.raw_ops.SaveV2(prefix=part, tensor_names=names, shape_and_slices=[""] * len(names),
                          tensors=[tf.convert_to_tensor(tensors[n]) for n in names])
    if len(parts) > 1:
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=parts, destination_prefix=prefix, delete_old_dirs=False)


def save(run_dir, step, lm, optimizer=None, max_to_keep=5):
    """Saves the model (and optimizer, and a `lora.LoraGPT2`'s adapters) as step `step`; keeps the
    newest `max_to_keep` saves of the model and only the newest optimizer state and adapters. A
    failed write (a full disk) removes what it wrote and is a UserError; the previous save stays
    the newest."""
    previous = [s for s in saved_steps(run_dir) if s != step]
    kept = (previous + [step])[-max(1, max_to_keep):]
    try:
        _save_bundle(os.path.join(run_dir, f"model-{step}"), lm.checkpoint_weights())
        if optimizer is not None:
            state = {n: _slot_layout(to_checkpoint_layout, n, v.read_value(), lm.compute_dtype)
                     for n, v in optimizer.slots.items()}
            state["global_step"] = optimizer.iterations.read_value()
            _save_bundle(os.path.join(run_dir, f"optimizer-{step}"), state)
        if isinstance(lm, lora.LoraGPT2):
            adapters = lm.adapter_values()
            _save_bundle(os.path.join(run_dir, f"lora-{step}"), adapters)
        write_atomically(os.path.join(run_dir, "checkpoint"), "".join([f'model_checkpoint_path: "model-{step}"\n'] + [
            f'all_model_checkpoint_paths: "model-{s}"\n' for s in kept]))
        write_atomically(os.path.join(run_dir, "counter"), f"{step}\n")
        if isinstance(lm, lora.LoraGPT2):
            lm.rebase(CheckpointWeights(run_dir, lm.hparams, prefix=os.path.join(run_dir, f"model-{step}")), adapters)
    except (OSError, tf.errors.OpError) as e:
        if step not in saved_steps(run_dir):
            _remove_bundle(run_dir, lambda kind, s, partial: s == step)
        remove_leftovers(run_dir)
        newest = latest_step(run_dir)
        then = "run again" if newest is None else f"run again to resume from model-{newest}, the newest save"
        raise UserError(f"cannot save {os.path.join(run_dir, f'model-{step}')}: {_reason(e)}; "
                        f"free some space (or fix the cause), then {then}") from None
    _remove_bundle(run_dir, lambda kind, s, partial: s in previous and (kind != "model" or s not in kept))


def remove_leftovers(run_dir):
    """Removes what a killed or failed save left in `run_dir`: temporary files, and bundles no
    resume reads (model saves newer than the newest listed one and never listed, optimizer states
    and adapters of other steps than the newest)."""
    steps = saved_steps(run_dir)
    newest = steps[-1] if steps else -1
    _remove_bundle(run_dir, lambda kind, s, partial: partial or (
        s > newest and s not in steps if kind == "model" else s != newest))
    for name in os.listdir(run_dir):
        if TEMPORARY.match(name):
            os.unlink(os.path.join(run_dir, name))


def _remove_bundle(run_dir, chosen):
    """Removes the bundle files for which `chosen(kind, step, partial)` holds ("model" or
    "optimizer"; partial: a TensorFlow temporary file)."""
    for name in os.listdir(run_dir):
        match = BUNDLE_FILE.match(name)
        if match and chosen(match.group(1), int(match.group(2)), bool(match.group(3) or match.group(5))):
            os.unlink(os.path.join(run_dir, name))


def _reason(error):
    """An OSError's or TensorFlow error's reason, such as 'No space left on device'."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    lines = (error.message or "").strip().splitlines()
    # TensorFlow's form: "{{function_node ...}} <file>; <reason> [Op:SaveV2]"
    return re.sub(r"\s*\[Op:\w+\]$", "", lines[0]).rsplit("; ", 1)[-1] if lines else type(error).__name__


def _slot_owner(slot_name):
    """The variable an optimizer slot belongs to: slots are named `<variable>/<slot>`."""
    return slot_name.rsplit("/", 1)[0]


def _slot_layout(convert, slot_name, value, compute_dtype):
    """A slot converted between layouts by `convert` when it is shaped like its matrix; Adafactor's
    factored rows and columns are indexed by the released layout already."""
    if value.shape.rank == 1:
        return value
    return convert(_slot_owner(slot_name), value, compute_dtype)


def read_adapters(run_dir, step):
    """The LoRA adapters saved with step `step` (name -> tensor, `lora.ALPHA` included), or None."""
    prefix = os.path.join(run_dir, f"lora-{step}")
    if not os.path.exists(prefix + ".index"):
        return None
    reader = tf.train.load_checkpoint(prefix)
    return {name: tf.constant(reader.get_tensor(name)) for name in reader.get_variable_to_shape_map()}


def restore_optimizer(run_dir, step, optimizer, compute_dtype=tf.float32):
    """Loads the optimizer state saved with step `step` into the layout of a model multiplying
    in `compute_dtype`; False when there is none (a fresh optimizer then starts from zero moments)."""
    prefix = os.path.join(run_dir, f"optimizer-{step}")
    if optimizer is None or not os.path.exists(prefix + ".index"):
        return False
    reader = tf.train.load_checkpoint(prefix)
    found = reader.get_variable_to_shape_map()
    if set(optimizer.slots) - set(found):
        return False  # saved by another optimizer or with other trainable variables
    for name, variable in optimizer.slots.items():
        variable.assign(_slot_layout(to_model_layout, name, tf.constant(reader.get_tensor(name)), compute_dtype))
    optimizer.iterations.assign(int(reader.get_tensor("global_step")))
    return True
