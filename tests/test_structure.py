"""The project's shape: imports point one way, and no module reaches into another's privates."""
import ast
import os

from conftest import SRC_DIR

MODULES = {name[:-3] for name in os.listdir(SRC_DIR) if name.endswith(".py")}


def parsed(module):
    with open(os.path.join(SRC_DIR, module + ".py"), encoding="utf-8") as f:
        return ast.parse(f.read())


def imports(module):
    """The project modules `module` imports anywhere, inside functions too."""
    found = set()
    for node in ast.walk(parsed(module)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found & MODULES


def is_script(module):
    return any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in parsed(module).body)


def test_imports_have_no_cycles():
    graph = {m: imports(m) for m in MODULES}
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            assert state.get(n) != "open", " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_library_modules_do_not_import_the_command_line_layer():
    library = {m for m in MODULES if not is_script(m) and m not in ("cli", "console")}
    offenders = {m: imports(m) & {"cli", "console"} for m in library}
    assert not {m: found for m, found in offenders.items() if found}


def test_the_bottom_layers_import_nothing_above_them():
    assert imports("errors") == set() and imports("runtime") == set()
    assert imports("hparams") <= {"errors"}
    assert imports("encoder") <= {"errors", "hparams"}
    assert imports("hf_format") <= {"errors", "hparams", "encoder"}
    assert imports("model_files") <= {"errors", "hparams", "encoder", "hf_format"}
    assert imports("checkpoint") <= {"errors", "hparams", "encoder", "runtime", "hf_format", "model_files"}
    assert imports("model") <= {"errors", "hparams", "encoder", "runtime", "checkpoint", "model_files"}


def test_the_litert_engine_runs_without_tensorflow():
    # So `litert_engine.preload` can pack the weights before TensorFlow loads.
    assert imports("litert_engine") <= {"errors", "hparams", "encoder", "hf_format", "model_files"}


def test_no_module_uses_another_modules_private_names():
    offenders = []
    for m in MODULES:
        for node in ast.walk(parsed(m)):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in MODULES | {"lm", "sampler", "engine"}):
                offenders.append(f"{m}: {node.value.id}.{node.attr}")
    assert not offenders
