"""``advgraph demo --methods`` offers gp, r3f, smart, neftune and awp (PyTorch)."""

from __future__ import annotations

import importlib.util

import pytest

from advgraph._demo.settings import DEFAULT_METHODS, DEMO_METHODS, DemoError, DemoSettings
from test_demo import run_cli, write_tsv

NEW = ("gp", "r3f", "smart", "neftune", "awp")


def test_demo_offers_the_new_methods_but_keeps_the_short_default():
    assert set(NEW) <= set(DEMO_METHODS)
    assert not set(NEW) & set(DEFAULT_METHODS)
    assert DemoSettings().methods == DEFAULT_METHODS


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_demo_trains_each_new_method_torch(tmp_path):
    tsv = write_tsv(tmp_path / "d.tsv", n=120)
    result = run_cli("demo", "--data", str(tsv), "--methods", "none," + ",".join(NEW), "--seeds", "1", "--epochs", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = [line.split()[0] for line in lines[header + 2 : header + 2 + 1 + len(NEW)]]
    assert rows == ["none", *NEW]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_demo_rejects_neftune_in_matrix_mode_early():
    from advgraph._demo import torch_runner

    with pytest.raises(DemoError, match="neftune"):
        torch_runner.check_methods(DemoSettings(mode="matrix", methods=("none", "fgm", "neftune")))
    torch_runner.check_methods(DemoSettings(mode="matrix", methods=("gp", "r3f", "smart", "awp")))
