"""The typed config and finding model directories."""
import json
import os

import pytest

import hparams
from errors import UserError


def test_missing_keys_are_named_instead_of_defaulting_to_124M(tmp_path):
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps({"n_vocab": 50257, "n_ctx": 64, "n_embd": 32, "n_head": 4}))
    with pytest.raises(UserError, match="lacks n_layer"):
        hparams.HParams.from_json(str(path))


@pytest.mark.parametrize("on_disk,asked", [("117M", "117M"), ("117M", "124M"), ("124M", "117M"), ("345M", "355M")])
def test_a_model_is_found_under_its_legacy_or_current_name(tmp_path, on_disk, asked):
    (tmp_path / on_disk).mkdir()
    assert hparams.model_dir(asked, str(tmp_path)) == os.path.join(str(tmp_path), on_disk)


def test_a_missing_model_says_how_to_download_it(tmp_path):
    with pytest.raises(UserError, match="download_model.py 124M"):
        hparams.model_dir("117M", str(tmp_path))
