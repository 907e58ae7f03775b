"""Offline English text for distilling and evaluating text models, from what every Python
installation has: the standard library's docstrings and pydoc topics (training text), and the
descriptions of the installed packages (held-out text from another source and register).

Each function returns a list of strings; the `text` data source splits them into sentences.
Both are deterministic for a given Python and set of installed packages.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "turtledemo", "__pycache__"}


def stdlib_docstrings() -> list[str]:
    """The docstrings of every module, class and function in the standard library's Python
    sources (its tests and IDLE left out), read with `ast`: nothing is imported. About 7,700
    docstrings, 13,600 sentences on CPython 3.11."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    return [doc for path in sorted(root.rglob("*.py"))
            if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1])
            for doc in _docstrings(path)]


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [doc for node in ast.walk(tree) if isinstance(node, kinds)
            and (doc := ast.get_docstring(node))]


def package_docstrings(per_package: int = 1500) -> list[str]:
    """Docstrings of the installed third-party packages (site-packages, read with `ast`), at
    most `per_package` from each top-level package, spread evenly over its files, so that the
    largest (torch, transformers) do not crowd out the rest. More subjects than the standard
    library; the same register (code documentation), not the packages' descriptions."""
    import sysconfig

    root = Path(sysconfig.get_paths()["purelib"])
    out: list[str] = []
    for top in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isidentifier()):
        if top.name == "compresskit":
            continue
        docs = [d for f in sorted(top.rglob("*.py")) if not _SKIP_DIRS.intersection(
            f.relative_to(top).parts[:-1]) for d in _docstrings(f)]
        step = max(1, len(docs) // per_package)
        out += docs[::step][:per_package]
    return out


def pydoc_topics() -> list[str]:
    """The standard library's `pydoc_data.topics`: the language reference's help topics."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def python_docs() -> list[str]:
    """`stdlib_docstrings` and `pydoc_topics` together."""
    return stdlib_docstrings() + pydoc_topics()


def training_text(per_package: int = 300) -> list[str]:
    """The MiniLM example's training text: `python_docs`, and the sentences of running prose
    (see `prose`) in `package_docstrings`: about 34,000 sentences, on more subjects than the
    standard library's alone."""
    from compresskit.data.sources import sentences

    extra = [s for doc in package_docstrings(per_package) for s in sentences(doc) if prose(s)]
    return python_docs() + extra


_MARKUP = re.compile(r"https?:|www\.|::|\||`|==|--|\*\*|\[|\]|#|>>>|[{}<>_@\\]|\.\.\.")


def prose(sentence: str) -> bool:
    """A sentence of running prose: no links, markup or code, and letters and spaces for at
    least 90% of its characters."""
    if _MARKUP.search(sentence):
        return False
    return sum(c.isalpha() or c == " " for c in sentence) >= 0.9 * len(sentence)


def package_descriptions() -> list[str]:
    """The long descriptions (PyPI READMEs) of the installed distributions, by name, cut into
    sentences of running prose (see `prose`): English written by other authors, about other
    things, in another register than the standard library's docstrings."""
    import importlib.metadata as md

    from compresskit.data.sources import sentences

    seen: dict[str, None] = {}
    dists = sorted(md.distributions(), key=lambda d: (d.metadata["Name"] or "").lower())
    for dist in dists:
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""  # type: ignore[attr-defined]
        for s in sentences(str(body)):
            if prose(s):
                seen.setdefault(s)
    return list(seen)
