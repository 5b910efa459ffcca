import os
import subprocess
import sys
import textwrap

import pytest

import cli

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def run_entry_point(body, quick_exit):
    """Runs a tiny fire entry point through cli.run in a fresh process."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        import cli

        def main():
            {body}

        cli.run(main, quick_exit={quick_exit})
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("quick_exit", [False, True])
def test_output_written_without_a_flush_still_arrives(quick_exit):
    done = run_entry_point('print("no newline, no flush", end="")', quick_exit)
    assert done.returncode == 0
    assert done.stdout == "no newline, no flush"


@pytest.mark.parametrize("quick_exit", [False, True])
def test_a_user_error_is_one_line_and_status_2(quick_exit):
    done = run_entry_point('print("partial", end=""); raise cli.UserError("use --length 5 or less")', quick_exit)
    assert done.returncode == 2
    assert done.stdout == "partial"
    assert done.stderr == "error: use --length 5 or less\n"


@pytest.mark.parametrize("quick_exit", [False, True])
def test_ctrl_c_exits_130_without_a_traceback(quick_exit):
    done = run_entry_point("raise KeyboardInterrupt", quick_exit)
    assert done.returncode == 130
    assert "Traceback" not in done.stderr


def test_quick_exit_skips_the_interpreters_teardown():
    done = run_entry_point('import atexit; atexit.register(lambda: print("teardown ran"))', True)
    assert done.returncode == 0 and "teardown ran" not in done.stdout
    done = run_entry_point('import atexit; atexit.register(lambda: print("teardown ran"))', False)
    assert done.returncode == 0 and "teardown ran" in done.stdout


def start_entry_point(body, quick_exit, *args):
    """Starts a tiny fire entry point through cli.run, its output on pipes."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {SRC!r})
        import cli

        def main():
            {body}

        cli.run(main, quick_exit={quick_exit})
    """)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("quick_exit", [False, True])
def test_a_reader_that_stops_reading_ends_the_run_quietly(quick_exit):
    process = start_entry_point('while True: print("line", flush=True)', quick_exit)
    assert process.stdout.readline() == b"line\n"
    process.stdout.close()  # as `| head -n 1` does
    assert process.wait(timeout=60) == 141
    assert process.stderr.read() == b""


def test_output_left_in_the_buffer_for_a_gone_reader_is_dropped_quietly():
    # The write fails only in the final flush, after the entry point returned.
    process = start_entry_point('import time; print("x" * 100); time.sleep(2)', False)
    process.stdout.close()
    assert process.wait(timeout=60) == 141
    assert process.stderr.read() == b""


def test_library_errors_name_the_flags_of_the_entry_point():
    def entry(top_k=0, length=None, batch_size=1):
        pass

    assert cli.as_flags("top_k must be a whole number >= 0", entry) == "--top_k must be a whole number >= 0"
    assert cli.as_flags("the window is 64: use length 9 or less", entry) == "the window is 64: use --length 9 or less"
    assert cli.as_flags("batch_size (3) must be a multiple of 2", entry) == "--batch_size (3) must be a multiple of 2"
    assert cli.as_flags("top_p must be in (0, 1]", entry) == "top_p must be in (0, 1]"  # not a flag of entry
    assert cli.as_flags("--top_k must be", entry) == "--top_k must be"
