"""conftest.run_main, which the script tests use in place of a fresh process, gives what one gives."""
import textwrap

import pytest

from conftest import SRC_DIR, run_main, run_script

ENTRY_POINT = textwrap.dedent("""
    import logging
    import os
    import warnings

    import cli

    def main(mode: str = "ok"):
        print("read:", input("prompt> "))
        warnings.warn("a warning")
        logging.getLogger("some.library").warning("a log record")
        os.write(2, b"a line written to the file descriptor\\n")
        if mode == "bad":
            raise cli.UserError("mode must be ok")
        if mode == "crash":
            raise ValueError("a bug")

    if __name__ == "__main__":
        cli.run(main, quick_exit=True)
""")


@pytest.mark.parametrize("mode", ["ok", "bad", "crash"])
def test_run_main_gives_a_fresh_processs_status_and_output(tmp_path, mode):
    script = tmp_path / "entry.py"
    script.write_text(ENTRY_POINT, encoding="utf-8")
    fresh = run_script(str(script), "--mode", mode, stdin="typed\n", env={"PYTHONPATH": SRC_DIR})
    here = run_main(str(script), "--mode", mode, stdin="typed\n")
    assert (here.returncode, here.stdout) == (fresh.returncode, fresh.stdout) == (
        {"ok": 0, "bad": 2, "crash": 1}[mode], "prompt> read: typed\n")
    if mode == "crash":  # the frames above the entry point differ
        assert here.stderr.startswith(fresh.stderr.split("Traceback")[0] + "Traceback")
        assert here.stderr.endswith("ValueError: a bug\n") and fresh.stderr.endswith("ValueError: a bug\n")
    else:
        assert here.stderr == fresh.stderr
        assert len(fresh.stderr.splitlines()) == 4 + (mode == "bad")  # the warning takes two
