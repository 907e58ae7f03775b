"""One `compresskit run` per run folder: a lock file naming its holder, stale locks detected."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from compresskit.errors import ConfigError

LOCK = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or self._stale(holder):
                    self.path.unlink(missing_ok=True)  # a crashed run's lock: take it over
                    continue
                raise ConfigError(
                    f"run folder {self.path.parent} is in use by compresskit (pid "
                    f"{holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}); "
                    "wait for it to finish, or pass --output-dir to run elsewhere. If that "
                    f"process is gone, delete {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ConfigError(f"could not take the lock {self.path}; delete it if no run is active")

    def _holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot see another machine's processes: assume it is alive
        pid = holder.get("pid")
        return not isinstance(pid, int) or not _alive(pid)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
