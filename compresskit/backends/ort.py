"""onnxruntime sessions, inference and timing for a Target."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from compresskit.backends import device_runner
from compresskit.measure.targets import Target
from compresskit.models import inputs

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(double)": np.float64, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
              "tensor(bool)": np.bool_}


class TargetUnavailable(Exception):
    """The target cannot run on this machine; the message says why."""


class ModelFileError(Exception):
    """The file is missing, or onnxruntime cannot load it as a model."""


class FeedError(Exception):
    """The inputs do not fit the model (shape, dtype, dynamic dimensions left open)."""


def available(target: Target) -> tuple[bool, str]:
    """Whether this machine can run the target, and if not, why."""
    have = ort.get_available_providers()
    missing = [p for p in target.providers if p not in have]
    if missing:
        return False, (f"onnxruntime here offers {', '.join(have)}, not {', '.join(missing)}"
                       + (" (install onnxruntime-gpu on a machine with an NVIDIA GPU)"
                          if "CUDAExecutionProvider" in missing else ""))
    return True, ""


def session_options(target: Target, threads: int) -> ort.SessionOptions:
    return device_runner.session_options(target.to_json(), threads)


def to_ort_format(path: Path, folder: Path) -> Path:
    """The model in ORT format (what onnxruntime mobile loads), written into `folder`; converted
    with onnxruntime's own tool for a non-x86 platform, so no x86-only layout ops end up in it."""
    from onnxruntime.tools.convert_onnx_models_to_ort import (
        OptimizationStyle,
        convert_onnx_models_to_ort,
    )

    if path.suffix == ".ort":
        return path
    out = folder / (path.stem + ".ort")
    if out.exists() and out.stat().st_mtime >= path.stat().st_mtime:
        return out
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src = Path(tmp) / path.name
        shutil.copyfile(path, src)
        noise = io.StringIO()
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # its INFO lines
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            convert_onnx_models_to_ort(src, output_dir=Path(tmp) / "out",
                                       optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform="arm")
        made = sorted((Path(tmp) / "out").glob("*.ort"))
        if not made:
            raise ModelFileError(f"onnxruntime could not convert {path.name} to ORT format: "
                                 f"{noise.getvalue().strip().splitlines()[-1:]}")
        os.replace(made[0], out)
    return out


def version() -> str:
    return str(ort.__version__)


def required_operators(model_ort: Path, out: Path) -> None:
    """The operators an ORT-format model needs, as the config a reduced onnxruntime build takes
    (`--include_ops_by_config`); the file names the bundle's model, not a temporary path."""
    from onnxruntime.tools.ort_format_model.utils import create_config_from_models

    create_config_from_models([model_ort], out, enable_type_reduction=False)
    config = out.read_text().splitlines()
    out.write_text("\n".join(
        ["# Operators model.ort needs (onnxruntime reduced build: --include_ops_by_config)"]
        + [line for line in config if not line.startswith("#")]) + "\n")


def session(path: Path | str, target: Target, threads: int,
            ort_folder: Path | None = None) -> ort.InferenceSession:
    """An InferenceSession for `target` (on the ORT-format copy when the target wants one)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file")
    if target.ort_format and path.suffix != ".ort":
        path = to_ort_format(path, ort_folder or path.parent)
    providers: list[Any] = list(target.providers)
    if target.provider_options:
        providers = list(zip(target.providers, target.provider_options, strict=False))
    try:
        sess = ort.InferenceSession(str(path), sess_options=session_options(target, threads),
                                    providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"{path}: onnxruntime cannot load it as a model ({first})") from None
    if target.providers[0] not in sess.get_providers():
        raise TargetUnavailable(f"onnxruntime fell back to {', '.join(sess.get_providers())} "
                                f"instead of {target.providers[0]} (no usable device)")
    return sess


def pinned(target: Target) -> contextlib.AbstractContextManager[None]:
    """Pin this process to the target's number of cores while measuring, then restore."""
    return device_runner.pinned(target.pin_cores)


def input_names(sess: ort.InferenceSession) -> list[str]:
    return [i.name for i in sess.get_inputs()]


def predict(sess: ort.InferenceSession, x: Any, batch_size: int) -> np.ndarray:
    """The first output on `x` (an array, or a tuple of arrays in the session's input order)."""
    names = input_names(sess)
    outs = [sess.run(None, inputs.feeds(names, inputs.take(x, slice(i, i + batch_size))))[0]
            for i in range(0, inputs.count(x), batch_size)]
    return np.concatenate(outs)


