"""``start``, schedules and a user's own ``train_step`` on every Keras backend.

The backend is fixed per process: ``keras_schedule_cases.py`` runs under pytest once
per backend, in a subprocess with ``KERAS_BACKEND`` set (as ``test_keras_backends``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from test_keras_backends import BACKENDS, HERE, ROOT, _available, _env, child_skips

# The only skip the child may report, per backend.
ALLOWED_SKIPS = {"torch": ("steps_per_execution > 1",)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_and_own_step_suite(backend: str) -> None:
    """keras_schedule_cases.py passes with KERAS_BACKEND=backend."""
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-p", "no:cacheprovider", os.path.join(HERE, "keras_schedule_cases.py")],
        env=_env(backend),
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]
    assert re.search(r"\b[1-9]\d* passed", proc.stdout), proc.stdout[-3000:]  # not all skipped
    allowed = ALLOWED_SKIPS.get(backend, ())
    unexpected = [s for s in child_skips(proc.stdout) if not any(a in s[2] for a in allowed)]
    assert not unexpected, f"keras_schedule_cases.py skipped on {backend}: {unexpected}"
