"""Compressing to a budget measured on the target (prune's and lowrank's `target_latency`,
`latency_ms` and `target_size`): NetAdapt's idea (Yang et al. 2018), adapted.

Per step: every prunable group is pruned alone at a few ratios (lowrank: every layer factorised
alone at a few ranks); each copy is exported and timed
on the target, interleaved with the model as it is and the stage's input (a latency table, in
fractions of the input's time), its FP32 file weighed, and its outputs on a few hundred training
samples compared with the unpruned model's (the KD loss at the stage's temperature: how much
that cut costs). A ratio per group is then chosen for the least predicted loss that meets the
step's budget (a Lagrangian: each group takes the level with the least loss minus lambda times
the saving, lambda found by bisection). The chosen model is exported and timed, interleaved;
when the table's prediction misses by more than the tolerance, the saving asked of the solver
is corrected (cuts compound, so by a factor, or by interpolating between two tries that bracket
the goal) and the plan chosen again. Deep cuts (below 0.4x) take two or three steps
with recovery between them, as AMC found one-shot deep cuts lose accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compresskit.backends import ort as ort_backend
from compresskit.backends import pruning
from compresskit.backends.onnx_export import ExportError, export_onnx
from compresskit.engine.artifacts import atomic_path, sha256_file
from compresskit.engine.context import StageContext
from compresskit.errors import StageError
from compresskit.measure.targets import Target
from compresskit.models import inputs

LEVELS = (0.25, 0.5, 0.75)
"""Share of a group's channels removed in the table (then rounded by round_to)."""
RANK_LEVELS = (0.5, 0.25, 0.125)
"""lowrank's table: share of a layer's MACs its factorised pair keeps."""
SAMPLES = 256
"""Training samples whose outputs score each cut."""
TOLERANCE = 0.05
"""How far the measured cost may sit from a step's budget before the plan is chosen again."""
ROUNDS = 6


@dataclass
class Entry:
    group: str
    level: float
    saving: float
    """Cost saved against the model as it is: a fraction of the stage input's latency, or
    bytes."""
    damage: float


def steps_for(fraction: float) -> int:
    return 1 if fraction >= 0.4 else 2 if fraction >= 0.16 else 3


