"""Every entry point run through cli.run checks its flags before doing any work."""
import glob
import os

import pytest

import cli
from conftest import REPO_ROOT, run_script
from errors import UserError

ENTRY_POINTS = sorted(os.path.relpath(path, REPO_ROOT)
                      for path in glob.glob(f"{REPO_ROOT}/src/*.py") + glob.glob(f"{REPO_ROOT}/*.py")
                      if "cli.run(" in open(path, encoding="utf-8").read() and not path.endswith("cli.py"))


def sample_model(prompt=None, model_name="124M", top_k=0, stop_at_eot=False, max_steps=None):
    """Stands in for an entry point."""


def test_every_entry_point_is_found():
    assert {"src/generate_unconditional_samples.py", "src/train.py", "src/encode.py", "download_model.py"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_a_mistyped_flag_stops_every_entry_point_at_once(script, tmp_path):
    result = run_script(script, "--model_nam", "124M", "--models_dir", tmp_path, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "error: unknown flag --model_nam (did you mean --model_name?)\n"
    assert result.stdout == "" and os.listdir(tmp_path) == []


@pytest.mark.parametrize("args", [
    ["--top_k", "40"], ["--top_k=40"], ["--top-k", "40"], ["--top_k", "-1"], ["-t", "5"], ["--stop_at_eot"],
    ["--nostop_at_eot"], ["--max-steps=3"], ["Hello", "--", "--trace"], ["--topk", "--help"], ["-h"],
])
def test_flags_as_fire_spells_them_pass(args):
    cli.check_flags(sample_model, args)


@pytest.mark.parametrize("args,message", [
    (["--topk", "40"], "unknown flag --topk (did you mean --top_k?)"),
    (["--max_step=3"], "unknown flag --max_step (did you mean --max_steps?)"),
    (["--no_stop_at_eot"], "unknown flag --no_stop_at_eot (did you mean --nostop_at_eot?)"),
    (["--notop_k"], "unknown flag --notop_k (did you mean --top_k?)"),
    (["-x"], "unknown flag -x (--help lists the flags)"),
    (["--trace", "--", "--verbose"], "unknown flag --trace (--help lists the flags)"),
])
def test_unknown_flags_name_the_nearest_real_one(args, message):
    with pytest.raises(UserError) as raised:
        cli.check_flags(sample_model, args)
    assert str(raised.value) == message


def test_a_typo_ends_an_endless_run_before_it_starts(tiny_models_dir):
    # Without the check this run would sample forever and time out.
    result = run_script("generate_unconditional_samples.py", "--model_name", "tiny", "--models_dir", tiny_models_dir,
                        "--topk", 40, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: unknown flag --topk (did you mean --top_k?)\n"
