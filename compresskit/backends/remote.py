"""Measuring on another machine: over ssh (the system's own client, so keys, agents, jump hosts
and aliases come from the user's ~/.ssh/config), or through any command that runs a program on
the device with its arguments and stdin as given (`docker exec -i box`, `env` for a test).

One call per measurement: a tar stream on the command's stdin carries the self-contained runner
(backends/device_runner.py), the job, the inputs and the model files the device does not hold
yet (kept there by content hash, so a second measurement of the same file sends nothing); a
few lines of Python on the device unpack it and start the runner, whose one JSON line comes
back on stdout. The device needs Python 3.8+, numpy and onnxruntime, nothing of compresskit.
"""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compresskit.backends import device_runner
from compresskit.engine.artifacts import sha256_file

BOOT = ("import os,sys,tarfile,runpy;w=os.path.expanduser(sys.argv[1]);"
        "os.makedirs(w,exist_ok=True);t=tarfile.open(fileobj=sys.stdin.buffer,mode='r|');"
        "t.extractall(w,**({'filter':'data'} if hasattr(tarfile,'data_filter') else {}));"
        "r=os.path.join(w,'device_runner.py');sys.argv=[r,w,sys.argv[2]];"
        "runpy.run_path(r,run_name='__main__')")
"""Runs on the device: unpack stdin into the work folder, then run the runner on the job."""


class RemoteError(Exception):
    """The device could not be reached or could not measure; one sentence says why and what to
    do."""


@dataclass(frozen=True)
class Remote:
    """How to run a program on the device."""

    ssh: str | None = None
    """user@host (or an alias from ~/.ssh/config)."""
    port: int | None = None
    ssh_options: tuple[str, ...] = ()
    command: str | None = None
    """A command prefix that runs a program on the device, e.g. `docker exec -i box`."""
    python: str = "python3"
    workdir: str = "~/.cache/compresskit-device"
    timeout_s: float = 600.0

    def argv(self, args: list[str]) -> list[str]:
        if self.ssh is not None:
            port = ["-p", str(self.port)] if self.port else []
            # ssh hands the remote shell one string: quote every argument for it.
            return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15", *port,
                    *self.ssh_options, self.ssh, "--", shlex.join(args)]
        return [*shlex.split(self.command or ""), *args]

    def shown(self) -> str:
        """The command as it was built, for error messages (without the Python payload)."""
        return shlex.join(self.argv([self.python, "-c", "<bootstrap>", self.workdir, "JOB"]))

    def to_json(self) -> dict[str, Any]:
        return {"ssh": self.ssh, "port": self.port, "ssh_options": list(self.ssh_options),
                "command": self.command, "python": self.python, "workdir": self.workdir,
                "timeout_s": self.timeout_s}


def _call(remote: Remote, name: str, job: dict[str, Any], files: dict[str, Path],
          timeout: float | None = None) -> dict[str, Any]:
    """Send the runner, `job` and `files` (path on the device, relative to the work folder ->
    local file) in one tar stream; run the job; return the runner's JSON. '{job}' in the
    job's paths and in `files` stands for the job's own folder on the device."""
    job_dir = f"jobs/{uuid.uuid4().hex[:12]}"
    job_rel = f"{job_dir}/job.json"
    with tempfile.TemporaryFile() as stream:
        with tarfile.open(fileobj=stream, mode="w|") as tar:
            tar.add(device_runner.__file__, arcname="device_runner.py")
            data = json.dumps(job).replace("{job}", job_dir).encode()
            info = tarfile.TarInfo(job_rel)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for rel, local in files.items():
                tar.add(str(local), arcname=rel.replace("{job}", job_dir))
        stream.seek(0)
        argv = remote.argv([remote.python, "-c", BOOT, remote.workdir, job_rel])
        limit = timeout or remote.timeout_s
        try:
            out = subprocess.run(argv, stdin=stream, capture_output=True, timeout=limit,
                                 check=False)
        except FileNotFoundError:
            raise RemoteError(f"target '{name}': '{argv[0]}' is not installed here; the "
                              f"command was: {remote.shown()}") from None
        except subprocess.TimeoutExpired:
            raise RemoteError(f"target '{name}': the run did not finish within timeout_s "
                              f"({limit:g} s); raise timeout_s, or time fewer runs "
                              f"(the command was: {remote.shown()})") from None
    return _answer(remote, name, out)