class BudgetSearch:
    """One stage's way to a latency or size budget; `run` leaves the model in job.model. What
    a cut is comes from the subclass: `groups` of a model, each cut at `levels`, and `apply`."""

    levels: tuple[float, ...] = LEVELS
    nothing_to_cut = "nothing in this model can be cut on its own"
    deep_steps = True
    """Whether budgets below 0.4x take two or three steps with recovery between them."""

    def __init__(self, job: Any, cfg: Any, ctx: StageContext, target: Target, recover: Any):
        self.job, self.cfg, self.ctx, self.target, self.recover = job, cfg, ctx, target, recover
        if target.remote is None and cfg.target_size is None:  # before any work: can it time?
            ok, why = ort_backend.available(target)
            if not ok:
                raise StageError(ctx.name, (
                    f"the budget is measured on target '{target.name}', which this machine "
                    f"cannot run: {why}; give the stage a target it can run ('target: cpu'), "
                    "or a remote one"))
        self.kind = "bytes" if cfg.target_size is not None else "latency"
        self.device: dict[str, Any] | None = None  # what a remote target says it is
        self.tables_from_cache = 0
        self.work = ctx.work_dir / "budget"
        self.work.mkdir(parents=True, exist_ok=True)
        self.example = job.example
        self.x_export = inputs.apply(inputs.take(job.x, slice(0, 2)), torch.from_numpy)
        self.samples = self._samples()

    # -- measuring ------------------------------------------------------------------------
    def _samples(self) -> Any:
        from compresskit.stages._int8 import calibration

        return inputs.cat(calibration(self.ctx, SAMPLES))

    def export(self, model: nn.Module, name: str) -> Path:
        path = self.work / f"{name}.onnx"
        export_onnx(copy.deepcopy(model).eval(), self.x_export, path, 17,
                    self.ctx.config.inputs)
        return path

    def _outputs(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return inputs.call(model.eval(), self.samples).float()

    def _damage(self, out: torch.Tensor, ref: torch.Tensor) -> float:
        if self.ctx.config.task == "embed":
            return float(1 - torch.nn.functional.cosine_similarity(out, ref, dim=1).mean())
        t = self.cfg.temperature
        return float(torch.nn.functional.kl_div(
            torch.log_softmax(out / t, 1), torch.log_softmax(ref / t, 1), log_target=True,
            reduction="batchmean") * t * t)

    def _times(self, paths: dict[str, Path], reference: Path) -> dict[str, float]:
        """Each file's latency as a fraction of `reference`'s, timed interleaved with it on the
        target (batch 1, one thread), on its device when it is remote: the median of paired
        ratios."""
        rows = measure_on(self.ctx, self.target, {"__reference": reference, **paths},
                          self.job.x, self.cfg.latency_runs, self.work / "timing")
        self.device = rows[0].get("device") or self.device
        speed = {r["artifact"]: r["speedup"] for r in rows}
        return {k: 1.0 / speed[k] for k in paths}

    def _cost(self, paths: dict[str, Path], reference: Path) -> dict[str, float]:
        if self.kind == "bytes":
            return {k: float(p.stat().st_size) for k, p in paths.items()}
        return self._times(paths, reference)

    # -- the plan ---------------------------------------------------------------------------
    def groups(self, model: nn.Module) -> list[str]:
        raise NotImplementedError

    def apply(self, model: nn.Module, plan: dict[str, float]) -> nn.Module | None:
        """A copy of `model` with `plan` (group -> level) applied, or None when that cut
        cannot be made or breaks the forward pass."""
        raise NotImplementedError

    def _table(self, model: nn.Module, current: Path, reference: Path,
               step: int) -> list[Entry]:
        """The cost table of `model` (exported as `current`), from the run's cache when the
        same model, stage input, target and settings measured one before (a rerun that changes
        only recovery, say): <run>/cache/budget/<key>.json."""
        path = self.ctx.run_dir / "cache" / "budget" / f"{self._table_key(current, reference)}.json"
        if path.is_file():
            entries = [Entry(**e) for e in json.loads(path.read_text())]
            self.tables_from_cache += 1
            self.ctx.log(f"step {step}: the table of {len(entries)} cuts from the cache "
                         f"({path.relative_to(self.ctx.run_dir)})")
            return entries
        entries = self._measure_table(model, current, reference, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps([dataclasses.asdict(e) for e in entries]))
        return entries

    def _table_key(self, current: Path, reference: Path) -> str:
        """What a table depends on: the model and the stage input (their exported bytes), the
        kind of cut and its levels, the cost measured and where, and the samples that score
        the cuts."""
        parts = [sha256_file(current), sha256_file(reference), type(self).__name__,
                 self.levels, self.kind, self.target.to_json(), self.cfg.latency_runs,
                 self.cfg.temperature, SAMPLES, self.settings(),
                 self.ctx.config.data.model_dump(mode="json")]
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()
                              ).hexdigest()[:24]

    def settings(self) -> Any:
        """The subclass's settings that change which cuts exist."""
        return None

    def _measure_table(self, model: nn.Module, current: Path, reference: Path,
                       step: int) -> list[Entry]:
        roots = self.groups(model)
        base = self._outputs(model)
        files: dict[str, Path] = {}
        damage: dict[str, float] = {}
        for i, root in enumerate(roots):
            for level in self.levels:
                trial = self.apply(model, {root: level})
                if trial is None:
                    continue
                key = f"{root}@{level}"
                try:
                    files[key] = self.export(trial, f"s{step}.g{i}.{level}")
                except ExportError:
                    continue
                damage[key] = self._damage(self._outputs(trial), base)
        cost = self._cost({"__current": current, **files}, reference)
        entries = []
        for key, path in files.items():
            root, shown = key.rsplit("@", 1)
            entries.append(Entry(root, float(shown), max(0.0, cost["__current"] - cost[key]),
                                 damage[key]))
            path.unlink(missing_ok=True)
        return entries

    @staticmethod
    def solve(entries: list[Entry], need: float, buckets: int = 400
              ) -> tuple[dict[str, float], float]:
        """The plan (a level or none per group) with the least predicted damage that saves at
        least `need`: a multiple-choice knapsack over savings in `buckets` steps of `need`
        (rounded down, so the plan's predicted saving is not less). When no plan saves that
        much, the one that saves most. Returns the plan and its predicted saving."""
        if need <= 0:
            return {}, 0.0
        groups: dict[str, list[Entry]] = {}
        for e in entries:
            groups.setdefault(e.group, []).append(e)
        unit = need / buckets
        inf = float("inf")

        def step(j: int, e: Entry) -> int:
            return min(buckets, j + int(e.saving / unit))

        # states[g][j]: the least damage of the first g groups saving >= j units (j capped).
        states = [[0.0] + [inf] * buckets]
        for options in groups.values():
            prev, cur = states[-1], list(states[-1])
            for j, d in enumerate(prev):
                if d < inf:
                    for e in options:
                        k = step(j, e)
                        cur[k] = min(cur[k], d + e.damage)
            states.append(cur)
        j = max(k for k, d in enumerate(states[-1]) if d < inf)
        plan: dict[str, float] = {}
        saved = 0.0
        names = list(groups)
        for g in range(len(names) - 1, -1, -1):  # walk back: what each group took
            prev, cur = states[g], states[g + 1]
            if prev[j] == cur[j]:
                continue  # left whole on the way here
            j, e = next((jj, e) for e in groups[names[g]] for jj, d in enumerate(prev)
                        if d < inf and step(jj, e) == j and d + e.damage == cur[j])
            plan[names[g]] = e.level
            saved += e.saving
        return plan, saved

    # -- the stage --------------------------------------------------------------------------
    largest_cut = "the largest cuts the table holds"

    def reach(self, key: str, amount: float, name: str) -> dict[str, Any]:
        """Compress job.model to the budget `key: amount` on target `name`; what the report
        shows."""
        if key == "target_size":
            reference_cost = float(self.export(self.job.model, "size").stat().st_size)
            goal = amount
        else:
            reference_cost, goal = 1.0, amount
            if key == "latency_ms":
                ms = reference_latency_ms(self.ctx, self.export(self.job.model, "ms"),
                                          self.target, self.job.x, self.cfg.latency_runs,
                                          self.work / "timing")
                goal = amount / ms
                self.ctx.log(f"latency_ms {amount}: the input runs in {ms:.3f} ms on {name}, "
                             f"so {goal:.3f}x of it")
        budget: dict[str, Any] = {"key": key, "requested": amount, "target": name}
        if goal >= reference_cost:
            self.ctx.log(f"{key} {amount}: the model already meets it; left as it is")
            budget.update(measured=reference_cost, met=True, steps=[])
            return budget
        budget.update(self.run(goal, reference_cost))
        if self.device:
            budget["device"] = self.device
        budget["tables_from_cache"] = self.tables_from_cache
        if not budget["met"]:
            self.ctx.log(f"[yellow]warning:[/yellow] {key} {amount} was not met: the closest "
                         f"model measures {self._show(budget['measured'])} against the goal's "
                         f"{self._show(goal)}; {self.largest_cut} cannot go further, or the "
                         "target's timing moved")
        return budget

    def run(self, goal: float, reference_cost: float) -> dict[str, Any]:
        """Prune job.model to `goal` (a fraction of the input's latency, or bytes; the input
        costs `reference_cost`: 1.0, or its bytes), in steps with recovery; returns what the
        report shows."""
        reference = self.export(self.job.model, "input")
        steps = steps_for(goal / reference_cost) if self.deep_steps else 1
        records = []
        current_cost = reference_cost
        for step in range(1, steps + 1):
            step_goal = reference_cost * (goal / reference_cost) ** (step / steps)
            model = self.job.model
            current = self.export(model, f"s{step}.current")
            entries = self._table(model, current, reference, step)
            if not entries:
                raise StageError(self.ctx.name, self.nothing_to_cut)
            need = current_cost - step_goal
            tried: list[tuple[float, float]] = []  # (saving asked of the table, measured)
            best: dict[str, Any] | None = None
            rounds = 0
            for _ in range(ROUNDS):
                plan, predicted = self.solve(entries, need)
                trial = self.apply(model, plan) if plan else copy.deepcopy(model)
                if trial is None:  # the groups together break what each alone did not
                    raise StageError(self.ctx.name, "the planned cuts, each fine alone, break "
                                     "the forward pass together; add the layers to 'ignore'")
                measured = self._cost({"trial": self.export(trial, f"s{step}.trial")},
                                      reference)["trial"]
                rounds += 1
                miss = measured - step_goal
                record = {"plan": plan, "predicted": current_cost - predicted,
                          "measured": measured, "model": trial,
                          "score": (max(0.0, miss) / step_goal, abs(miss) / step_goal)}
                if best is None or record["score"] < best["score"]:
                    best = record
                if abs(miss) <= TOLERANCE * step_goal:
                    break
                tried.append((need, current_cost - measured))
                need = _next_need(tried, current_cost - step_goal)
            assert best is not None
            self.job.model = best["model"]
            current_cost = best["measured"]
            groups = len({e.group for e in entries})
            records.append({"step": step, "goal": step_goal, "plan": best["plan"],
                            "predicted": best["predicted"], "measured": best["measured"],
                            "rounds": rounds, "groups": groups, "table_entries": len(entries)})
            cuts = ", ".join(f"{g} {lv:.0%}" for g, lv in list(best["plan"].items())[:5])
            self.ctx.log(
                f"step {step}/{steps}: {self._show(step_goal)} wanted, "
                f"{self._show(best['predicted'])} predicted by the table, "
                f"{self._show(best['measured'])} measured; {len(best['plan'])} of {groups} "
                f"groups cut ({cuts}{', ...' if len(best['plan']) > 5 else ''})")
            self.recover(step, steps)
        final = self._cost({"final": self.export(self.job.model, "final")}, reference)["final"]
        last = records[-1]
        return {"kind": self.kind, "goal": goal, "input": reference_cost, "steps": records,
                "measured": final, "predicted": last["predicted"],
                "prediction_error": (last["measured"] - last["predicted"])
                / max(last["predicted"], 1e-12),
                "met": final <= goal * (1 + 2 * TOLERANCE),
                "within_10_percent": abs(final - goal) <= 0.1 * goal}

    def _show(self, cost: float) -> str:
        return f"{cost / 1e3:,.1f} kB" if self.kind == "bytes" else f"{cost:.3f}x"


