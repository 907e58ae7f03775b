"""Resolve `source:` strings ('file.py:callable', 'package.module:callable') to callables.

A pipeline file can make compresskit import code only through these explicit sources.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compresskit.engine.artifacts import sha256_file


class SourceError(Exception):
    """A source that does not resolve; the message says why and what to do."""


@dataclass(frozen=True)
class SourceSpec:
    module: str
    """A file path ('models/digits.py') or a dotted module ('mypkg.models')."""
    attr: str
    is_file: bool


def parse_spec(spec: str) -> SourceSpec:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise SourceError(
            f"'{spec}' is not a source: write 'path/to/file.py:callable' or "
            "'package.module:callable'")
    if not attr.replace("_", "a").replace(".", "a").isalnum():
        raise SourceError(f"'{attr}' in '{spec}' is not a Python name")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    return SourceSpec(module=target, attr=attr, is_file=is_file)


def resolve_path(relative: str, base_dir: Path) -> Path | None:
    """A path relative to the pipeline file's folder first, then the working directory."""
    p = Path(relative).expanduser()
    if p.is_absolute():
        return p if p.exists() else None
    for candidate in (base_dir / p, Path.cwd() / p):
        if candidate.exists():
            return candidate.resolve()
    return None


def locate(relative: str, base_dir: Path, what: str) -> Path:
    """`resolve_path`, or a SourceError saying where it looked."""
    path = resolve_path(relative, base_dir)
    if path is None:
        raise SourceError(f"{what} '{relative}' not found (looked in {base_dir} and "
                          f"{Path.cwd()})")
    return path


def _user_error(exc: BaseException, path: str) -> str:
    """Their exception and the line of their file that raised it (not our frames)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    where = f" (line {frames[-1].lineno}: {frames[-1].line})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


_IMPORTED: dict[Path, str] = {}
"""User file -> the module name its current content was imported under."""


def _import_file(path: Path) -> Any:
    """The user's file as a module, imported once per content: after an edit, a long-lived
    process (the Python API in a loop) imports it again instead of reusing the old module."""
    try:
        content = hashlib.sha1(path.read_bytes()).hexdigest()
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror}") from None
    name = "compresskit_user_" + hashlib.sha1(f"{path}\0{content}".encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    stale = _IMPORTED.pop(path, None)
    if stale is not None:
        sys.modules.pop(stale, None)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SourceError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # Let the user's file import its siblings, as it would when run as a script.
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise SourceError(f"importing {path} failed: {_user_error(e, str(path))}") from None
    finally:
        sys.path.remove(str(path.parent))
    _IMPORTED[path] = name
    return module


def resolve(spec: str, base_dir: Path) -> Callable[..., Any]:
    """The callable named by `spec`, or SourceError saying exactly what is missing."""
    parsed = parse_spec(spec)
    if parsed.is_file:
        path = locate(parsed.module, base_dir, "file")
        module = _import_file(path)
        where = str(path)
    else:
        try:
            module = importlib.import_module(parsed.module)
        except ModuleNotFoundError as e:
            if e.name and parsed.module.startswith(e.name):
                raise SourceError(f"module '{parsed.module}' is not installed or not on the "
                                  "Python path") from None
            raise SourceError(f"importing {parsed.module} failed: {type(e).__name__}: {e}") \
                from None
        except Exception as e:
            raise SourceError(f"importing {parsed.module} failed: {type(e).__name__}: {e}") \
                from None
        where = parsed.module
    obj: Any = module
    for part in parsed.attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_")
                      and callable(getattr(module, n, None))]
            from compresskit.registry import did_you_mean

            raise SourceError(f"{where} has no '{parsed.attr}'{did_you_mean(part, public)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SourceError(f"'{parsed.attr}' in {where} is not callable")
    return obj  # type: ignore[no-any-return]


def resolve_attr(spec: str, base_dir: Path) -> Any:
    """Any attribute named by 'module:attr' or 'file.py:attr' (a value, not only a callable)."""
    parsed = parse_spec(spec)
    if parsed.is_file:
        module = _import_file(locate(parsed.module, base_dir, "file"))
    else:
        try:
            module = importlib.import_module(parsed.module)
        except ImportError as e:
            raise SourceError(f"cannot import {parsed.module}: {e}") from None
    obj: Any = module
    for part in parsed.attr.split("."):
        if not hasattr(obj, part):
            raise SourceError(f"{parsed.module} has no '{parsed.attr}'")
        obj = getattr(obj, part)
    return obj


def call_user(fn: Callable[..., Any], kwargs: dict[str, Any], what: str) -> Any:
    """Call a user's factory; their exception becomes a SourceError naming it and its line."""
    import inspect

    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise SourceError(f"{what} does not take kwargs {kwargs}: {e}") from None
    except ValueError:  # no signature to inspect (some builtins): let the call decide
        pass
    try:
        return fn(**kwargs)
    except Exception as e:
        path = getattr(getattr(fn, "__code__", None), "co_filename", "")
        raise SourceError(f"{what} raised {_user_error(e, path)}") from None


def source_digest(spec: str, base_dir: Path) -> str:
    """Hash of the code behind a source, so editing a model file invalidates cached stages."""
    try:
        parsed = parse_spec(spec)
    except SourceError:
        return spec
    if parsed.is_file:
        path = resolve_path(parsed.module, base_dir)
        return sha256_file(path) if path else spec
    origin = None
    try:
        found = importlib.util.find_spec(parsed.module)
        origin = found.origin if found else None
    except (ImportError, ValueError):
        origin = None
    if origin and Path(origin).is_file():
        return sha256_file(Path(origin))
    return spec
