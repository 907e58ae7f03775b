"""The distill stage's loss: its `losses:` terms composed by weight, mixed with cross-entropy by
alpha, for one student against the teachers' outputs (live or cached)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from compresskit.config import DistillConfig, FeatureTerm
from compresskit.distill.features import FeatureError, Taps, adapter, check_names
from compresskit.distill.teacher_cache import TeacherOutputs, output_key
from compresskit.models.inputs import call, perturb
from compresskit.ops import kd
from compresskit.train.loop import Batch
from compresskit.train.padding import Padding


@dataclass(frozen=True)
class Teacher:
    """One teacher as the objective sees it: its name, weight and softmax temperature."""

    name: str
    weight: float
    temperature: float


def requested_modules(cfg: DistillConfig) -> tuple[list[str], list[str]]:
    """Module names the loss terms read from the student and from the (first) teacher."""
    student: list[str] = []
    teacher: list[str] = []
    for term in cfg.losses:
        if term.type in ("features", "attention", "cosine", "relations"):
            if term.student:  # type: ignore[union-attr]
                student.append(term.student)  # type: ignore[union-attr]
            if term.teacher:  # type: ignore[union-attr]
                teacher.append(term.teacher)  # type: ignore[union-attr]
    return list(dict.fromkeys(student)), list(dict.fromkeys(teacher))


def _label(i: int, term: Any) -> str:
    return f"losses[{i}] ({term.type})"


def _shape_of(x: torch.Tensor, term: Any) -> tuple[int, ...]:
    return tuple(kd.pooled(x).shape[1:]) if term.type == "cosine" else tuple(x.shape[1:])


class Distiller(nn.Module):
    """The student, the adapters its terms need, and (mode ema) the moving-average teacher.
    Training this module trains the student; only `student` is kept and exported."""

    def __init__(self, student: nn.Module, adapters: dict[str, nn.Module],
                 ema: nn.Module | None = None):
        super().__init__()
        self.student = student
        self.adapters = nn.ModuleDict(adapters)
        self.ema = ema
        if ema is not None:
            ema.requires_grad_(False)

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        return self.student(*x)


def problems(cfg: DistillConfig, student: nn.Module, teachers: dict[str, nn.Module],
             example: torch.Tensor) -> list[tuple[tuple[Any, ...], str]]:
    """What cannot work with these models, as (key path in the stage, message): module names
    they lack, teachers that disagree on the number of classes, shapes no adapter bridges,
    `freeze` patterns that name no parameter of the student."""
    from compresskit.train.loop import unmatched_freeze

    out: list[tuple[tuple[Any, ...], str]] = [
        (("freeze",), m) for m in unmatched_freeze(student, cfg.freeze)]
    first = next(iter(teachers))
    for i, term in enumerate(cfg.losses):
        if term.type == "kl":
            continue
        for side, model, who in (("student", student, "student"),
                                 ("teacher", teachers[first], f"teacher '{first}'")):
            name = getattr(term, side)
            if name is not None:
                out += [(("losses", i, side), p) for p in check_names(model, [name], who)]
    if out:
        return out
    try:
        s_out, s_feats = _probe(student, requested_modules(cfg)[0], example)
        t_runs = {n: _probe(m, requested_modules(cfg)[1] if n == first else [], example)
                  for n, m in teachers.items()}
    except FeatureError as e:
        return [(("losses",), str(e))]
    classes = {n: int(o.shape[-1]) for n, (o, _) in t_runs.items()}
    if len(set(classes.values())) > 1 or (cfg.uses_kl and
                                          s_out.shape[-1] not in classes.values()):
        shown = ", ".join(f"'{n}' {c}" for n, c in classes.items())
        out.append((("teachers",), f"the teachers and the student must give the same number "
                    f"of classes to be distilled together; the teachers give {shown} and the "
                    f"student {s_out.shape[-1]}"))
    t_out, t_feats = t_runs[first]
    for i, term in enumerate(cfg.losses):
        if term.type == "kl":
            continue
        s = s_feats[term.student] if term.student else s_out  # type: ignore[union-attr]
        t = t_feats[term.teacher] if term.teacher else t_out  # type: ignore[union-attr]
        if term.type == "relations":
            for side, v in (("student", s), ("teacher", t)):
                if v.dim() != 3 or v.shape[-1] % term.heads:  # type: ignore[union-attr]
                    out.append((("losses", i), f"{_label(i, term)}: the {side}'s module gives "
                                f"{list(v.shape[1:])} (without batch); relations need [tokens, "
                                f"width] with the width a multiple of heads "
                                f"({term.heads})"))  # type: ignore[union-attr]
        elif term.type == "attention" and (s.dim() != 4 or t.dim() != 4):
            out.append((("losses", i), f"{_label(i, term)}: attention transfer needs [C, H, W] "
                        f"feature maps; the student's output is {list(s.shape[1:])}, the "
                        f"teacher's {list(t.shape[1:])} (without batch)"))
        elif term.type != "attention":
            try:
                adapter(_shape_of(s, term), _shape_of(t, term), _label(i, term))
            except FeatureError as e:
                out.append((("losses", i), str(e)))
    return out


@torch.no_grad()
def _probe(model: nn.Module, names: list[str],
           example: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    was_training = model.training
    taps = Taps(model.eval(), names)
    try:
        out = call(model, example)
        return out, {n: taps.take(n) for n in names}
    finally:
        taps.close()
        model.train(was_training)


class Objective:
    """loss(batch) = alpha * sum_i w_i * term_i + (1 - alpha) * CE, for `Distiller` training."""

    def __init__(self, cfg: DistillConfig, distiller: Distiller, source: TeacherOutputs,
                 teachers: list[Teacher], temperature: float, noise: float = 0.0,
                 padding: Padding | None = None, trimmed: bool = False):
        self.cfg, self.source, self.teachers = cfg, source, teachers
        self.padding = padding
        """Which input is the attention mask (relations ignore padded tokens)."""
        self.trimmed = trimmed
        """Batches come with their padding cut (data.group_by_length)."""
        self.temperature, self.noise = temperature, noise
        self.first = teachers[0].name
        self.student_modules, self.teacher_modules = requested_modules(cfg)
        self.taps = Taps(distiller.student, self.student_modules, "student")

    @staticmethod
    def adapters(cfg: DistillConfig, student: nn.Module, teacher: nn.Module,
                 example: torch.Tensor) -> dict[str, nn.Module]:
        """The learned bridges between student and teacher widths, by term index."""
        s_names, t_names = requested_modules(cfg)
        s_out, s_feats = _probe(student, s_names, example)
        t_out, t_feats = _probe(teacher, t_names, example)
        made: dict[str, nn.Module] = {}
        for i, term in enumerate(cfg.losses):
            if term.type not in ("features", "cosine"):  # relations need no bridge
                continue
            s = s_feats[term.student] if term.student else s_out  # type: ignore[union-attr]
            t = t_feats[term.teacher] if term.teacher else t_out  # type: ignore[union-attr]
            bridge = adapter(_shape_of(s, term), _shape_of(t, term), _label(i, term))
            if bridge is not None:
                made[str(i)] = bridge
        return made

    def __call__(self, net: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        x = batch.x
        if self.noise:
            x = perturb(x, self.noise)
        logits = call(net, x)
        if self.noise and self.source.cached is None:
            teacher = self.source.live(perturb(batch.x, self.noise))
        else:
            teacher = self.source(batch)
        distiller = cast(Distiller, getattr(net, "module", net))  # unwrap DDP
        terms: dict[str, float] = {}
        total = logits.new_zeros(())
        for i, term in enumerate(self.cfg.losses):
            value = self._term(i, term, logits, teacher, distiller, x)
            label = f"{term.type}{i}" if len(self.cfg.losses) > 1 else term.type
            terms[label] = float(value.detach())
            total = total + term.weight * value
        return kd.mix_with_labels(total, logits, batch.y, self.cfg.alpha, terms)

    def _term(self, i: int, term: Any, logits: torch.Tensor, teacher: dict[str, torch.Tensor],
              distiller: Distiller, x: Any) -> torch.Tensor:
        if term.type == "kl":
            only = self.teachers[0]
            if len(self.teachers) == 1 and only.temperature == self.temperature:
                return kd.soft_kl(logits, teacher[only.name], self.temperature)  # log-space
            target = kd.combined_targets(
                [teacher[t.name] for t in self.teachers], [t.weight for t in self.teachers],
                [t.temperature for t in self.teachers], self.cfg.confidence_weighting)
            return kd.kl_to_target(logits, target, self.temperature)
        s = self.taps.take(term.student) if term.student else logits
        t = teacher[output_key(self.first, term.teacher)] if term.teacher else \
            teacher[self.first]
        if self.trimmed and t.dim() == 3 and s.dim() == 3 and t.shape[1] > s.shape[1]:
            t = t[:, :s.shape[1]]  # cached at full length; this batch's padding was cut
        if term.type == "relations":
            mask = None if self.padding is None else x[self.padding.mask]
            return kd.relation_loss(s, t, term.heads, mask)
        if term.type == "attention":
            return kd.attention_loss(s, t)
        if term.type == "cosine":
            s, t = kd.pooled(s), kd.pooled(t)
        bridge = distiller.adapters[str(i)] if str(i) in distiller.adapters else None
        if bridge is not None:
            s = bridge(s)
        if isinstance(term, FeatureTerm):
            mask = None if self.padding is None else x[self.padding.mask]
            return kd.feature_distance(s, t, term.loss, mask)
        return kd.cosine_loss(s, t)

    def close(self) -> None:
        self.taps.close()
