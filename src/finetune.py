"""The fine-tuning loop: train, log, sample, validate and save, as the fork's train.py does.

`train.py` is its command line and `api.Model.fine_tune` its Python entry; both come here.
"""
import dataclasses
import os
import signal
import sys
import threading
import time

import numpy as np

import decode
import runs
import sample


@dataclasses.dataclass
class Schedule:
    """When the loop does what (the fork's flags). Steps count completed updates."""

    batch_size: int = 1
    sample_every: int = 100
    sample_length: int = 1023
    sample_num: int = 1
    top_k: int = 40
    top_p: float = 1.0
    save_every: int = 1000
    val_every: int = 0
    max_steps: int = 0  # stop after this step (0: run until interrupted)
    max_to_keep: int = 5
    sample_dir: str = None  # where samples-<step> files go (None: printed only)


def _warn(text):
    """Prints `text` on standard error, if anyone still reads it."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass  # stderr's reader is gone too: nobody is left to tell


class Output:
    """Where the loop's log lines and samples go. When the reader goes away (`| head`, a `| tee`
    ended by the same Ctrl-C) printing stops and training carries on, so a closed stdout never
    costs a run: it ends at --max_steps or on a signal, and saves."""

    def __init__(self, stream):
        self.stream = stream

    def print(self, *args, **kwargs):
        if self.stream is None:
            return
        try:
            print(*args, file=self.stream, flush=True, **kwargs)
        except OSError:
            self._close()

    def _close(self):
        stream, self.stream = self.stream, None
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            fd = None
        if fd == 1:
            # Later prints, and the interpreter's last flush of what stays buffered, then go nowhere
            # instead of raising BrokenPipeError.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)
        _warn("standard output is closed: training goes on without printing; it still saves")


class _StopOnSignals:
    """The first Ctrl-C or SIGTERM (how schedulers, `docker stop` and `timeout` end a job) asks the
    loop to stop after the current step and save; the run then ends normally (exit status 0). A
    second one interrupts at once (the previous save stays loadable). A signal the process was
    started ignoring (a background job's SIGINT) stays ignored."""

    SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        for other in self._previous:
            signal.signal(other, signal.default_int_handler if other == signal.SIGINT else signal.SIG_DFL)
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        _warn(f"{self.SIGNALS[signum]}: finishing this step, then saving ({again} again to quit without saving)")

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def fine_tune(trainer, encoder, data, run_dir, schedule, start_step=0, val_batches=(), out=None):
    """Trains until `schedule.max_steps`, Ctrl-C or SIGTERM, then saves; returns the losses of the steps run.

    Args:
        trainer: A `trainer.Trainer`.
        encoder: The model's encoder, for samples.
        data: A `dataset.TokenSampler` over the training tokens.
        run_dir: The run directory (prepared by `runs.prepare`), where saves go; None: no saves.
        schedule: A `Schedule`.
        start_step: Updates already done (when resuming).
        val_batches: Fixed numpy batches [B, T] for validation.
        out: An `Output` or a stream for the log and samples (default: standard output).
    """
    out = out if isinstance(out, Output) else Output(sys.stdout if out is None else out)
    lm, strategy = trainer.lm, trainer.strategy
    # Under multi-worker training, one worker writes files; the others only compute.
    writer = strategy.extended.should_checkpoint and run_dir is not None
    window = data.window_length(lm.hparams.n_ctx)
    step, saved, losses = start_step, start_step, []
    average = [0.0, 0.0]  # the fork's decaying loss average: (weighted sum, weight)
    start = time.time()
    sampler = None

    def save():
        nonlocal saved
        if writer and step != saved:
            out.print(f"Saving {os.path.join(run_dir, f'model-{step}')}")
            runs.save(run_dir, step, lm, trainer.optimizer, schedule.max_to_keep)
        saved = step

    with _StopOnSignals() as stop:
        while not stop.requested and not (schedule.max_steps and step >= schedule.max_steps):
            batches = [data.batch(schedule.batch_size, window) for _ in range(trainer.accumulate)]
            loss = trainer.train_step(batches, step)
            step += 1
            losses.append(loss)
            average = [average[0] * 0.99 + loss, average[1] * 0.99 + 1]
            out.print(f"[{step} | {time.time() - start:2.2f}] loss={loss:2.2f} avg={average[0] / average[1]:2.2f}")
            if val_batches and schedule.val_every and (step % schedule.val_every == 0 or step == 1):
                val_loss = sum(trainer.evaluate(b) for b in val_batches) / len(val_batches)
                out.print(f"[{step} | {time.time() - start:2.2f}] validation loss = {val_loss:2.2f}")
            if schedule.save_every and step % schedule.save_every == 0:
                save()
            if schedule.sample_every and schedule.sample_num and step % schedule.sample_every == 0 and writer:
                if sampler is None:
                    sampler = sample.Sampler(decode.Decoder(lm), encoder.eot_token)  # one per run: a new one retraces
                write_samples(sampler, encoder, schedule, step, out)
        save()  # still under the handlers: a first signal now does not cut the save short
    return losses


def write_samples(sampler, encoder, schedule, step, out):
    """Generates `sample_num` unconditional samples (each starts from <|endoftext|>) with a
    `sample.Sampler`, prints them to the `Output` `out` and writes them to `sample_dir/samples-<step>`."""
    texts = []
    for first in range(0, schedule.sample_num, schedule.batch_size):
        rows = min(schedule.batch_size, schedule.sample_num - first)
        chunks = sampler.generate([[encoder.eot_token]] * rows, schedule.sample_length, top_k=schedule.top_k,
                                  top_p=schedule.top_p, seed=step * 1000 + first)
        texts += [encoder.decode(row) for row in np.concatenate(list(chunks), axis=1)]
    report = "".join(f"{'=' * 8} SAMPLE {i + 1} {'=' * 8}\n{text}\n" for i, text in enumerate(texts))
    out.print(report, end="")
    if schedule.sample_dir:
        path = os.path.join(schedule.sample_dir, f"samples-{step}")
        try:
            os.makedirs(schedule.sample_dir, exist_ok=True)
            runs.write_atomically(path, report)
        except OSError as e:
            _warn(f"warning: cannot write {path}: {e.strerror or e}; training goes on")


def validation_batches(data, batch_size, batch_count, n_ctx):
    """The fork's fixed validation set: `batch_count` batches drawn once, up front."""
    window = data.window_length(n_ctx)
    return [data.batch(batch_size, window) for _ in range(batch_count)]
