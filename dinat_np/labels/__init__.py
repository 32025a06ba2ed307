"""Class-name lists shipped with the package, and the one reader of label files.

A label file has one class per line: ``index<TAB>synset<TAB>label`` (the packaged ImageNet lists, e.g.
``281<TAB>n02123045<TAB>tabby, tabby cat``) or ``index<TAB>label``. Lines may come in any order; the
indices must be exactly 0..N-1. Blank lines are ignored.

This module only uses the standard library, so reading labels never loads NumPy.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["label_set_names", "load_label_set", "packaged_labels", "read_label_file"]

_DIRECTORY = Path(__file__).resolve().parent
# Number of classes of each packaged set, so a model head can be matched without reading the files.
_SIZES = {"imagenet1k": 1000, "imagenet22k": 21841}


def read_label_file(path: str | os.PathLike) -> list[str]:
    """Class names by index from a label file (see the module docstring for the format).

    Raises:
        OSError: the file cannot be read.
        ValueError: a malformed line, a repeated index, or indices that are not 0..N-1 (the message
            names the file and, where it applies, the line).
    """
    by_index: dict[int, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            index = parts[0].strip()
            if len(parts) not in (2, 3) or not (index.isascii() and index.isdigit()):
                raise ValueError(f"{path}:{line_number}: expected 'index<TAB>[synset<TAB>]label'")
            if int(index) in by_index:
                raise ValueError(f"{path}:{line_number}: class index {int(index)} appears twice")
            by_index[int(index)] = parts[-1]
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"{path}: class indices are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def label_set_names() -> list[str]:
    """Names of the packaged label sets (``"imagenet1k"``, ``"imagenet22k"``)."""
    return sorted(path.stem for path in _DIRECTORY.glob("*.tsv"))


def load_label_set(name: str) -> list[str]:
    """Class names of a packaged label set, by class index.

    Raises:
        ValueError: no packaged set has that name, or its file is malformed.
    """
    known = label_set_names()
    if name not in known:
        raise ValueError(f"unknown label set {name!r} (packaged: {', '.join(known) or 'none'})")
    return read_label_file(_DIRECTORY / f"{name}.tsv")


def packaged_labels(num_classes: int) -> list[str] | None:
    """The packaged label set with exactly ``num_classes`` classes, or None if there is none."""
    for name, size in _SIZES.items():
        if size == num_classes and (_DIRECTORY / f"{name}.tsv").is_file():
            labels = load_label_set(name)
            return labels if len(labels) == num_classes else None
    return None
