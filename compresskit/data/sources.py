"""Data sources: built-in ones by name, or a user's factory returning {'train', 'val', 'test'}."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresskit.config import DataConfig, InputConfig
from compresskit.errors import ConfigError, Problem
from compresskit.models.sources import SourceError, call_user, resolve
from compresskit.registry import Registry

if TYPE_CHECKING:
    from torch.utils.data import Dataset

DATASETS: Registry[Callable[..., dict[str, Any]]] = Registry("data source")


def _without_labels(out: dict[str, Dataset], train_labels: bool) -> dict[str, Dataset]:
    """With train_labels false, the train split yields bare inputs (label-free distillation:
    the teacher's outputs are the only target); val and test keep labels to measure accuracy."""
    if not train_labels:
        from torch.utils.data import TensorDataset

        out["train"] = TensorDataset(out["train"].tensors[0])  # type: ignore[attr-defined]
    return out


@DATASETS.register("digits")
def digits(val_fraction: float = 0.1, train_labels: bool = True) -> dict[str, Any]:
    """scikit-learn's 1,797 real 8x8 handwritten digits; pixels / 16 as float32 (1, 8, 8).

    `test` is exactly the test part of train_test_split(X, y, test_size=0.2, random_state=0,
    stratify=y), so anyone can check a reported accuracy; `val` is carved from the train part.
    `train_labels: false` drops the training labels (val and test keep theirs).
    """
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch.utils.data import TensorDataset

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=0, stratify=y)
    x_fit, x_val, y_fit, y_val = train_test_split(
        x_train, y_train, test_size=val_fraction, random_state=0, stratify=y_train)

    def ds(xs: Any, ys: Any) -> TensorDataset:
        return TensorDataset(torch.tensor(xs / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8),
                             torch.tensor(ys, dtype=torch.long))

    return {**_without_labels(
        {"train": ds(x_fit, y_fit), "val": ds(x_val, y_val), "test": ds(x_test, y_test)},
        train_labels), "labels": [str(d) for d in range(10)]}


