"""YAML -> overrides (a.b=c) -> validation -> one error listing every problem, with line numbers.

Nothing here imports torch: `compresskit validate` checks the schema instantly, and the deeper
checks that need the models (sources, checkpoints, a dry forward pass) live in `checks.py`.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from compresskit.config import (
    STAGE_CONFIGS,
    InputConfig,
    LossTerm,
    PipelineConfig,
    order_problems,
)
from compresskit.errors import ConfigError, Problem
from compresskit.registry import did_you_mean

MAX_PIPELINE_BYTES = 1_000_000

Path_ = tuple[Any, ...]


@dataclass
class LoadedPipeline:
    """A validated pipeline and where each of its keys came from."""

    config: PipelineConfig
    path: Path
    """The pipeline file as the user named it (or '<code>' for a dict built in Python)."""
    base_dir: Path
    """Where relative paths resolve first: the pipeline file's folder."""
    raw: dict[str, Any]
    lines: dict[Path_, int] = field(default_factory=dict)

    def problem(self, path: Path_, message: str) -> Problem:
        return Problem(message, file=str(self.path), line=line_of(self.lines, path),
                       key=format_path(path))


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    """Line of the deepest prefix of `path` that exists in the file."""
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _read_text(path: Path) -> str:
    if not path.exists():
        raise ConfigError(Problem(f"pipeline file not found: {path}", file=str(path)))
    if path.is_dir():
        raise ConfigError(Problem("is a folder, not a pipeline file", file=str(path)))
    size = path.stat().st_size
    if size > MAX_PIPELINE_BYTES:
        raise ConfigError(Problem(
            f"the file is {size / 1e6:.1f} MB; a pipeline file is a small YAML document "
            f"(limit {MAX_PIPELINE_BYTES // 1_000_000} MB). Is this the right file?",
            file=str(path)))
    data = path.read_bytes()
    if b"\x00" in data:
        raise ConfigError(Problem("is a binary file, not YAML text", file=str(path)))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(Problem(f"is not UTF-8 text (byte {e.start})", file=str(path))) from None