def batch_of(x: Any, batch_size: int) -> Any:
    """`batch_size` real samples (repeated when the split is smaller)."""
    reps = -(-batch_size // inputs.count(x))
    return inputs.apply(x, lambda v: np.ascontiguousarray(
        np.concatenate([v] * reps)[:batch_size]))


def synthetic_feeds(sess: ort.InferenceSession, batch_size: int,
                    shapes: dict[str, list[int]] | None = None,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for a model compresskit knows nothing about: the first dimension is the batch
    when it is dynamic; other dynamic dimensions come from `shapes` (per input name, the shape
    without the batch). Floats are uniform in [0, 1), integers 0."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    shapes = shapes or {}
    for inp in sess.get_inputs():
        dtype = ORT_DTYPES.get(inp.type)
        if dtype is None:
            raise FeedError(f"input '{inp.name}' has type {inp.type}, which bench cannot make "
                            "data for")
        dims = list(inp.shape)
        given = shapes.get(inp.name)
        if given is not None:
            if len(given) != len(dims) - 1:
                raise FeedError(f"--input-shape for '{inp.name}' has {len(given)} dimensions; "
                                f"the model's input is {_shown(dims)}, so give the "
                                f"{len(dims) - 1} after the batch")
            dims = [dims[0], *given]
        dims = [batch_size if i == 0 and not isinstance(d, int) else d
                for i, d in enumerate(dims)]
        open_dims = [i for i, d in enumerate(dims) if not isinstance(d, int) or d <= 0]
        if open_dims:
            raise FeedError(f"input '{inp.name}' has dynamic dimensions {_shown(inp.shape)}; "
                            f"give them with --input-shape {inp.name}=" + ",".join(
                                "N" for _ in dims[1:]))
        if isinstance(inp.shape[0], int) and inp.shape[0] != batch_size:
            raise FeedError(f"input '{inp.name}' has a fixed batch of {inp.shape[0]}; use "
                            f"--batch-size {inp.shape[0]}")
        feeds[inp.name] = (rng.random(dims).astype(dtype) if np.issubdtype(dtype, np.floating)
                           else np.zeros(dims, dtype=dtype))
    return feeds


def _shown(dims: list[Any]) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in dims) + "]"


def run_once(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> list[Any]:
    """One inference; inputs the model rejects are a FeedError naming what onnxruntime said."""
    try:
        return sess.run(None, feeds)
    except Exception as e:  # InvalidArgument, Fail: the model rejects these inputs
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        raise FeedError(f"the model rejects inputs of shape {shapes}: {first}") from None


def time_interleaved(sessions: dict[str, ort.InferenceSession],
                     feeds: dict[str, dict[str, np.ndarray]] | np.ndarray | tuple[Any, ...],
                     runs: int,
                     warmup: int, seconds: float | None = None) -> dict[str, list[float]]:
    """Per-run latency (ms) of each session, run round-robin so machine noise hits all alike:
    `runs` rounds, or with `seconds`, rounds until that much time has passed (at least 10)."""
    if not isinstance(feeds, dict):  # the same inputs for every session
        x = feeds
        feeds = {k: inputs.feeds(input_names(s), x) for k, s in sessions.items()}
    return device_runner.interleaved(sessions, feeds, runs, warmup, seconds)


def cold_start(path: Path, target: Target, threads: int, feeds: dict[str, np.ndarray],
               ort_folder: Path | None = None) -> tuple[ort.InferenceSession, dict[str, float]]:
    """A new session and its first inference, each timed (what an app pays at launch)."""
    t0 = time.perf_counter()
    sess = session(path, target, threads, ort_folder)
    t1 = time.perf_counter()
    run_once(sess, feeds)
    t2 = time.perf_counter()
    return sess, {"session_ms": (t1 - t0) * 1000, "first_run_ms": (t2 - t1) * 1000}


def peak_rss_mb(path: Path, target: Target, threads: int, feeds: dict[str, np.ndarray],
                runs: int = 20) -> float:
    """Peak RSS of loading and running the model in a fresh process, minus that process's
    footprint after importing onnxruntime, so one model's arena does not pollute the next."""
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "feeds.npz"
        np.savez(inputs, **feeds)  # type: ignore[arg-type]  # numpy stubs type **kwds oddly
        try:
            return device_runner.peak_rss_mb(str(path), target.to_json(), threads, str(inputs),
                                             runs)
        except MemoryError as e:
            raise RuntimeError(str(e)) from None