@DATASETS.register("digits_rgb32")
def digits_rgb32(size: int = 32, val_fraction: float = 0.1, seed: int = 0,
                 train_labels: bool = True) -> dict[str, Any]:
    """The same real digits and splits as 'digits', upsampled (bilinear) to 3 x size x size and
    painted with a random light foreground and dark background colour per image plus pixel
    noise, so a model must learn shape, not colour. A stand-in for small RGB image tasks
    (CIFAR-sized inputs) that needs no download; the colours are fixed by `seed`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: dict[str, Dataset] = {}
    base = digits(val_fraction)
    for name in ("train", "val", "test"):
        x, y = base[name].tensors  # type: ignore[attr-defined]
        n = len(x)
        big = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                              align_corners=False).clamp(0, 1)
        fg = 0.55 + 0.45 * torch.rand(n, 3, 1, 1, generator=gen)
        bg = 0.45 * torch.rand(n, 3, 1, 1, generator=gen)
        img = bg + (fg - bg) * big + 0.05 * torch.randn(n, 3, size, size, generator=gen)
        out[name] = torch.utils.data.TensorDataset(img.float(), y)
    return {**_without_labels(out, train_labels), "labels": [str(d) for d in range(10)]}


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int,
                   labels: Any = None) -> tuple[Any, Any, Any]:
    """Train/val/test index arrays: a seeded permutation, stratified by label when given."""
    import numpy as np

    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1
            and val_fraction + test_fraction < 1):
        raise ValueError("val_fraction and test_fraction must be in [0, 1) and sum below 1")
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else \
        [np.flatnonzero(labels == c) for c in np.unique(labels)]
    train, val, test = [], [], []
    for g in groups:
        g = rng.permutation(g)
        n_test, n_val = round(len(g) * test_fraction), round(len(g) * val_fraction)
        test.append(g[:n_test])
        val.append(g[n_test:n_test + n_val])
        train.append(g[n_test + n_val:])
    out = tuple(np.sort(np.concatenate(part)) for part in (train, val, test))
    if len(out[0]) == 0 or len(out[1]) == 0:
        raise ValueError(f"{n} samples are too few to split with val_fraction {val_fraction} "
                         f"and test_fraction {test_fraction}")
    return out  # type: ignore[return-value]


def _dataset(arrays: list[Any], labels: Any, index: Any) -> Dataset:
    """The samples at `index` of the arrays (and labels), as a map-style Dataset of
    (inputs..., label), or of bare inputs when labels is None. Several input arrays make
    samples ((x1, x2, ...), label)."""
    import torch
    from torch.utils.data import Dataset

    class Arrays(Dataset):
        def __init__(self) -> None:
            self.xs = [torch.as_tensor(a[index]) for a in arrays]
            self.y = None if labels is None else torch.as_tensor(labels[index]).long()

        def __len__(self) -> int:
            return len(self.xs[0])

        def __getitem__(self, i: int) -> Any:
            x = self.xs[0][i] if len(self.xs) == 1 else tuple(v[i] for v in self.xs)
            return (x,) if self.y is None else (x, self.y[i])

    return Arrays()


def _splits(arrays: list[Any], labels: Any, val_fraction: float, test_fraction: float,
            seed: int, stratify: bool = True) -> dict[str, Any]:
    """`_dataset`s of the train, val and (when not empty) test parts of a seeded split."""
    parts = _split_indices(len(arrays[0]), val_fraction, test_fraction, seed,
                           labels if stratify else None)
    out = {"train": _dataset(arrays, labels, parts[0]), "val": _dataset(arrays, labels, parts[1])}
    if len(parts[2]):
        out["test"] = _dataset(arrays, labels, parts[2])
    return out


def _file(path: str, base_dir: Path | None, what: str) -> Path:
    from compresskit.models.sources import locate

    return locate(path, base_dir or Path.cwd(), what)


@DATASETS.register("npz")
def npz(path: str, x: str | list[str] = "x", y: str | None = "y", val_fraction: float = 0.1,
        test_fraction: float = 0.2, seed: int = 0, base_dir: Path | None = None) -> dict[str, Any]:
    """Arrays in a NumPy .npz file, inputs under key `x` (a list of keys for a model with
    several inputs) and integer labels under `y` (null: unlabeled); split into train, val and
    test by a seeded permutation, stratified by label."""
    import numpy as np

    file = _file(path, base_dir, "npz file")
    with np.load(file, allow_pickle=False) as data:
        keys = [x] if isinstance(x, str) else list(x)
        wanted = keys + ([y] if y else [])
        absent = [k for k in wanted if k not in data.files]
        if absent:
            raise ValueError(f"{file} has no array '{absent[0]}' (it has "
                             f"{', '.join(data.files) or 'none'}); set kwargs x and y")
        arrays = [np.asarray(data[k]) for k in keys]
        labels = np.asarray(data[y]).astype(np.int64) if y else None
    for k, a in zip(keys, arrays, strict=True):
        if a.dtype.kind == "f":
            arrays[keys.index(k)] = a.astype(np.float32)
        if len(a) != len(arrays[0]) or (labels is not None and len(a) != len(labels)):
            raise ValueError(f"{file}: arrays {', '.join(wanted)} differ in length")
    return _splits(arrays, labels, val_fraction, test_fraction, seed)


@DATASETS.register("folder")
def folder(path: str, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
           base_dir: Path | None = None, input_shape: list[int] | None = None) -> dict[str, Any]:
    """Images in one subfolder per class (the folder names are the labels, sorted), resized
    to input.shape ([1, H, W] grey or [3, H, W] colour) and scaled to [0, 1]."""
    import numpy as np
    from PIL import Image

    root = _file(path, base_dir, "image folder")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root} needs one subfolder per class (at least two); found "
                         f"{len(classes)}")
    shape = input_shape or [3, 32, 32]
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"the folder source makes [1, H, W] or [3, H, W] images; input.shape "
                         f"is {shape}")
    images, labels = [], []
    for c, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
                continue
            with Image.open(f) as opened:
                img = opened.convert("L" if shape[0] == 1 else "RGB").resize(
                    (shape[2], shape[1]), Image.Resampling.BILINEAR)
                a = np.asarray(img, dtype=np.float32) / 255.0
            images.append(a[None] if shape[0] == 1 else a.transpose(2, 0, 1))
            labels.append(c)
    if not images:
        raise ValueError(f"no images (.png, .jpg, ...) in the class folders of {root}")
    return {**_splits([np.stack(images)], np.array(labels), val_fraction, test_fraction, seed),
            "labels": classes}


@DATASETS.register("csv")
def csv(path: str, label: str = "label", columns: list[str] | None = None,
        val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0,
        standardize: bool = True, base_dir: Path | None = None) -> dict[str, Any]:
    """A CSV table with a header row, numeric feature `columns` (default: all but the label) as
    a float32 vector and the `label` column as the class (its distinct values, sorted, are the
    labels); standardize: scale each feature by the training split's mean and deviation."""
    import csv as csv_module

    import numpy as np

    file = _file(path, base_dir, "csv file")
    with file.open(newline="") as fh:
        rows = list(csv_module.DictReader(fh))
    if not rows:
        raise ValueError(f"{file} has no data rows")
    header = list(rows[0])
    if label not in header:
        raise ValueError(f"{file} has no column '{label}' (columns: {', '.join(header)}); set "
                         "kwargs.label")
    features = columns or [c for c in header if c != label]
    absent = [c for c in features if c not in header]
    if absent:
        raise ValueError(f"{file} has no column '{absent[0]}'")
    x = np.empty((len(rows), len(features)), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, c in enumerate(features):
            try:
                x[i, j] = float(row[c])
            except (TypeError, ValueError):
                raise ValueError(f"{file} row {i + 2}, column '{c}': '{row[c]}' is not a "
                                 "number") from None
    names = sorted({row[label] for row in rows})
    y = np.array([names.index(row[label]) for row in rows])
    out = _splits([x], y, val_fraction, test_fraction, seed)
    if standardize:
        train = out["train"].xs[0]
        mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
        for ds in out.values():
            ds.xs[0] = (ds.xs[0] - mean) / std
    return {**out, "labels": names}


def sentences(text: str, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Sentences of running text: split at . ! ? followed by space, whitespace collapsed, kept
    when min_chars..max_chars long, duplicates dropped."""
    import re

    out: dict[str, None] = {}
    for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        if min_chars <= len(part) <= max_chars:
            out.setdefault(part)
    return list(out)


def _text_of(path: str | None, python: str | None, min_chars: int, max_chars: int,
             base_dir: Path | None, what: str) -> list[str]:
    """Sentences from a file (one per line) or a Python value: a string, a list or dict of
    strings, or a function returning one of those (split into sentences)."""
    from compresskit.models.sources import resolve_attr

    if (path is None) == (python is None):
        raise ValueError(f"give the {what} as 'path' (one sentence per line) or 'python' "
                         "('module:attr'), one of them")
    if path is not None:
        lines = _file(path, base_dir, "text file").read_text(encoding="utf-8").splitlines()
        return list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    obj = resolve_attr(str(python), base_dir or Path.cwd())
    if callable(obj):
        obj = obj()
    parts = obj.values() if isinstance(obj, dict) else [obj] if isinstance(obj, str) else obj
    return list(dict.fromkeys(s for part in parts for s in sentences(
        str(part), min_chars, max_chars)))


@DATASETS.register("text")
def text(tokenizer: str, path: str | None = None, python: str | None = None,
         max_length: int = 64, val_fraction: float = 0.1, test_fraction: float = 0.15,
         seed: int = 0, limit: int | None = None, min_chars: int = 40, max_chars: int = 300,
         held_out: dict[str, str] | None = None, held_out_limit: int = 300,
         base_dir: Path | None = None) -> dict[str, Any]:
    """Unlabeled sentences, tokenized with a Hugging Face tokenizer ('hf:<folder>'), padded or
    cut to max_length: samples are (input_ids, attention_mask). From `path` (one sentence per
    line) or `python` ('module:attr': a string, list or dict of strings, or a function returning
    one, split into sentences; e.g. the standard library's pydoc_data.topics:topics, or
    compresskit.data.corpora:python_docs).

    `held_out` names more evaluation sets from other text ({name: 'module:attr', or a file of
    one sentence per line}), `held_out_limit` sentences each, drawn with the seed; a sentence
    also in the training text is left out of them. Every benchmark measures each artifact on
    them beside the test split."""
    import numpy as np

    from compresskit.models import hf

    found = _text_of(path, python, min_chars, max_chars, base_dir, "text")
    if limit:
        found = found[:limit]
    if len(found) < 10:
        raise ValueError(f"only {len(found)} sentences found; the text source needs at least 10")
    tok = hf.load_tokenizer(tokenizer, base_dir or Path.cwd())

    def encode(texts: list[str]) -> list[Any]:
        enc = tok(texts, padding="max_length", truncation=True, max_length=max_length,
                  return_tensors="np")
        return [np.asarray(enc["input_ids"], dtype=np.int64),
                np.asarray(enc["attention_mask"], dtype=np.int64)]

    out = {**_splits(encode(found), None, val_fraction, test_fraction, seed), "texts": found}
    extra: dict[str, Any] = {}
    known = set(found)
    for name, spec in (held_out or {}).items():
        is_file = ":" not in spec  # 'module:attr' or 'file.py:attr'; else a text file
        other = _text_of(spec if is_file else None, None if is_file else spec, min_chars,
                         max_chars, base_dir, f"held_out '{name}'")
        # Drawn in a seeded order, skipping sentences of the training text: another training
        # text changes the set only where the two overlap.
        order = np.random.default_rng(seed).permutation(len(other))
        pick = sorted([int(i) for i in order if other[i] not in known][:held_out_limit])
        if len(pick) < 10:
            raise ValueError(f"held_out '{name}' has only {len(pick)} sentences not in the "
                             "training text; it needs at least 10")
        texts = [other[i] for i in pick]
        extra[name] = _dataset(encode(texts), None, slice(None))
        out[f"texts:{name}"] = texts
    if extra:
        out["held_out"] = extra
    return out


def _documents(path: str | None, python: str | None, base_dir: Path | None,
               what: str) -> list[str]:
    """Whole documents: a text file's paragraphs (split at blank lines), or a Python value (a
    string, a list or dict of strings, or a function returning one)."""
    from compresskit.models.sources import resolve_attr

    if (path is None) == (python is None):
        raise ValueError(f"give the {what} as 'path' (a text file) or 'python' "
                         "('module:attr'), one of them")
    if path is not None:
        body = _file(path, base_dir, "text file").read_text(encoding="utf-8")
        parts: Any = body.split("\n\n")
    else:
        obj = resolve_attr(str(python), base_dir or Path.cwd())
        if callable(obj):
            obj = obj()
        parts = obj.values() if isinstance(obj, dict) else [obj] if isinstance(obj, str) else obj
    return list(dict.fromkeys(str(d).strip() for d in parts if str(d).strip()))


@DATASETS.register("causal_text")
def causal_text(tokenizer: str, python: str | None = None, path: str | None = None,
                eval_python: str | None = None, eval_path: str | None = None,
                block_size: int = 256, limit_blocks: int | None = None, val_blocks: int = 16,
                eval_blocks: int = 64, seed: int = 0,
                base_dir: Path | None = None) -> dict[str, Any]:
    """Text for a causal LM: documents tokenized with a Hugging Face tokenizer ('hf:<folder>'),
    joined by its end-of-text token and cut into blocks of `block_size` tokens (input_ids only:
    no padding, every token is predicted). Training text from `python` or `path`; `val` is
    `val_blocks` blocks of it held out from training (in-domain); `test` is `eval_blocks` blocks
    of the evaluation text from `eval_python` or `eval_path`, another source, with any document
    that is also in the training text left out (out-of-domain). `limit_blocks` caps the
    training blocks, drawn with the seed."""
    import numpy as np
    import torch
    from torch.utils.data import TensorDataset

    from compresskit.models import hf

    tok = hf.load_tokenizer(tokenizer, base_dir or Path.cwd())
    sep = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def blocks(docs: list[str]) -> Any:
        ids: list[int] = []
        for doc in docs:
            ids += tok(doc, add_special_tokens=False)["input_ids"]
            if sep is not None:
                ids.append(int(sep))
        n = len(ids) // block_size
        return np.asarray(ids[:n * block_size], dtype=np.int64).reshape(n, block_size)

    train_docs = _documents(path, python, base_dir, "training text")
    train = blocks(train_docs)
    if len(train) < val_blocks + 2:
        raise ValueError(f"the training text makes {len(train)} blocks of {block_size} tokens; "
                         f"it needs more than val_blocks + 1 ({val_blocks + 1})")
    order = np.random.default_rng(seed).permutation(len(train))
    val, fit = train[order[:val_blocks]], train[np.sort(order[val_blocks:])]
    if limit_blocks:
        fit = fit[np.sort(np.random.default_rng(seed + 1).permutation(len(fit))[:limit_blocks])]
    out: dict[str, Any] = {"train": TensorDataset(torch.from_numpy(fit)),
                           "val": TensorDataset(torch.from_numpy(val))}
    if eval_python is not None or eval_path is not None:
        known = set(train_docs)
        other = [d for d in _documents(eval_path, eval_python, base_dir, "evaluation text")
                 if d not in known]
        test = blocks(other)[:eval_blocks]
        if len(test) < 1:
            raise ValueError(f"the evaluation text makes no block of {block_size} tokens")
        out["test"] = TensorDataset(torch.from_numpy(test))
    return out


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset | None
    labels: list[str] | None = None
    """Class names by index, when the source gives them (a 'labels' entry)."""
    held_out: dict[str, Dataset] = field(default_factory=dict)
    """More evaluation sets by name (text from another source than training), measured by the
    benchmark beside the evaluation split."""
    memo: dict[str, Any] = field(default_factory=dict)
    """Values computed once per run from these splits (the teacher's evaluation outputs)."""

    @property
    def eval(self) -> Dataset:
        """The split accuracy is reported on: test when present, else val."""
        return self.test if self.test is not None else self.val

    @property
    def eval_name(self) -> str:
        return "test" if self.test is not None else "val"


def describe_source(source: str) -> str:
    """How a data source prepares inputs, for the deployment manifest: a built-in source's own
    description, or a pointer to the user's factory."""
    if ":" in source or source not in DATASETS:
        return (f"inputs exactly as the data source '{source}' yields them (see its code); the "
                "model expects the same scaling and layout")
    doc = " ".join((DATASETS.get(source).__doc__ or "").split())
    return f"as the built-in data source '{source}': {doc.split('. ')[0].rstrip('.')}."


def _problem(cfg_file: str | None, msg: str) -> ConfigError:
    return ConfigError(Problem(msg, file=cfg_file, key="data.source"))


def load_data(cfg: DataConfig, inp: InputConfig | list[InputConfig], base_dir: Path,
              cfg_file: str | None = None, task: str = "classify") -> Splits:
    """Build the splits and check that samples match `input:`; bad data is exit 2."""
    specs = inp if isinstance(inp, list) else [inp]
    if ":" in cfg.source:
        try:
            factory = resolve(cfg.source, base_dir)
        except SourceError as e:
            raise _problem(cfg_file, str(e)) from None
    else:
        try:
            factory = DATASETS.get(cfg.source)
        except KeyError as e:
            raise _problem(cfg_file, str(e.args[0])) from None
    kwargs = dict(cfg.kwargs)
    if ":" not in cfg.source:  # built-ins resolve paths like the pipeline's other files
        import inspect

        params = inspect.signature(factory).parameters
        if "base_dir" in params:
            kwargs["base_dir"] = base_dir
        if "input_shape" in params and "input_shape" not in kwargs:
            kwargs["input_shape"] = list(specs[0].shape)
    try:
        out = call_user(factory, kwargs, f"data source '{cfg.source}'")
    except SourceError as e:
        raise _problem(cfg_file, str(e)) from None
    if not isinstance(out, dict) or "train" not in out or "val" not in out:
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise _problem(cfg_file, f"'{cfg.source}' must return a mapping with 'train' and 'val' "
                                 f"(and optionally 'test') datasets, got {got}")
    labels = out.get("labels")
    held = out.get("held_out") or {}
    if not isinstance(held, dict):
        raise _problem(cfg_file, f"'{cfg.source}' returned 'held_out' as "
                                 f"{type(held).__name__}; it must map names to datasets")
    splits = Splits(train=out["train"], val=out["val"], test=out.get("test"),
                    held_out=dict(held),
                    labels=[str(v) for v in labels] if isinstance(labels, (list, tuple)) else None)
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        if ds is None:
            continue
        _check_split(ds, name, cfg.source, specs, cfg_file, labels_needed=task == "classify")
    for name, ds in splits.held_out.items():
        _check_split(ds, f"held_out:{name}", cfg.source, specs, cfg_file,
                     labels_needed=task == "classify")
    return splits


def _check_split(ds: Any, name: str, source: str, specs: list[InputConfig],
                 cfg_file: str | None, labels_needed: bool = True) -> None:
    import torch

    if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise _problem(cfg_file, f"'{source}' split '{name}' is not a map-style Dataset "
                                 "(needs __len__ and __getitem__)")
    if len(ds) == 0:
        raise _problem(cfg_file, f"'{source}' split '{name}' is empty")
    from compresskit.train.loop import unpack

    sample = ds[0]
    bad = isinstance(sample, (tuple, list)) and len(sample) not in (1, 2)
    if bad or (labels_needed and name != "train" and unpack(sample)[1] is None):
        what = "(input, label) pairs" if name != "train" and labels_needed else \
            "(input, label) pairs, or bare inputs when unlabeled"
        raise _problem(cfg_file, f"'{source}' split '{name}' must yield {what}")
    x = unpack(sample)[0]
    values = list(x) if isinstance(x, (tuple, list)) else [x]
    if len(values) != len(specs):
        raise _problem(cfg_file, f"'{source}' split '{name}' yields {len(values)} input(s) per "
                                 f"sample, but 'input:' lists {len(specs)} "
                                 f"({', '.join(s.name for s in specs)})")
    for value, spec in zip(values, specs, strict=True):
        shape = list(torch.as_tensor(value).shape)
        if shape != list(spec.shape):
            raise _problem(cfg_file, f"'{source}' split '{name}' yields input '{spec.name}' of "
                                     f"shape {shape}, but its shape under 'input:' is "
                                     f"{spec.shape}; set shape: {shape} or reshape the data")
