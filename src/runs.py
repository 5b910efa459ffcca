"""Run directories: fine-tuning saves into `checkpoint/<run_name>/`, a model directory in the
released format, so every sampling script loads it with `--models_dir checkpoint --model_name <run_name>`.

A save writes `model-<step>.{index,data-00000-of-00001}` (the model's variables under their TF1
names), `optimizer-<step>.*` (the optimizer's state, for resuming), `counter`, and last the
`checkpoint` file that names the newest save. TensorFlow writes each bundle under a temporary
name and renames it; until `checkpoint` is replaced, readers see the previous complete save.
"""
import os
import re
import secrets

import cli  # noqa: F401  (sets TensorFlow's environment before TensorFlow loads)
import tensorflow as tf

from cli import UserError
from encoder import VOCAB_FILES
from model import to_checkpoint_layout, to_model_layout

STEP_PREFIX = re.compile(r"^model-(\d+)$")


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
    """Creates `run_dir` with the model's hparams.json and vocabulary, copied from `source_dir`."""
    os.makedirs(run_dir, exist_ok=True)
    write_atomically(os.path.join(run_dir, "hparams.json"), hparams.to_json())
    for name in VOCAB_FILES:
        source, target = os.path.join(source_dir, name), os.path.join(run_dir, name)
        if os.path.abspath(source) == os.path.abspath(target):
            continue
        if not os.path.exists(source):
            raise UserError(f"{source} is missing: download the model again with download_model.py")
        with open(source, encoding="utf-8") as f:
            write_atomically(target, f.read())


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
    names = list(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.convert_to_tensor(tensors[n]) for n in names])


def save(run_dir, step, lm, optimizer=None, max_to_keep=5):
    """Saves the model (and optimizer) as step `step`; keeps the newest `max_to_keep` saves of
    the model and only the newest optimizer state."""
    previous = [s for s in saved_steps(run_dir) if s != step]
    _save_bundle(os.path.join(run_dir, f"model-{step}"), lm.checkpoint_weights())
    if optimizer is not None:
        state = {n: to_checkpoint_layout(_slot_owner(n), v.read_value()) for n, v in optimizer.slots.items()}
        state["global_step"] = optimizer.iterations.read_value()
        _save_bundle(os.path.join(run_dir, f"optimizer-{step}"), state)
    kept = (previous + [step])[-max(1, max_to_keep):]
    write_atomically(os.path.join(run_dir, "counter"), f"{step}\n")
    write_atomically(os.path.join(run_dir, "checkpoint"), "".join(
        [f'model_checkpoint_path: "model-{step}"\n'] + [f'all_model_checkpoint_paths: "model-{s}"\n' for s in kept]))
    for old in previous:
        _remove_bundle(os.path.join(run_dir, f"optimizer-{old}"))
        if old not in kept:
            _remove_bundle(os.path.join(run_dir, f"model-{old}"))


def _remove_bundle(prefix):
    directory, base = os.path.split(prefix)
    for name in os.listdir(directory):
        if name.startswith(base + ".") and (name.endswith(".index") or ".data-" in name):
            os.unlink(os.path.join(directory, name))


def _slot_owner(slot_name):
    """The variable an optimizer slot belongs to: slots are named `<variable>/<slot>` and shaped
    like their variable, so they are saved in the checkpoint's layout as it is."""
    return slot_name.rsplit("/", 1)[0]


def restore_optimizer(run_dir, step, optimizer):
    """Loads the optimizer state saved with step `step`; False when there is none (a fresh
    optimizer then starts from zero moments)."""
    prefix = os.path.join(run_dir, f"optimizer-{step}")
    if optimizer is None or not os.path.exists(prefix + ".index"):
        return False
    reader = tf.train.load_checkpoint(prefix)
    found = reader.get_variable_to_shape_map()
    if set(optimizer.slots) - set(found):
        return False  # saved by another optimizer or with other trainable variables
    for name, variable in optimizer.slots.items():
        variable.assign(to_model_layout(_slot_owner(name), reader.get_tensor(name)))
    optimizer.iterations.assign(int(reader.get_tensor("global_step")))
    return True

