"""runtime.py: TensorFlow's environment is set before it loads, and it loads quietly, once."""
import os
import subprocess
import sys
import textwrap

import pytest

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def run_python(body, **env):
    """Runs `body` in a fresh interpreter with src/ on the path; env entries set to None are unset."""
    full_env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
    code = f"import sys\nsys.path.insert(0, {SRC!r})\n" + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=full_env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_importing_runtime_or_cli_sets_the_environment_but_does_not_load_tensorflow():
    out = run_python("""
        import os, cli, runtime
        print("tensorflow" in sys.modules, os.environ["TF_CPP_MIN_LOG_LEVEL"], os.environ["TF_ENABLE_ONEDNN_OPTS"])
    """, TF_CPP_MIN_LOG_LEVEL=None, TF_ENABLE_ONEDNN_OPTS=None)
    assert out == ["False", "2", "1"]


def test_the_users_own_settings_win():
    out = run_python("""
        import os, runtime
        print(os.environ["TF_CPP_MIN_LOG_LEVEL"], os.environ["TF_ENABLE_ONEDNN_OPTS"])
    """, TF_CPP_MIN_LOG_LEVEL="0", TF_ENABLE_ONEDNN_OPTS="0")
    assert out == ["0", "0"]


def test_from_runtime_import_tf_loads_tensorflow_on_first_use():
    out = run_python("""
        import runtime
        print("tensorflow" in sys.modules)
        from runtime import tf
        print(tf is sys.modules["tensorflow"], float(tf.reduce_sum(tf.ones([3]))), "keras" in sys.modules)
    """)
    assert out == ["False", "True", "3.0", "False"]


def test_other_missing_names_are_attribute_errors():
    out = run_python("""
        import runtime
        try:
            from runtime import nothing_here
        except ImportError as e:
            print("ImportError")
    """)
    assert out == ["ImportError"]


def test_fast_start_chooses_the_allocator_before_tensorflow_loads():
    out = run_python("""
        import os, runtime
        load = runtime._import_tensorflow_without_keras
        def spy():
            print(os.environ.get("TF_ONEDNN_USE_SYSTEM_ALLOCATOR"))
            return load()
        runtime._import_tensorflow_without_keras = spy
        runtime.fast_start(system_allocator=True)
        print("tensorflow" in sys.modules)
    """, TF_ONEDNN_USE_SYSTEM_ALLOCATOR=None)
    assert out == ["1", "True"]


def test_cli_shares_the_one_error_type():
    out = run_python("""
        import cli, errors
        print(cli.UserError is errors.UserError)
    """)
    assert out == ["True"]


def test_tensorflow_starts_without_keras_and_keras_still_imports_after():
    out = run_python("""
        import runtime
        tf = runtime.import_tensorflow()
        print(float(tf.reduce_sum(tf.ones([3]))), "keras" in sys.modules)
        import keras
        print(keras.__name__, "keras.src.optimizers" in sys.modules)
    """)
    assert out == ["3.0", "False", "keras", "True"]


@pytest.mark.parametrize("importable", [True, False])
def test_the_cycle_collector_is_back_on_after_importing_tensorflow(importable):
    # Collection is paused for the import only: a process left without it would grow without bound.
    out = run_python(f"""
        import gc, runtime
        if not {importable}:
            sys.modules["tensorflow"] = None  # the import raises ImportError
        try:
            runtime._import_tensorflow_without_keras()
        except ImportError:
            pass
        print(gc.isenabled(), gc.get_freeze_count() > 100000)
    """)
    assert out == ["True", str(importable)]


def interrupted_import(error):
    """Runs an entry point through cli.run whose TensorFlow import writes a log line, then raises `error`."""
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {SRC!r})
        import cli, runtime

        def import_that_fails():
            os.write(2, b"captured start-up log line\\n")
            raise {error}

        runtime._import_tensorflow_without_keras = import_that_fails
        cli.run(lambda: runtime.import_tensorflow(), quick_exit=True)
    """)
    env = {k: v for k, v in os.environ.items() if k != "GPT2_VERBOSE_TF"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)


def test_ctrl_c_while_tensorflow_imports_prints_only_a_newline():
    done = interrupted_import("KeyboardInterrupt")
    assert done.returncode == 130
    assert done.stderr == "\n"


def test_a_failed_import_shows_the_log_that_explains_it():
    done = interrupted_import("ImportError('no libcudnn')")
    assert done.returncode != 0
    assert done.stderr.startswith("captured start-up log line\n") and "no libcudnn" in done.stderr