def _next_need(tried: list[tuple[float, float]], wanted: float) -> float:
    """The saving to ask of the table next so that the measured saving is `wanted`. Cuts
    compound (a narrower layer also narrows what the next one reads), so the table's sums are
    off by a factor more than by an offset: between two tries that bracket the goal,
    interpolate; else scale the closest try by wanted / measured."""
    below = [t for t in tried if t[1] < wanted]
    above = [t for t in tried if t[1] >= wanted]
    if below and above:
        (a0, m0), (a1, m1) = max(below, key=lambda t: t[1]), min(above, key=lambda t: t[1])
        if m1 > m0:
            return a0 + (a1 - a0) * (wanted - m0) / (m1 - m0)
    asked, measured = min(tried, key=lambda t: abs(t[1] - wanted))
    return asked * wanted / measured if measured > 0 else asked * 2


def stage_target(cfg: Any, ctx: StageContext) -> str:
    """The stage's target: as given, else the benchmark stage's first, else cpu."""
    from compresskit.config import BenchmarkConfig

    return cfg.target or next((s.targets[0] for s in ctx.config.stages
                               if isinstance(s, BenchmarkConfig)), "cpu")


def measure_on(ctx: StageContext, target: Target, files: dict[str, Path], x: Any, runs: int,
               work: Path) -> list[dict[str, Any]]:
    """`files` timed interleaved at batch 1 on one thread on `target`, through the benchmark's
    own protocol (measure/bench.py), so a remote device or CUDA is timed where it is; a target
    that cannot measure is a StageError."""
    from compresskit.backends import remote
    from compresskit.measure import bench

    one = inputs.take(x, slice(0, 1))
    settings = bench.Settings(batch_sizes=(1,), threads=1, runs=runs,
                              warmup=max(5, runs // 10), memory=False)

    def feeds(sess: Any, bs: int) -> Any:
        return inputs.feeds(ort_backend.input_names(sess), ort_backend.batch_of(one, bs))

    try:
        return bench.measure(files, target, settings, feeds, work)
    except (ort_backend.TargetUnavailable, remote.RemoteError) as e:
        raise StageError(ctx.name, (
            f"the budget is measured on target '{target.name}', which cannot measure now: {e}; "
            "fix the target, or give the stage another 'target'")) from None


def reference_latency_ms(ctx: StageContext, path: Path, target: Target, x: Any, runs: int,
                         work: Path) -> float:
    """The stage input's batch-1 latency on the target, one thread (for latency_ms)."""
    return float(measure_on(ctx, target, {"input": path}, x, runs, work)[0]["latency_ms"]["p50"])


class BudgetPruner(BudgetSearch):
    """prune's budgets: torch-pruning's groups, each cut at LEVELS of its channels."""

    largest_cut = "the largest cuts the table holds (75% of a group)"
    nothing_to_cut = ("no group of this model can be pruned on its own (torch-pruning found "
                      "none, or every cut broke the forward pass); a budget needs prunable "
                      "groups")

    def __init__(self, job: Any, cfg: Any, ctx: StageContext, args: dict[str, Any],
                 target: Target, recover: Any):
        super().__init__(job, cfg, ctx, target, recover)
        self.args = {**args, "global_ranking": False}

    def settings(self) -> Any:
        return self.args

    def groups(self, model: nn.Module) -> list[str]:
        return pruning.group_roots(model, self.example, **self.args)

    def apply(self, model: nn.Module, plan: dict[str, float]) -> nn.Module | None:
        trial = copy.deepcopy(model)
        try:
            pruner = pruning.make_pruner(trial, self.example, ratio=0.0, steps=1,
                                         ratios=plan, **self.args)
            pruning.step(pruner, trial)
            with torch.no_grad():
                inputs.call(trial.eval(), self.example)
        except Exception:  # a cut torch-pruning cannot make on this model: not an option
            return None
        return trial