def _compose(text: str, file: str) -> tuple[Any, dict[Path_, int]]:
    """Parse safely, keeping the line of every key and list item; duplicate keys are errors."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        what = getattr(e, "problem", None) or str(e)
        context = getattr(e, "context", None)
        msg = f"malformed YAML: {what}" + (f" ({context})" if context else "")
        raise ConfigError(Problem(msg, file=file, line=mark.line + 1 if mark else None)) from None
    if node is None:
        raise ConfigError(Problem("the file is empty; see pipelines/digits.yaml for an example",
                                  file=file))
    lines: dict[Path_, int] = {}
    dupes: list[Problem] = []

    def walk(n: yaml.Node, path: Path_) -> None:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            seen: set[Any] = set()
            for k, v in n.value:
                key = k.value
                if key in seen:
                    dupes.append(Problem(f"duplicate key '{key}'", file=file,
                                         line=k.start_mark.line + 1,
                                         key=format_path((*path, key))))
                seen.add(key)
                lines[(*path, key)] = k.start_mark.line + 1
                walk(v, (*path, key))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, (*path, i))

    walk(node, ())
    if dupes:
        raise ConfigError(dupes)
    try:
        data = yaml.SafeLoader(text).get_single_data()
    except yaml.YAMLError as e:  # e.g. a constructor error for an unknown tag
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(Problem(f"malformed YAML: {getattr(e, 'problem', e)}", file=file,
                                  line=mark.line + 1 if mark else None)) from None
    return data, lines


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[Problem]:
    """Apply `a.b.c=value` (value parsed as YAML) in place; list indices are numbers."""
    problems: list[Problem] = []
    for item in overrides:
        where = f"override '{item}'"
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(Problem(f"{where}: expected key.path=value, e.g. stages.1.epochs=5"))
            continue
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        parts: list[Any] = [int(p) if p.isdigit() else p for p in key.strip().split(".")]
        node: Any = data
        try:
            for i, part in enumerate(parts[:-1]):
                if isinstance(node, dict):
                    node = node.setdefault(part, {})
                elif isinstance(node, list) and isinstance(part, int):
                    node = node[part]
                else:
                    raise LookupError(format_path(tuple(parts[: i + 1])))
            last = parts[-1]
            if isinstance(node, dict):
                node[last] = parsed
            elif isinstance(node, list) and isinstance(last, int) and last < len(node):
                node[last] = parsed
            else:
                raise LookupError(key)
        except IndexError:  # a list index past the end (stages.9 of 5 stages)
            problems.append(Problem(f"{where}: there is no '{key.strip()}' to set in this "
                                    "pipeline (a list index past its end)"))
        except LookupError as e:
            problems.append(Problem(f"{where}: there is no '{e.args[0] if e.args else key}' "
                                    "to set in this pipeline"))
    return problems


def _tagged(union: Any) -> dict[str, type[BaseModel]]:
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in members}


LOSS_TERMS = _tagged(LossTerm)
TAGGED: dict[str, type[BaseModel]] = {**STAGE_CONFIGS, **LOSS_TERMS}
"""Every `type:` tag of a tagged union and the model it selects (tags are distinct)."""


def _model_at(loc: Path_) -> type[BaseModel] | None:
    """The pydantic model class that validates the value at `loc` (to suggest valid keys)."""
    if loc[:1] == ("input",) and all(isinstance(p, int) for p in loc[1:]):
        return InputConfig  # one input, or one of a list
    current: Any = PipelineConfig
    for part in loc:
        origin = typing.get_origin(current)
        if origin is typing.Annotated:
            current = typing.get_args(current)[0]
            origin = typing.get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            if part in current.model_fields:
                current = current.model_fields[part].annotation
                continue
            return None
        if origin in (list, tuple) and isinstance(part, int):
            current = typing.get_args(current)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            if part in TAGGED:
                current = TAGGED[part]
                continue
            members = [a for a in typing.get_args(current) if a is not type(None)]
            if len(members) == 1:
                current = members[0]
                if isinstance(current, type) and issubclass(current, BaseModel):
                    if part in current.model_fields:
                        current = current.model_fields[part].annotation
                        continue
            return None
        return None
    if typing.get_origin(current) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(current) if a is not type(None)]
        current = members[0] if len(members) == 1 else current
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _untag_input(loc: Path_) -> Path_:
    """input.input.shape -> input.shape; input.inputs.0.shape -> input.0.shape."""
    if len(loc) >= 2 and loc[0] == "input" and loc[1] in ("input", "inputs"):
        return ("input", *loc[2:])
    return loc


def _yaml_path(loc: Path_) -> Path_:
    """Drop the union tags pydantic puts in locations (stages.1.distill.lr -> stages.1.lr,
    input.inputs.0.shape -> input.0.shape)."""
    loc = _untag_input(loc)
    out: list[Any] = []
    for i, part in enumerate(loc):
        tag = isinstance(part, str) and part in TAGGED
        if tag and i > 0 and isinstance(loc[i - 1], int):
            continue
        out.append(part)
    return tuple(out)


TAGGED_LISTS: dict[str, tuple[str, list[str]]] = {
    "stages": ("stage", list(STAGE_CONFIGS)),
    "losses": ("loss term", list(LOSS_TERMS)),
}
"""Lists whose items pick their schema by `type:`, and what one item is called."""


def _message(err: Any) -> str:
    kind = err["type"]
    loc = _untag_input(tuple(err["loc"]))
    given = err.get("input")
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        valid = list(model.model_fields) if model else []
        hint = did_you_mean(str(loc[-1]), valid)
        if not hint and valid:
            hint = f" (valid keys: {', '.join(valid)})"
        return f"unknown key '{loc[-1]}'{hint}"
    if kind == "missing":
        return "required key is missing"
    path = _yaml_path(tuple(loc))
    list_key = path[-2] if len(path) >= 2 and isinstance(path[-2], str) else "stages"
    what, tags = TAGGED_LISTS.get(list_key, TAGGED_LISTS["stages"])
    if kind == "union_tag_invalid":
        return (f"unknown {what} type '{err['ctx']['tag']}'"
                f"{did_you_mean(str(err['ctx']['tag']), tags)}; known: {', '.join(tags)}")
    if kind == "union_tag_not_found":
        return f"a {what} needs a 'type:' key, one of: {', '.join(tags)}"
    if kind == "model_attributes_type" or kind == "model_type":
        return f"expected a mapping of keys, got {type(given).__name__} {given!r}"
    msg = err["msg"]
    if kind == "string_pattern_mismatch" and loc == ("name",):
        msg = "must be letters, digits, '_', '-' or '.', starting with a letter or digit"
    if kind.startswith("literal_error") and isinstance(given, str):
        choices = err.get("ctx", {}).get("expected", "")
        options = [c.strip(" '") for c in choices.replace(" or ", ",").split(",") if c.strip()]
        msg += did_you_mean(given, options)
    shown = repr(given)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{msg[0].lower()}{msg[1:]} (got {shown})"


def validate_data(data: Any, file: str, lines: dict[Path_, int]) -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(Problem(
            f"the top level must be a mapping of keys (name, data, input, teacher, student, "
            f"stages), got {type(data).__name__}", file=file, line=1))
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            path = _yaml_path(tuple(err["loc"]))
            problems.append(Problem(_message(err), file=file, line=line_of(lines, path),
                                    key=format_path(path)))
        raise ConfigError(sorted(problems, key=lambda p: (p.line or 0, p.key or ""))) from None
    problems = [Problem(msg, file=file, line=line_of(lines, path), key=format_path(path))
                for path, msg in order_problems(cfg)]
    problems += _target_problems(cfg, file, lines)
    if problems:
        raise ConfigError(problems)
    return cfg


def _target_problems(cfg: PipelineConfig, file: str, lines: dict[Path_, int]) -> list[Problem]:
    from compresskit.measure.targets import TARGETS

    out = []
    known = [*TARGETS, *cfg.targets]
    for i, stage in enumerate(cfg.stages):
        named: list[tuple[tuple[Any, ...], str]] = [
            (("stages", i, "targets", j), name)
            for j, name in enumerate(getattr(stage, "targets", []))]
        target = getattr(stage, "target", None)  # prune's
        if isinstance(target, str):
            named.append((("stages", i, "target"), target))
        if i == len(cfg.stages) - 1 and cfg.search is not None:
            named.append((("search", "target"), cfg.search.target))
        for path, name in named:
            if name not in known:
                out.append(Problem(
                    f"unknown target '{name}'{did_you_mean(name, known)}; known: "
                    f"{', '.join(known)} (or define it under 'targets:')", file=file,
                    line=line_of(lines, path), key=format_path(path)))
    return out


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedPipeline:
    """Read, override and validate a pipeline file; raise ConfigError listing every problem."""
    path = Path(path)
    file = str(path)
    data, lines = _compose(_read_text(path), file)
    if isinstance(data, dict) and overrides:
        problems = apply_overrides(data, list(overrides))
        if problems:
            raise ConfigError(problems)
    cfg = validate_data(data, file, lines)
    return LoadedPipeline(config=cfg, path=path, base_dir=path.resolve().parent, raw=data,
                          lines=lines)


def load_dict(data: dict[str, Any], base_dir: str | Path = ".",
              overrides: list[str] | tuple[str, ...] = ()) -> LoadedPipeline:
    """Validate a pipeline given as a Python mapping (for search loops and notebooks)."""
    import copy

    data = copy.deepcopy(data)
    if overrides:
        problems = apply_overrides(data, list(overrides))
        if problems:
            raise ConfigError(problems)
    cfg = validate_data(data, "<code>", {})
    return LoadedPipeline(config=cfg, path=Path("<code>"), base_dir=Path(base_dir).resolve(),
                          raw=data)
