"""The fine-tuning loop in process: samples come from one sampler per run."""
import io
import sys

import numpy as np
import tensorflow as tf

import checkpoint
import dataset
import finetune
import runs
import sample
import trainer
from conftest import TINY_HPARAMS
from encoder import DEFAULT_VOCAB_DIR, Encoder
from hparams import HParams

HP = HParams(**TINY_HPARAMS)


def test_two_sample_rounds_share_one_sampler(tmp_path, monkeypatch):
    made = []

    class CountedSampler(sample.Sampler):
        def __init__(self, engine, eot_token):
            super().__init__(engine, eot_token)
            made.append(self)

    monkeypatch.setattr(sample, "Sampler", CountedSampler)
    monkeypatch.setitem(sys.modules, "api", None)  # finetune must not import api: api imports finetune
    strategy = tf.distribute.get_strategy()
    t = trainer.Trainer(trainer.build_model(HP, checkpoint.random_weights(HP, seed=5), strategy), strategy)
    enc = Encoder.from_dir(DEFAULT_VOCAB_DIR)
    data = dataset.TokenSampler([np.arange(100, 140, dtype=np.int32)], seed=1)
    run_dir = str(tmp_path / "run1")
    runs.prepare(run_dir, DEFAULT_VOCAB_DIR, HP)
    schedule = finetune.Schedule(sample_every=1, sample_length=12, sample_num=1, save_every=0, max_steps=2,
                                 sample_dir=str(tmp_path / "samples"))
    log = io.StringIO()
    finetune.fine_tune(t, enc, data, run_dir, schedule, out=log)

    assert log.getvalue().count("======== SAMPLE 1 ========") == 2
    for step in (1, 2):
        assert (tmp_path / "samples" / f"samples-{step}").read_text().startswith("======== SAMPLE 1 ========")
    assert len(made) == 1
