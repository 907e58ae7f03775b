"""Checks that need the models: sources resolve, checkpoints fit, the input shape is accepted.

Run by `validate` and before the first stage of `run`, so every problem surfaces before any
heavy work, each located at its key's line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from compresskit.engine.loader import LoadedPipeline
from compresskit.errors import ConfigError, Problem
from compresskit.models.sources import SourceError, locate, parse_spec, resolve

if TYPE_CHECKING:
    from torch import nn

ROLES = ("teacher", "student")


def model_seed(seed: int, role: str) -> int:
    """Each model gets its own seed, so building one never shifts another's initialisation."""
    import zlib

    index = ROLES.index(role) if role in ROLES else 2 + zlib.crc32(role.encode()) % 997
    return seed * 1000 + index


def missing_files(loaded: LoadedPipeline) -> list[Problem]:
    """Source files and checkpoints that do not exist: found without importing torch."""
    problems = []
    cfg = loaded.config
    sections: list[tuple[tuple[str, ...], str | None, str | None]] = [
        (("data",), cfg.data.source, None)] + [
        (path, m.source, m.checkpoint) for path, m in cfg.model_sections().values()]
    from compresskit.models import hf
    for section, source, checkpoint in sections:
        if source is None:
            continue  # from_teacher
        if section == ("data",) and ":" not in source:
            continue  # a built-in data source, checked by name in deep_check
        try:
            if hf.is_hf(source):
                hf.folder(source, loaded.base_dir)
                continue
            spec = parse_spec(source)
            if spec.is_file:
                locate(spec.module, loaded.base_dir, "file")
        except SourceError as e:
            problems.append(loaded.problem((*section, "source"), str(e)))
        if checkpoint:
            try:
                locate(checkpoint, loaded.base_dir, f"{section[-1]} checkpoint")
            except SourceError as e:
                problems.append(loaded.problem((*section, "checkpoint"), str(e)))
    return problems


def deep_check(loaded: LoadedPipeline) -> dict[str, nn.Module]:
    """Build every configured model and run one dry forward pass; return the built models."""
    problems = missing_files(loaded)
    flagged = {p.key.rsplit(".", 1)[0] for p in problems if p.key}
    from compresskit.config import InputConfig
    from compresskit.models import loading as modelio

    cfg = loaded.config
    models: dict[str, nn.Module] = {}
    if "data" not in flagged:  # keys are "data.source", "teacher.source", "models.x.source"
        from compresskit.data.sources import DATASETS

        try:
            if ":" in cfg.data.source:
                resolve(cfg.data.source, loaded.base_dir)
            else:
                DATASETS.get(cfg.data.source)
        except SourceError as e:
            problems.append(loaded.problem(("data", "source"), str(e)))
        except KeyError as e:
            problems.append(loaded.problem(("data", "source"), str(e.args[0])))
    sections = sorted(cfg.model_sections().items(),
                      key=lambda item: item[1][1].from_teacher is not None)
    for role, (path, mcfg) in sections:
        if ".".join(path) in flagged:
            continue
        if mcfg.from_teacher is not None:
            model = _from_teacher(loaded, models, role, path, problems)
            if model is None:
                continue
        else:
            try:
                model = modelio.instantiate(mcfg, role, loaded.base_dir,
                                            model_seed(cfg.seed, role))
            except modelio.ModelError as e:
                problems.append(loaded.problem((*path, "source"), str(e)))
                continue
            try:
                modelio.load_checkpoint(model, mcfg, role, loaded.base_dir)
            except modelio.ModelError as e:
                problems.append(loaded.problem((*path, "checkpoint"), str(e)))
                continue
            try:
                model = modelio.adapt(model, mcfg.output, cfg.inputs, role, cfg.task)
            except modelio.ModelError as e:
                problems.append(loaded.problem(("input",), str(e)))
                continue
        try:
            modelio.dry_forward(model, cfg.inputs, role, cfg.task)
        except modelio.ModelError as e:
            at = ("input", "shape") if isinstance(cfg.input, InputConfig) else ("input",)
            problems.append(loaded.problem(at, str(e)))
            continue
        models[role] = model
    if not problems and cfg.task == "causal-lm":
        problems += _vocabulary_problems(loaded, models)
    elif not problems:
        problems += _distill_problems(loaded, models)
    if problems:
        raise ConfigError(problems)
    return models


