"""The stage loop: hash each stage, skip finished ones, run the rest, write manifests and report.

A stage's hash covers its own config and position, the data, and the versions of exactly what it
reads: each model it uses (its section, code and checkpoint, then the hash of the last stage that
changed it) and, for stages that read artifacts, the stages that wrote them. A stage whose folder
holds a manifest with the same hash is `cached`. Changing stage k reruns k and the later stages
that depend on it; editing the student's kwargs does not retrain the teacher.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compresskit import __version__
from compresskit.engine import distributed as dist
from compresskit.engine.artifacts import (
    MANIFEST,
    Artifact,
    DiskFullError,
    Structure,
    inside,
    read_json,
    sha256_file,
    write_json,
)
from compresskit.engine.checks import deep_check, model_seed
from compresskit.engine.loader import LoadedPipeline
from compresskit.errors import ConfigError, StageError
from compresskit.models.sources import resolve_path, source_digest

if TYPE_CHECKING:
    from rich.console import Console
    from torch import nn

    from compresskit.data.sources import Splits

STAGE_DIR = re.compile(r"^\d{2}-[a-z]+$")
NOT_HASHED = {"checkpoint_every", "cache_teacher", "time_budget"}
"""Stage keys that change how a stage runs, never what it produces (cached teacher outputs at
float32 are the teacher's outputs; cache_precision does change them, so it is hashed)."""
PARTIAL = ".partial"
RESUME_STATE = "stage.json"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def common_hash(loaded: LoadedPipeline, device: str, world_size: int = 1) -> str:
    """What every stage depends on: the data (config and code), input, seed, version, and where
    it runs (cpu or cuda, how many processes), since those change the numbers."""
    cfg = loaded.config
    parts: dict[str, Any] = {
        "compresskit": __version__, "seed": cfg.seed, "device": device, "world_size": world_size,
        "data": cfg.data.model_dump(), "input": [i.model_dump() for i in cfg.inputs],
        "task": cfg.task,
    }
    if ":" in cfg.data.source:
        parts["data_code"] = source_digest(cfg.data.source, loaded.base_dir)
    return _digest(parts)


def code_digest(source: str, base_dir: Path) -> str:
    """Hash of what a model source loads: its Python file, or a Hugging Face folder's files."""
    from compresskit.models import hf
    return hf.digest(source, base_dir) if hf.is_hf(source) else source_digest(source, base_dir)


def model_hashes(loaded: LoadedPipeline) -> dict[str, str]:
    """Initial version of each model: its section, the code behind its source, its checkpoint."""
    out = {}
    for role, (_, mcfg) in loaded.config.model_sections().items():
        source = mcfg.source if mcfg.source is not None else \
            loaded.config.model_sections()["teacher"][1].source
        parts: dict[str, Any] = {"config": mcfg.model_dump(), "code": code_digest(
            str(source), loaded.base_dir)}
        if mcfg.checkpoint:
            path = resolve_path(mcfg.checkpoint, loaded.base_dir)
            if path is not None:  # its bytes name it: the same file moved keeps the cache
                parts["config"].pop("checkpoint")
                parts["checkpoint"] = sha256_file(path)
            else:
                parts["checkpoint"] = mcfg.checkpoint
        out[role] = _digest(parts)
    return out


@dataclass
class StageRecord:
    index: int
    type: str
    name: str
    status: str
    seconds: float
    manifest: dict[str, Any] = field(default_factory=dict)
    time_budget: float | None = None


class Runner:
    """Runs one pipeline into one run folder."""

    def __init__(self, loaded: LoadedPipeline, run_dir: Path, *, force: bool = False,
                 console: Console | None = None, progress: Any = None):
        from rich.console import Console

        self.loaded = loaded
        self.cfg = loaded.config
        self.run_dir = run_dir
        self.force = force
        self.console = console or Console(stderr=True)
        self.progress = progress
        self.records: list[StageRecord] = []
        self._splits: Splits | None = None
        self._models: dict[str, nn.Module] = {}
        roles = ("teacher", "student", *self.cfg.models)
        self._state: dict[str, str | None] = {role: None for role in roles}
        from compresskit.models.structure import initial_structure

        self._structure: dict[str, Structure] = {role: initial_structure(self.cfg, role)
                                                 for role in roles}
        self._fresh: dict[str, nn.Module] = {}
        self.device: Any = None

    # -- lazily materialised inputs -------------------------------------------------------------
    def _data(self) -> Splits:
        if self._splits is None:
            from compresskit.data.sources import load_data

            self._splits = load_data(self.cfg.data, self.cfg.inputs, self.loaded.base_dir,
                                     str(self.loaded.path), self.cfg.task)
        return self._splits

    def _model(self, role: str) -> nn.Module:
        """The model as of the last finished stage: live, or rebuilt from its base model's
        source with the recorded structural edits replayed and the checkpoint loaded, or new."""
        if role in self._models:
            return self._models[role]
        from compresskit.models import loading as modelio
        from compresskit.models import structure
        base, edits = self._structure[role]["base"], self._structure[role]["edits"]
        section = self.cfg.model_sections().get(base)
        if section is None:  # excluded by validation; reaching here is our bug
            raise RuntimeError(f"no {base} configured")
        mcfg = section[1]
        model = self._fresh.pop(role, None) if base == role else None
        if model is None:
            model = modelio.build(mcfg, base, self.loaded.base_dir,
                                  model_seed(self.cfg.seed, base), self.cfg.inputs,
                                  self.cfg.task)
            trained = self._state.get(base)
            if base != role and self._state[role] is None and trained is not None \
                    and not self._structure[base]["edits"]:
                # from_teacher: copy the teacher as earlier stages left it, not as built
                modelio.load_weights(model, inside(self.run_dir, trained), f"{base} checkpoint")
        structure.apply(model, edits)
        checkpoint = self._state[role]
        if checkpoint is not None:
            modelio.load_weights(model, inside(self.run_dir, checkpoint), f"{role} checkpoint")
        self._models[role] = model
        return model

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> list[StageRecord]:
        """Run the pipeline; the caller holds the run folder's lock (compresskit.engine.lock)."""
        import torch

        self.device = dist.init(self._device_kind(torch))
        main = dist.is_main()
        self._fresh = deep_check(self.loaded)
        names = [f"{i:02d}-{s.type}" for i, s in enumerate(self.cfg.stages)]
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale(set(names))
        common = common_hash(self.loaded, self.device.type, dist.world_size())
        versions = model_hashes(self.loaded)
        artifact_writers: list[str] = []
        artifacts: list[Artifact] = []
        for index, (stage_cfg, name) in enumerate(zip(self.cfg.stages, names, strict=True)):
            stage_hash = _digest({
                "common": common, "index": index,
                "stage": stage_cfg.model_dump(mode="json", exclude=NOT_HASHED),
                "models": {r: self._version(r, versions) for r in stage_cfg.models_needed},
                "artifacts": artifact_writers if stage_cfg.reads_artifacts else [],
                # the definitions of the pipeline's own targets a stage measures on
                "targets": {t: self.cfg.targets[t].model_dump(mode="json")
                            for t in getattr(stage_cfg, "targets", []) if t in self.cfg.targets},
            })
            # Rank 0 alone reads the run folder; the others follow its decision.
            manifest = dist.broadcast_object(self._cached(name, stage_hash) if main else None)
            status = "cached"
            if manifest is not None:
                # Other ranks take only the structure: rank 0 broadcasts weights before use.
                self._adopt(manifest, weights=main)
                self.console.print(f"[dim]{name}: cached[/dim]")
            elif not stage_cfg.every_rank and not main:
                dist.barrier()  # export, benchmark: rank 0's work, with rank 0's files
                continue
            else:
                manifest = self._run_stage(index, name, stage_cfg, stage_hash, artifacts)
                status = "done"
            artifacts += manifest.get("artifacts", [])
            self._advance(manifest, stage_hash, versions, artifact_writers)
            seconds = 0.0 if status == "cached" else manifest["seconds"]
            budget = stage_cfg.time_budget
            if status == "done" and budget is not None and seconds > budget:
                self.console.print(f"[yellow]warning:[/yellow] {name} took {seconds:.1f} s, "
                                   f"over its time_budget of {budget:g} s")
            self.records.append(StageRecord(index, stage_cfg.type, name, status, seconds,
                                            manifest, budget))
        return self.records

    def _version(self, role: str, versions: dict[str, str]) -> str:
        """A model's version; one not yet changed that is built from another model
        (from_teacher) follows that model's version."""
        base = self._structure[role]["base"]
        if base != role and self._state.get(role) is None:
            return _digest([versions[role], versions[base]])
        return versions[role]

    def _cached(self, name: str, stage_hash: str) -> dict[str, Any] | None:
        """The stage's manifest when it finished with this very hash and its files are there."""
        manifest = read_json(self.run_dir / name / MANIFEST)
        if (self.force or not isinstance(manifest, dict) or manifest.get("hash") != stage_hash
                or manifest.get("status") != "done" or manifest.get("incomplete")
                or not self._outputs_exist(manifest)):
            return None
        return manifest

    def _run_stage(self, index: int, name: str, stage_cfg: Any, stage_hash: str,
                   artifacts: list[Artifact]) -> dict[str, Any]:
        import torch

        from compresskit.engine.context import StageContext
        from compresskit.stages import STAGES

        main = dist.is_main()
        self.console.print(f"[bold]{name}[/bold]: running")
        start = time.perf_counter()
        work = self._work_dir(name, stage_hash) if main else Path(tempfile.mkdtemp())
        if stage_cfg.every_rank:  # same weights on every rank before training
            for role in stage_cfg.models_needed:
                dist.broadcast_module(self._model(role))
        ctx = StageContext(
            config=self.cfg, index=index, name=name, run_dir=self.run_dir, work_dir=work,
            device=self.device, seed=self.cfg.seed + index, console=self.console,
            progress=self.progress, artifacts=list(artifacts),
            _data=self._data, _model=self._model, _structure=self._structure_of,
            base_dir=self.loaded.base_dir)
        try:
            torch.manual_seed(ctx.seed)
            with contextlib.nullcontext() if stage_cfg.every_rank else dist.alone():
                result = STAGES.get(stage_cfg.type).run(stage_cfg, ctx)
            if main:
                manifest = self._commit(index, name, stage_cfg.type, stage_hash, work,
                                        self.run_dir / name, result,
                                        time.perf_counter() - start)
            else:
                self._models.update(result.updated)
                self._structure.update(result.structure)
                manifest = {"updated": sorted(result.updated), "seconds": 0.0}
                shutil.rmtree(work, ignore_errors=True)
            if not stage_cfg.every_rank:
                dist.barrier()
            return manifest
        except BaseException as e:
            # The work folder stays: its resume checkpoints let the next run continue this
            # stage (only with the same hash). It holds no manifest, so nothing in it counts.
            self.records.append(StageRecord(index, stage_cfg.type, name, "failed",
                                            time.perf_counter() - start,
                                            time_budget=stage_cfg.time_budget))
            if isinstance(e, DiskFullError):
                raise StageError(name, f"{e.strerror}; free some space and run again: "
                                       "finished stages are kept") from None
            from compresskit.models.loading import ModelError

            if isinstance(e, ModelError):
                raise ConfigError(str(e)) from None
            raise

    @staticmethod
    def _advance(manifest: dict[str, Any], stage_hash: str, versions: dict[str, str],
                 artifact_writers: list[str]) -> None:
        """The models this stage changed are now at its version; likewise its artifacts."""
        for role in manifest.get("updated", []):
            versions[role] = stage_hash
        if manifest.get("artifacts"):
            artifact_writers.append(stage_hash)

    def _device_kind(self, torch: Any) -> str:
        want = self.cfg.device
        if want == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: cuda, but torch sees no CUDA GPU on this machine; use "
                              "device: auto or cpu")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        return want

    def _remove_stale(self, keep: set[str]) -> None:
        """Folders of stages no longer in the pipeline, finished or not."""
        for p in self.run_dir.iterdir():
            stage = p.name[1:-len(PARTIAL)] if p.name.endswith(PARTIAL) else p.name
            if p.is_dir() and STAGE_DIR.match(stage) and stage not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _work_dir(self, name: str, stage_hash: str) -> Path:
        """The stage's unfinished folder: kept from an interrupted run of the very same stage
        (so training resumes inside it), else made anew."""
        work = self.run_dir / f".{name}{PARTIAL}"
        marker = read_json(work / RESUME_STATE)
        if not (isinstance(marker, dict) and marker.get("hash") == stage_hash):
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            write_json(work / RESUME_STATE, {"hash": stage_hash})
        else:
            self.console.print(f"  [dim]{name}[/dim] resuming from the interrupted run")
        return work

    def _outputs_exist(self, manifest: dict[str, Any]) -> bool:
        """A manifest whose files are gone, or that points outside the run folder, is stale."""
        paths = [p for p in manifest.get("state", {}).values() if p]
        paths += [a.get("path", "") for a in manifest.get("artifacts", [])]
        try:
            return all(inside(self.run_dir, p).is_file() for p in paths)
        except (ValueError, TypeError):
            return False

    def _structure_of(self, role: str) -> Structure:
        return self._structure[role]

    def _adopt(self, manifest: dict[str, Any], weights: bool = True) -> None:
        """Take a cached stage's outputs as the current state; live models reload lazily."""
        for role in manifest.get("updated", []):
            shape = manifest.get("structure", {}).get(role, {"base": role, "edits": []})
            if shape != self._structure[role]:
                self._structure[role] = shape
                self._models.pop(role, None)
            path = manifest.get("state", {}).get(role)
            if weights and path != self._state.get(role):
                self._state[role] = path
                self._models.pop(role, None)

    def _commit(self, index: int, name: str, kind: str, stage_hash: str, work: Path,
                final: Path, result: Any, seconds: float) -> dict[str, Any]:
        from compresskit.models.loading import save_weights

        for role, model in result.updated.items():
            save_weights(model, work / f"{role}.pt")
            self._state[role] = f"{name}/{role}.pt"
            self._models[role] = model
        self._structure.update(result.structure)
        manifest = {
            "stage": name, "index": index, "type": kind, "hash": stage_hash, "status": "done",
            "seconds": seconds, "params": result.params, "metrics": result.metrics,
            "state": dict(self._state), "structure": dict(self._structure),
            "updated": sorted(result.updated),
            "artifacts": result.artifacts,
            "benchmarks": result.benchmarks, "compresskit_version": __version__,
            "incomplete": result.incomplete,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for leftover in [*work.glob("*.resume.pt"), work / RESUME_STATE]:
            leftover.unlink(missing_ok=True)
        write_json(work / MANIFEST, manifest)
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
        return manifest
