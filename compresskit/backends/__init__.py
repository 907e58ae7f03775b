"""Where compresskit meets the libraries it drives (onnxruntime, NNCF, torch-pruning, the ONNX
exporter), and how loud those libraries may be."""

from __future__ import annotations

import logging
import os

LIBRARY_LOGS = {"nncf": logging.WARNING, "torchao": logging.ERROR,
                "torch.utils._pytree": logging.ERROR}
"""Loggers whose lines are not for our users: NNCF's INFO lines, torchao's 'Failed to load
..._C_mxfp8' on CPUs, torch's pytree deprecation warnings (raised by libraries, not by us)."""


def verbose() -> bool:
    """`compresskit run --verbose` (COMPRESSKIT_VERBOSE=1): third-party logs reach the terminal."""
    return os.environ.get("COMPRESSKIT_VERBOSE", "") not in ("", "0")


def quiet_libraries() -> None:
    """Unless verbose: those loggers to warnings or errors only, and onnxruntime's own C++ log
    (the 'Removing initializer' warnings of sessions that its quantization and ORT-format tools
    open) to errors."""
    if verbose():
        return
    for name, level in LIBRARY_LOGS.items():
        logging.getLogger(name).setLevel(level)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
