"""Import hygiene, public names, typing marker and the runnable docstring examples."""

from __future__ import annotations

import doctest
import importlib.resources
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import advgraph
import advgraph._delta

FRAMEWORKS = ("torch", "tensorflow", "keras", "jax", "tf_keras")


def _run(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON object as its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_does_not_import_frameworks():
    result = _run(
        f"""
        import json, sys
        import advgraph
        frameworks = {FRAMEWORKS!r}
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(frameworks))
        missing = [n for n in advgraph.__all__ if not hasattr(advgraph, n)]

        # the numpy path of the core does not pull a framework in either
        import numpy as np
        advgraph.fgm_delta(np.array([3.0, 4.0]), 1.0, per_sample=True)
        advgraph.project(np.array([3.0, 4.0]), 1.0)
        advgraph.random_init(np.zeros(3), 1.0, rng=0)
        after_use = sorted({{m.split(".")[0] for m in sys.modules}} & set(frameworks))
        print(json.dumps({{"loaded": loaded, "missing": missing, "after_use": after_use}}))
        """
    )
    assert result["loaded"] == [], result
    assert result["after_use"] == [], result
    assert result["missing"] == [], result


def test_all_names_exist_and_are_unique():
    assert len(advgraph.__all__) == len(set(advgraph.__all__))
    for name in advgraph.__all__:
        assert hasattr(advgraph, name), name
    for name in ("fgm_delta", "compute_delta", "project", "random_init", "DeltaResult",
                 "wrap", "unwrap", "AdvGraphWarning", "__version__"):
        assert name in advgraph.__all__, name
    assert isinstance(advgraph.__version__, str) and advgraph.__version__


def test_py_typed_marker_is_installed():
    package_dir = Path(advgraph.__file__).parent
    assert (package_dir / "py.typed").is_file()
    assert importlib.resources.files("advgraph").joinpath("py.typed").is_file()


def test_py_typed_is_declared_as_package_data():
    # A wheel only carries py.typed if pyproject.toml lists it.
    pyproject = Path(advgraph.__file__).parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("advgraph is installed from a wheel: no pyproject.toml beside it")
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = None
    if tomllib is None:
        assert "py.typed" in pyproject.read_text()
        return
    config = tomllib.loads(pyproject.read_text())
    package_data = config["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data.get("advgraph", []), package_data


def _testmod(module) -> doctest.TestResults:
    return doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)


def test_doctests_delta():
    failed, attempted = _testmod(advgraph._delta)
    assert attempted >= 8, attempted  # every public function has an example
    assert failed == 0


def test_doctests_package():
    failed, attempted = _testmod(advgraph)
    assert attempted >= 1, attempted
    assert failed == 0


def test_doctests_run_with_numpy_only():
    # The examples must not need a framework: run them in a fresh interpreter.
    result = _run(
        """
        import doctest, json, sys
        import advgraph, advgraph._delta
        results = [doctest.testmod(m, optionflags=doctest.NORMALIZE_WHITESPACE)
                   for m in (advgraph._delta, advgraph)]
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "tensorflow"})
        print(json.dumps({"failed": sum(r.failed for r in results), "loaded": loaded}))
        """
    )
    assert result == {"failed": 0, "loaded": []}
