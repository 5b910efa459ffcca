"""The requirement files CI installs: reproducible, and with the parity tests' peers in them."""
import os
import re

import pytest

from conftest import REPO_ROOT


def entries(name):
    with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
        lines = [line.split("#")[0].strip() for line in f]
    return [line for line in lines if line]


@pytest.mark.parametrize("name", ["requirements.txt", "requirements-test.txt"])
def test_every_requirement_is_pinned(name):
    loose = [e for e in entries(name) if not re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][0-9A-Za-z.+]*", e)]
    assert not loose, f"pin these with == so CI installs are reproducible: {loose}"


def test_ci_installs_the_independent_implementation_the_parity_tests_use():
    names = {e.split("==")[0].lower() for e in entries("requirements-test.txt")}
    assert {"torch", "transformers"} <= names
