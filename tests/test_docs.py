"""The documentation site: it builds with ``mkdocs build --strict``, and every Python
block in ``docs/`` and ``README.md`` runs.

The blocks are collected with Sybil (see ``docs/about-docs.md`` for why Sybil): one
test per page runs the page's blocks in order in one namespace, as a reader would
paste them, from a temporary directory. ``<!-- invisible-code-block: python -->``
holds setup a reader does not need to see (generated data, a small model);
``<!-- skip: next "why" -->`` marks a block that cannot run stand-alone (a launcher
such as ``torchrun`` or ``deepspeed``): few, each with the reason beside it.

Keras picks its backend once per process, and this process already imported torch
and maybe TensorFlow for other tests; so the blocks that name Keras or TensorFlow run
in one subprocess for all pages, with ``KERAS_BACKEND=tensorflow`` and torch imported
first, in the order they appear, sharing one namespace.
"""

from __future__ import annotations

import importlib.util
import json
import re
import os
import subprocess
import sys
import unittest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]

pytest.importorskip("sybil", reason="the docs extra is not installed (pip install -e '.[docs]')")

from sybil import Sybil  # noqa: E402
from sybil.evaluators.python import pad  # noqa: E402
from sybil.parsers.markdown import ClearNamespaceParser, CodeBlockParser, SkipParser  # noqa: E402

KERAS_RUNNER = """
import torch  # before tensorflow, in one process
import json, sys, traceback
results = {}
for page, blocks in json.load(open(sys.argv[1])).items():
    ns = {"__name__": "__main__"}
    try:
        for path, source in blocks:
            exec(compile(source, path, "exec"), ns)
        results[page] = None
    except BaseException:
        results[page] = traceback.format_exc()[-4000:]
json.dump(results, open(sys.argv[2], "w"))
"""


def is_keras(source: str) -> bool:
    """A block that names Keras or TensorFlow (an import, or a comment saying it is Keras)."""
    return re.search(r"\b(keras|keras_hub|tensorflow)\b", source, re.I) is not None


def evaluate(example) -> None:
    __tracebackhide__ = True
    source = pad(example.parsed, example.line + example.parsed.line_offset)
    keras = is_keras(example.parsed)
    if example.namespace.get("__collect_keras__"):
        if keras:
            example.namespace.setdefault("__keras_blocks__", []).append((example.path, source))
        return
    if keras:
        return  # run by the keras_results fixture, in a subprocess
    exec(compile(source, example.path, "exec", dont_inherit=True), example.namespace)
    example.namespace.pop("__builtins__", None)


SYBIL = Sybil(parsers=[CodeBlockParser("python", evaluate), SkipParser(), ClearNamespaceParser()])


def _page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _keras_blocks(page: Path) -> list:
    """The page's Keras blocks, in order, without running anything (skip markers apply)."""
    document = SYBIL.parse(page)
    document.namespace["__collect_keras__"] = True
    for example in document.examples():
        try:
            example.evaluate()
        except unittest.SkipTest:
            pass
    return document.namespace.get("__keras_blocks__", [])


@pytest.fixture(scope="module")
def keras_results(tmp_path_factory):
    """``{page: None or the traceback}``: every page's Keras blocks, in one subprocess
    (importing TensorFlow costs 10-20 s on the 2-core machine: once, not once per page)."""
    pages = {_page_id(p): blocks for p in PAGES if (blocks := _keras_blocks(p))}
    if importlib.util.find_spec("keras") is None or importlib.util.find_spec("tensorflow") is None:
        return {page: "skip" for page in pages}
    work = tmp_path_factory.mktemp("keras_docs")
    (work / "blocks.json").write_text(json.dumps(pages))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", KERAS_RUNNER, str(work / "blocks.json"), str(work / "results.json")],
        capture_output=True, text=True, timeout=600, cwd=work, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((work / "results.json").read_text())


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch, keras_results):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    document = SYBIL.parse(page)
    for example in document.examples():
        try:
            example.evaluate()
        except unittest.SkipTest as marked:  # `<!-- skip: next "why" -->`: that block only
            print(f"{_page_id(page)}:{example.line}: not run: {marked}")
    error = keras_results.get(_page_id(page))
    if error == "skip":
        pytest.skip("keras / tensorflow are not installed: the page's Keras blocks did not run")
    assert error is None, f"a Keras block of {_page_id(page)} failed:\n{error}"


def test_mkdocs_build_strict(tmp_path):
    """The site builds offline with no warning (a broken link or reference fails it)."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("the docs extra is not installed (pip install -e '.[docs]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "WARNING" not in result.stderr, result.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").exists()
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("advgraph.wrap", "advgraph.methods.PGD", "AdversarialTrainerMixin", "adversarial_step"):
        assert name in api, name
    pgd = (tmp_path / "site" / "methods" / "pgd" / "index.html").read_text(encoding="utf-8")
    assert "random_init" in pgd and "4 pass(es) per step" in pgd  # the generated knob table


def test_every_promise_names_tests_that_exist():
    """docs/promises.md lists, under each promise, the tests that check it: every
    promise names at least one, and each named ``file::test`` is a test function of
    that file under ``tests/`` (a renamed or deleted test fails here)."""
    text = (ROOT / "docs" / "promises.md").read_text(encoding="utf-8")
    promised = text.split("## Promised", 1)[1].split("\n## ", 1)[0]
    promises = [p for p in re.split(r"^- ", promised, flags=re.M)[1:]]
    assert len(promises) >= 10, len(promises)
    for promise in promises:
        title = promise.split(".**", 1)[0].strip("*")
        assert "*Tested by:*" in promise, f"promise {title!r} names no test"
        named = re.findall(r"`([\w/]+\.py)::(\w+)`", promise.split("*Tested by:*", 1)[1])
        assert named, f"promise {title!r} names no `file::test`"
        for path, test in named:
            source = ROOT / "tests" / path
            assert source.is_file(), f"{title!r}: tests/{path} does not exist"
            assert re.search(rf"^\s*def {test}\(", source.read_text(encoding="utf-8"), re.M), (
                f"{title!r}: tests/{path} has no test {test}"
            )
