"""Where a source's files are and how each is compressed: one place for every reader
(text, TFRecord, blocks) and the blocks writer."""

from __future__ import annotations

import glob
from pathlib import Path


class DataFileError(ValueError):
    """A source that cannot be used at all (no file matches, unreadable)."""


def source_files(pattern: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(pattern)) if any(c in pattern for c in "*?[") else [Path(pattern)]
    files = [f for f in files if f.is_file()]
    if not files:
        raise DataFileError(f"{pattern}: no such file")
    return files


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"
