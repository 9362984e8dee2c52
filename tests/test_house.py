"""The shape of the code base the method layer promises (issue "Methods as objects")."""

from __future__ import annotations

import ast
import inspect
import pathlib

import advgraph
from advgraph.methods import _site

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _relative_imports(folder: pathlib.Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):  # module level and inside functions
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
        graph[path.stem] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found = []

    def walk(node: str, stack: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in stack:
                found.append(stack[stack.index(dep):] + [dep])
            elif len(stack) < len(graph):
                walk(dep, stack + [dep])

    for node in graph:
        walk(node, [node])
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"a"}}) and not _cycles({"a": {"b"}, "b": set()})


def test_no_import_cycle_in_the_adapters_or_the_methods():
    for folder in ("adapters/torch", "adapters/keras", "advgraph/methods"):
        assert _cycles(_relative_imports(ROOT / folder)) == [], folder


def test_no_file_in_the_advgraph_package_is_over_500_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "advgraph").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}


def test_config_knows_no_method_setting():
    text = (ROOT / "advgraph" / "_config.py").read_text()
    for knob in ("smart_mu", "neftune_alpha", "adv_lr", "r3f_lambda", "init_mag", "vat_weight"):
        assert knob not in text, knob


def test_site_protocol_is_no_longer_than_before_the_method_layer():
    calls = [n for n, v in vars(_site.Site).items() if inspect.isfunction(v) and not n.startswith("_")]
    assert len(calls) <= 11, calls  # the eleven calls of the private protocol it replaced


def test_every_builtin_method_lives_in_its_own_module():
    for cls in advgraph.methods.BUILTIN.values():
        module = cls.__module__.rsplit(".", 1)[-1]
        allowed = ("fgm",) if cls.name == "fgsm" else ()  # FGSM is FGM's sign step
        assert module.startswith("_") and module[1:] in (cls.name, *allowed), (cls, module)


def test_keras_backends_are_symmetric_one_module_each_behind_one_interface():
    """One module per Keras backend, holding its sites and its step, each exporting the
    declared interface (read from the source: no backend is imported here)."""
    adapter = (ROOT / "adapters" / "keras" / "_adapter.py").read_text()
    backends = ast.literal_eval(adapter.split("_BACKENDS = ", 1)[1].split("\n", 1)[0])
    interface = ast.literal_eval(adapter.split("BACKEND_INTERFACE = ", 1)[1].split("\n", 1)[0])
    assert sorted(backends) == ["jax", "tensorflow", "torch"]
    for module in backends.values():
        tree = ast.parse((ROOT / "adapters" / "keras" / f"{module}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        exported = next(
            ast.literal_eval(n.value) for n in tree.body
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__all__"
        )
        for name in interface:
            assert name in defined and name in exported, (module, name)
    assert not (ROOT / "adapters" / "keras" / "_site.py").exists()  # TF's sites live in _tf.py


def test_every_package_is_listed_for_the_wheel():
    """pyproject lists packages explicitly: a new sub-package left out would be missing
    from a (non-editable) wheel although every editable-install test passes."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {name: ROOT / path for name, path in config["package-dir"].items()}
    found = set()
    for name, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            parts = init.parent.relative_to(folder).parts
            if "__pycache__" not in parts:
                found.add(".".join((name, *parts)))
    assert found - listed == set()
