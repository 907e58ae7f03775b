"""Atomic writes and the manifests that mark a stage finished.

Every file is written to a temporary name in its own folder and renamed into place, so a crash
leaves either the old file or the new one, never half of one. A stage's manifest.json is written
last: a stage folder without one is not finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Required, TypedDict

MANIFEST = "manifest.json"


class DiskFullError(OSError):
    pass


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFullError(e.errno, f"no space left on the device while writing {path}") \
                from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or unreadable (treated as not finished)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class Artifact(TypedDict, total=False):
    """A file a stage wrote under artifacts/, as manifests and report.json list it."""

    path: Required[str]
    """Relative to the run folder."""
    format: Required[Literal["onnx", "bundle", "zip", "decoder", "dataset"]]
    """decoder: a causal LM's KV-cache ONNX decoder (the path names its model.onnx; the folder
    holds its external weights, genai_config.json and the tokenizer); dataset: text a generate
    stage wrote for the stages after it."""
    precision: Required[str | None]
    """fp32, int8 or int4."""
    model: Required[str | None]
    """The role it was made from (teacher, student, ...)."""
    bytes: Required[int]
    sha256: Required[str]
    method: str | None
    """INT8 files: qat, qat+kd, qat+self-kd or ptq."""
    int8_coverage: float
    opset: int
    input: list[str]
    output: str


class Structure(TypedDict):
    """How to rebuild a model whose structure stages changed: the role whose `source:` builds
    it, then every structural edit since, in order (models/structure.py replays them)."""

    base: str
    edits: list[dict[str, Any]]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inside(root: Path, relative: str) -> Path:
    """`root / relative`, refusing anything that would land outside `root`."""
    root = root.resolve()
    p = (root / relative).resolve()
    if p != root and root not in p.parents:
        raise ValueError(f"'{relative}' points outside the run folder {root}")
    return p