def _from_teacher(loaded: LoadedPipeline, models: dict[str, nn.Module], role: str,
                  path: tuple[str, ...], problems: list[Problem]) -> nn.Module | None:
    """The student as a copy of the (already built) teacher with the chosen layers kept."""
    import copy

    from compresskit.models import structure
    teacher = models.get("teacher")
    if teacher is None:
        return None  # the teacher's own problem is reported
    model = copy.deepcopy(teacher)
    try:
        structure.apply(model, structure.initial_structure(loaded.config, role)["edits"])
    except ValueError as e:
        problems.append(loaded.problem((*path, "from_teacher"), str(e)))
        return None
    return model


def _distill_problems(loaded: LoadedPipeline, models: dict[str, nn.Module]) -> list[Problem]:
    """Distill stages whose loss terms name modules the models lack, whose teachers disagree
    on the number of classes, or whose feature shapes no adapter can bridge."""
    from compresskit.config import DistillConfig
    from compresskit.distill.objective import problems
    from compresskit.models.loading import example_input

    out = []
    example = example_input(loaded.config.inputs)
    for i, stage in enumerate(loaded.config.stages):
        if not isinstance(stage, DistillConfig) or stage.mode == "mutual" \
                or "student" not in models:
            continue
        student = models["student"]
        teachers = {t.model: models[t.model] for t in stage.teachers if t.model in models} \
            if stage.mode == "kd" else {"self": student}
        if not teachers:
            continue
        out += [loaded.problem(("stages", i, *key), msg)
                for key, msg in problems(stage, student, teachers, example)]
    return out


def _vocabulary_problems(loaded: LoadedPipeline, models: dict[str, nn.Module]) -> list[Problem]:
    """task causal-lm: a teacher and a student that do not share one vocabulary cannot be
    distilled token by token (what TRL and torchtune users ask about most); found here, before
    any training, from the output sizes and the tokenizers' vocabularies."""
    from compresskit.models import hf
    from compresskit.models.sources import SourceError

    teacher, student = models.get("teacher"), models.get("student")
    if teacher is None or student is None:
        return []
    sections = loaded.config.model_sections()

    def head(model: nn.Module) -> int | None:
        inner = getattr(model, "model", model)
        get = getattr(inner, "get_output_embeddings", None)
        emb = get() if callable(get) else None
        return int(emb.weight.shape[0]) if emb is not None else None

    where = (*sections["student"][0], "source")
    tv, sv = head(teacher), head(student)
    if tv is not None and sv is not None and tv != sv:
        return [loaded.problem(where, f"the teacher predicts {tv} tokens and the student {sv}: "
                               "token-level distillation needs one vocabulary; give the student "
                               "the teacher's tokenizer and vocab_size, or build it with "
                               "from_teacher")]
    sources = [sections[r][1].source for r in ("teacher", "student")]
    if all(hf.is_hf(x) for x in sources) and sources[0] != sources[1]:
        try:
            vocabs = [hf.load_tokenizer(str(x), loaded.base_dir).get_vocab() for x in sources]
        except SourceError as e:
            return [loaded.problem(where, str(e))]
        if vocabs[0] != vocabs[1]:
            differ = sorted(set(vocabs[0].items()) ^ set(vocabs[1].items()), key=str)[:3]
            return [loaded.problem(where, "the teacher's and the student's tokenizers differ "
                                   f"(e.g. {', '.join(repr(k) for k, _ in differ)}): the same "
                                   "id would mean different text; use one tokenizer for both")]
    return []