def _answer(remote: Remote, name: str, out: subprocess.CompletedProcess) -> dict[str, Any]:
    stderr = out.stderr.decode(errors="replace").strip()
    last = stderr.splitlines()[-1] if stderr else ""
    lines = out.stdout.decode(errors="replace").strip().splitlines()
    answer = None
    if out.returncode == 0 and lines:
        try:
            answer = json.loads(lines[-1])
        except ValueError:
            answer = None
    if answer is None:
        if remote.ssh is not None and out.returncode == 255 and not last:
            raise RemoteError(
                f"target '{name}': the runner on {remote.ssh} ended without an answer (killed "
                "by a signal, usually the device running out of memory); time fewer or "
                "smaller files, or smaller batches")
        if remote.ssh is not None and out.returncode == 255:
            raise RemoteError(
                f"target '{name}': ssh could not log in to {remote.ssh} ({last}). The command "
                f"was: {remote.shown()}. Check that it logs in without a password prompt: a "
                "key in ~/.ssh/config, or ssh_options: [-i, KEYFILE]")
        if out.returncode in (126, 127) or "python" in last.lower() and (
                "not found" in last or "No such file" in last):
            raise RemoteError(
                f"target '{name}': there is no Python at '{remote.python}' on the device "
                f"({last}); install Python 3.8+ there, or set python: to its path")
        if out.returncode in (-9, 137):
            raise RemoteError(
                f"target '{name}': the runner was killed (signal 9, usually the device "
                "running out of memory); time fewer or smaller files, or smaller batches")
        raise RemoteError(f"target '{name}': the runner failed on the device (exit "
                          f"{out.returncode}: {last or 'no message'}); the command was: "
                          f"{remote.shown()}")
    error = answer.get("error")
    if error == "missing-packages":
        missing = " ".join(answer["missing"])
        raise RemoteError(
            f"target '{name}': {answer['detail']}; on the device run: "
            f"{remote.python} -m pip install {missing}")
    if error == "out-of-memory":
        raise RemoteError(f"target '{name}': the device ran out of memory while measuring "
                          f"({answer['detail']}); time fewer or smaller files, or smaller "
                          "batches")
    if error:
        raise RemoteError(f"target '{name}': onnxruntime on the device could not measure: "
                          f"{answer['detail']}")
    return answer  # type: ignore[no-any-return]


def probe(remote: Remote, name: str) -> dict[str, Any]:
    """The device's description and the model files it already holds."""
    return _call(remote, name, {"mode": "probe"}, {}, timeout=min(remote.timeout_s, 120.0))


def measure(remote: Remote, name: str, files: dict[str, Path], target: dict[str, Any],
            threads: int | None, batch_sizes: tuple[int, ...], runs: int, warmup: int,
            seconds: float | None, memory: bool, feeds: dict[str, dict[int, dict[str, Any]]],
            eval_x: Any = None, eval_batch_size: int = 256) -> dict[str, Any]:
    """Time `files` (label -> local path) on the device. `feeds[label][batch]` are the
    inputs; with `eval_x` (an array, or a tuple in input order) each file's first output on
    it comes back too. Returns the runner's answer: device, rows (raw timings), predictions
    (label -> numpy array)."""
    import base64

    import numpy as np

    have = set(probe(remote, name).get("have", []))
    send: dict[str, Path] = {}
    on_device: dict[str, str] = {}
    for label, path in files.items():
        stored = f"{sha256_file(path)}{path.suffix}"
        on_device[label] = f"models/{stored}"
        if stored not in have:
            send[f"models/{stored}"] = path
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {f"{i}/{bs}/{n}": np.ascontiguousarray(v)
                  for i, label in enumerate(files) for bs, named in feeds[label].items()
                  for n, v in named.items()}
        np.savez(Path(tmp) / "feeds.npz", **arrays)  # type: ignore[arg-type]
        send["{job}/feeds.npz"] = Path(tmp) / "feeds.npz"
        job: dict[str, Any] = {
            "mode": "measure", "files": on_device, "target": target, "threads": threads,
            "batch_sizes": list(batch_sizes), "runs": runs, "warmup": warmup,
            "seconds": seconds, "memory": memory, "feeds": "{job}/feeds.npz", "eval": None,
            "eval_batch_size": eval_batch_size}
        if eval_x is not None:
            values = list(eval_x) if isinstance(eval_x, (tuple, list)) else [eval_x]
            np.savez(Path(tmp) / "eval.npz", **{str(i): v for i, v in enumerate(values)})
            send["{job}/eval.npz"] = Path(tmp) / "eval.npz"
            job["eval"] = "{job}/eval.npz"
        answer = _call(remote, name, job, send)
    answer["predictions"] = {k: np.load(io.BytesIO(base64.b64decode(v)), allow_pickle=False)
                             for k, v in answer.get("predictions", {}).items()}
    return answer

