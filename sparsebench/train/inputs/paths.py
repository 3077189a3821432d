"""Where a source's files are and how each is compressed: one place for every reader
(text, TFRecord, blocks) and the blocks writer."""

from __future__ import annotations

import glob
import zlib
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


GZIP_CHUNK = 1 << 20


def check_gzip_complete(path: Path) -> None:
    """Raise DataFileError naming `path` unless its gzip members all end where they should
    (a cut or corrupt file). TensorFlow's readers give a truncated file's readable part and
    stop; a reader that trusted them would train on part of the data and call the cut line
    malformed. Decompression only, nothing parsed: a pass over the file before timing."""
    read = 0
    try:
        with open(path, "rb") as fh:
            inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while chunk := fh.read(GZIP_CHUNK):
                read += len(chunk)
                while chunk:
                    inflate.decompress(chunk, 0)
                    chunk = inflate.unused_data if inflate.eof else b""
                    if chunk:  # a file of several members (concatenated gzips): the next one
                        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    except zlib.error as exc:
        raise DataFileError(f"{path}: corrupt gzip data after {read} bytes ({exc})") from None
    except OSError as exc:
        raise DataFileError(f"{path}: cannot be read: {exc.strerror}") from None
    if not inflate.eof:
        raise DataFileError(f"{path}: the gzip stream ends early (the file is cut short after {read} bytes); "
                            f"copy it again or leave it out")
