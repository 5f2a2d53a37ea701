"""A real-text classification set built from installed packages' docstrings (no download, deterministic).

Each sample is the first paragraph of one docstring (module, class or function) of an installed library's
source, read with :mod:`ast` (nothing is imported); the label is the library it comes from. Tokens are
lower-case words, numbers and punctuation marks; the vocabulary is built at run time from the training
split only (``<pad>`` = 0, ``<unk>`` = 1). Files are read in sorted order, so the set depends only on the
installed package versions and the seed.

.. code-block:: python

    data = docstring_classes(seed=0)          # TextSplits: train / val / test batches, vocab, labels
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["DEFAULT_PACKAGES", "TextSplits", "docstring_classes", "package_docstrings", "tokenize"]

DEFAULT_PACKAGES: tuple[str, ...] = ("numpy", "scipy", "sklearn", "sympy", "networkx", "matplotlib")
_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
Batches = list[tuple[Tensor, Tensor]]


def tokenize(text: str) -> list[str]:
    """Lower-case words, numbers and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n", 1)[0].split())


@functools.cache
def package_docstrings(package: str, min_words: int = 5) -> tuple[str, ...]:
    """First paragraphs of every docstring in ``package``'s sources (sorted files, no tests; cached).

    Raises:
        ValueError: when ``package`` is not installed as a package directory.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not an installed package directory")
    root = Path(next(iter(spec.submodule_search_locations)))
    seen: set[str] = set()
    texts: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if "tests" in path.relative_to(root).parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                text = _first_paragraph(doc) if doc else ""
                if len(text.split()) >= min_words and text not in seen:
                    seen.add(text)
                    texts.append(text)
    return tuple(texts)


@dataclass(frozen=True)
class TextSplits:
    """Token-id batches of the three splits.

    Attributes:
        train / val / test: ``(ids [B, seq_len], labels [B])`` batches.
        vocab: the tokens, index = id (``<pad>``, ``<unk>`` first).
        labels: the package of each class index.
    """

    train: Batches
    val: Batches
    test: Batches
    vocab: tuple[str, ...]
    labels: tuple[str, ...]


def _encode(texts: list[str], index: dict[str, int], seq_len: int) -> Tensor:
    out = torch.zeros(len(texts), seq_len, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [index.get(t, 1) for t in tokenize(text)[:seq_len]]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _batches(x: Tensor, y: Tensor, size: int) -> Batches:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def docstring_classes(
    seed: int,
    packages: tuple[str, ...] = DEFAULT_PACKAGES,
    per_class: int = 1200,
    seq_len: int = 24,
    vocab_size: int = 2000,
    split: tuple[int, int] = (800, 150),
    batch_size: int = 64,
) -> TextSplits:
    """Balanced "which library is this docstring from" set: ``per_class`` texts per package, seeded split.

    Args:
        seed: picks the texts of each class and their train / val / test split.
        packages: the classes.
        per_class: texts drawn per package (fewer if the package has fewer).
        seq_len: tokens kept per text (shorter ones padded with 0).
        vocab_size: most frequent training tokens kept (others map to ``<unk>``).
        split: training and validation texts per class; the rest of ``per_class`` is the test split.
        batch_size: batch size of every split.

    Raises:
        ValueError: for a split that does not fit in ``per_class``.
    """
    if split[0] <= 0 or split[1] <= 0 or sum(split) >= per_class:
        raise ValueError(f"split {split} must be two positive counts summing below per_class={per_class}")
    gen = torch.Generator().manual_seed(seed)
    parts: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, package in enumerate(packages):
        texts = package_docstrings(package)
        picked = [texts[i] for i in torch.randperm(len(texts), generator=gen)[:per_class].tolist()]
        a, b = split[0], split[0] + split[1]
        for name, chunk in (("train", picked[:a]), ("val", picked[a:b]), ("test", picked[b:])):
            parts[name].extend((t, label) for t in chunk)
    counts = Counter(tok for text, _ in parts["train"] for tok in tokenize(text))
    vocab = ("<pad>", "<unk>", *(t for t, _ in counts.most_common(vocab_size - 2)))
    index = {t: i for i, t in enumerate(vocab)}
    out: dict[str, Batches] = {}
    for name, items in parts.items():
        order = torch.randperm(len(items), generator=gen).tolist()
        x = _encode([items[i][0] for i in order], index, seq_len)
        y = torch.tensor([items[i][1] for i in order], dtype=torch.long)
        out[name] = _batches(x, y, batch_size)
    return TextSplits(out["train"], out["val"], out["test"], vocab, packages)
