"""Shared test setup: the scripts live in src/ and import each other as top-level modules."""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC_DIR = os.path.join(REPO_ROOT, "src")
if SRC_DIR not in sys.path:
    sys.path.insert(0, SRC_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
