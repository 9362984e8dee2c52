"""Keras reliability cases on every backend (``keras_backend_reliability_cases.py``).

The Keras backend is fixed per process, so each backend runs the cases in its own
pytest subprocess. The parent reads the child's JUnit report: every case must have
run and passed on that backend; a skip in the child fails here (with its reason)
instead of vanishing behind a zero return code.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = os.path.join(HERE, "keras_backend_reliability_cases.py")


def _env(backend: str) -> dict[str, str]:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_reliability_cases_pass_on_backend(backend: str, tmp_path) -> None:
    if importlib.util.find_spec("keras") is None:
        pytest.skip("keras is not installed")
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"the {backend} backend is not installed")
    report = tmp_path / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", CASES],
        env=_env(backend),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    skipped = [
        f"{case.get('name')}: {skip.get('message')}"
        for case in suite.iter("testcase")
        for skip in case.findall("skipped")
    ]
    assert not skipped, f"cases skipped on {backend}: {skipped}"
    ran = int(suite.get("tests"))
    assert ran >= 16 and int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0, ran
