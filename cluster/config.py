"""Typed job configs: pydantic models loaded from YAML with dotted `--set key=value` overrides.

Every job has one config class derived from `Section`. Unknown keys and bad values are collected
and reported together, each named by its dotted key, before anything runs.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

T = TypeVar("T", bound="Section")
_NUMBER_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# A list of strings where one string stands for a list of one (`train: data/qa.jsonl`, `--set
# models=bert-cls`): the natural way to write one path or name in YAML and on the command line.
StrList = Annotated[list[str], BeforeValidator(_one_or_many)]


def _names(value: Any) -> Any:
    value = _one_or_many(value)
    if isinstance(value, list):
        return [part.strip() for v in value for part in (v.split(",") if isinstance(v, str) else [v]) if str(part).strip()]
    return value


# Names that never hold a comma (registry and run names): `--set models=a,b` is [a, b], as it
# would be for a comma-separated command-line flag.
NameList = Annotated[list[str], BeforeValidator(_names)]


class ConfigError(ValueError):
    """A config that cannot be used; the message names every offending key."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-safe dict; this is how configs cross the Ray boundary."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists; a numeric part indexes into an existing list."""
    node: Any = tree
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"config key '{key}': '{part}' is not an index of a {len(node)}-item list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{parts[i - 1]}' is a value, not a section")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def get_dotted(tree: Any, key: str) -> Any:
    """The value at `a.b.0.c` in nested dicts/lists, or None where the path does not exist."""
    node = tree
    for part in key.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def parse_overrides(sets: list[str] | None) -> dict[str, Any]:
    """`["optim.lr=3e-4", "data.seed=1"]` -> nested dict; values parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for key, value in parse_overrides_flat(sets):
        set_dotted(tree, key, value)
    return tree


def parse_overrides_flat(sets: list[str] | None) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for item in sets or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key=value, e.g. optim.lr=3e-4")
        try:
            value = yaml.safe_load(io.StringIO(raw)) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        out.append((key, _number(value)))
    return out


def _number(value: Any) -> Any:
    """PyYAML reads `3e-4` as a string (YAML 1.1 wants `3.0e-4`); users mean a number."""
    if isinstance(value, str) and _NUMBER_RE.match(value):
        return float(value)
    return value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - config key '{key}': unknown key")
        else:
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"  - config key '{key}': {err['msg']}{shown}")
    return "\n".join(lines)


def build(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate a plain dict into `cls`, raising ConfigError naming every bad key."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def same_config(saved_yaml: str, cfg: Section) -> bool:
    """Whether a run's saved config (YAML) is `cfg`, reading the saved one with today's defaults:
    a field added to raylm since it was written, at its default, does not make it differ (a new
    option must not stop an interrupted sweep from resuming); a changed value, or a key the current
    config does not have, does."""
    try:
        saved = type(cfg).model_validate(yaml.safe_load(saved_yaml) or {})
    except (ValidationError, yaml.YAMLError):
        return False
    return saved.to_dict() == cfg.to_dict()


def load_config(cls: type[T], path: str | Path | None = None, sets: list[str] | None = None) -> T:
    """YAML file (optional) + dotted overrides -> validated config of type `cls`."""
    data = read_yaml(path) if path else {}
    for key, value in parse_overrides_flat(sets):
        set_dotted(data, key, value)
    return build(cls, data, source=str(path) if path else "config")
