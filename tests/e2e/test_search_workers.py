"""compresskit search as users run it: killed with SIGKILL and rerun, it goes on without
repeating finished trials; two workers against one storage split the trials."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stages.test_search import write

pytestmark = pytest.mark.slow


def command(path: Path, out: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "compresskit", "search", str(path), "--trials", str(trials),
            "-o", str(out), *extra]


def trials(journal: Path) -> list:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.load_study(study_name="tiny-search", storage=storage)
    return study.get_trials(deepcopy=False)


def complete(journal: Path) -> list:
    import optuna

    if not journal.exists():
        return []
    try:
        return [t for t in trials(journal) if t.state == optuna.trial.TrialState.COMPLETE]
    except KeyError:  # the study is not written yet
        return []


def test_a_killed_search_resumes_without_repeating_trials(tmp_path):
    path, out = write(tmp_path), tmp_path / "run"
    journal = out / "search" / "journal.log"
    proc = subprocess.Popen(command(path, out, 5), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(complete(journal)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, "the search ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.params, t.values) for t in complete(journal)}
    assert 2 <= len(before) < 5
    done = subprocess.run(command(path, out, 5), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = {t.number: (t.params, t.values) for t in complete(journal)}
    assert len(after) == 5
    for number, result in before.items():  # finished trials are kept, not run again
        assert after[number] == result
    assert "Pareto front" in done.stdout


def test_two_workers_share_one_storage(tmp_path):
    path = write(tmp_path)
    journal = tmp_path / "shared.journal"
    workers = [subprocess.Popen(command(path, tmp_path / f"worker{i}", 6, "--storage",
                                        str(journal)), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
    for w in workers:
        assert w.wait(timeout=600) == 0, w.stderr.read()[-2000:] if w.stderr else ""
    finished = complete(journal)
    assert 6 <= len(finished) <= 7  # each worker stops once six are done or running
    by = {t.user_attrs["worker"] for t in finished}
    assert len(by) == 2, by  # both took trials
