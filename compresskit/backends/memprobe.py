"""Child process for peak-memory measurement: `python -m compresskit.backends.memprobe ARGS`.

Prints the peak resident set size of loading and running one model, minus the process's resident
size after importing onnxruntime. On Linux the kernel's high-water mark is reset after the imports
(/proc/self/clear_refs), so a transient peak during import does not hide the model's own.
"""

from __future__ import annotations

import json
import resource
import sys

import numpy as np
import onnxruntime  # noqa: F401  (the baseline includes the runtime itself)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(raw: str) -> None:
    from compresskit.backends.ort import pinned, session
    from compresskit.targets import Target

    args = json.loads(raw)
    target = Target.from_json(args["target"])
    with np.load(args["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    with pinned(target):
        linux = _reset_peak() and _status_kb("VmHWM") is not None
        base_kb = _status_kb("VmRSS") if linux else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sess = session(args["path"], target, args["threads"])
        for _ in range(args["runs"]):
            sess.run(None, feeds)
        peak_kb = _status_kb("VmHWM") if linux else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mb": max(0, (peak_kb or 0) - (base_kb or 0)) / 1024.0}))


if __name__ == "__main__":
    main(sys.argv[1])
