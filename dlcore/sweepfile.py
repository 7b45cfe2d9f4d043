"""Reading a sweep file: YAML that refuses a key given twice, ``--set`` overrides on top, and which
of the two a key came from, so that an error can name it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .fields import At


class SpecError(ValueError):
    """A sweep file that cannot run; ``str()`` is one line for the terminal."""


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key: str, first: int, second: int):
        super().__init__(f"{key}: given twice, at lines {first} and {second}")


def _refuse_duplicates(node: yaml.Node, path: list[str], seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple, int] = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor': its keys may be overridden here
                _refuse_duplicates(v, path, seen)
                continue
            name = str(k.value) if isinstance(k, yaml.ScalarNode) else str(id(k))
            if (k.tag, name) in lines:
                raise DuplicateKeyError(".".join([*path, name]), lines[(k.tag, name)], k.start_mark.line + 1)
            lines[(k.tag, name)] = k.start_mark.line + 1
            _refuse_duplicates(v, [*path, name], seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _refuse_duplicates(v, [*path, str(i)], seen)


class SweepLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not 'the last one wins'."""

    def construct_document(self, node):
        _refuse_duplicates(node, [], set())
        return super().construct_document(node)


def unshared(node: Any) -> Any:
    """``node`` with every mapping and list rebuilt: a YAML alias (``*encoder``) becomes a copy of its
    anchor, so that ``--set pretrain.ae.encoder_args.latent_dim=32`` changes ae alone, not every stage
    that wrote ``*encoder``."""
    if isinstance(node, dict):
        return {k: unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [unshared(v) for v in node]
    return node


def read_yaml(path: Path) -> Any:
    """The parsed file; SpecError when it is missing, unreadable, not UTF-8, not YAML, or gives a key twice."""
    if path.is_dir():
        raise SpecError(f"{path}: is a folder, not a sweep file")
    if not path.is_file():
        raise SpecError(f"{path}: no such sweep file")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise SpecError(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
    try:
        return unshared(yaml.load(text, SweepLoader))
    except DuplicateKeyError as e:
        raise SpecError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise SpecError(f"--set {text}: expected KEY.PATH=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise SpecError(f"--set {text}: value is not YAML ({e.__class__.__name__})") from None
    return key.split("."), parsed


def set_path(raw: dict, path: list[str], value: Any) -> str | None:
    """Set ``raw[path[0]][path[1]]... = value``, creating sections; the dotted prefix that is not a section, if any."""
    node = raw
    for i, key in enumerate(path[:-1]):
        if not isinstance(node.get(key, {}), dict):
            return ".".join(path[: i + 1])
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides:
        blocked = set_path(raw, *parse_override(text))
        if blocked:
            raise SpecError(f"--set {text}: {blocked} is not a section")
    return raw


def apply_profile(raw: dict, name: str) -> dict:
    """``raw`` with the dotted keys of its profile ``name`` (under ``profiles:``) set, like ``--set`` lines."""
    profiles = raw.get("profiles") or {}
    if name not in profiles:
        raise SpecError(f"no profile '{name}'; this file has {sorted(profiles) or 'none'}")
    raw = copy.deepcopy(raw)
    for key, value in profiles[name].items():
        blocked = set_path(raw, str(key).split("."), copy.deepcopy(value))
        if blocked:
            raise SpecError(f"profiles.{name}.{key}: {blocked} is not a section")
    return raw


def origin(source: str, overrides: list[str], *keys: str) -> str:
    """Where the values at ``keys`` came from: the file, or the last ``--set`` that wrote one of them or a
    section above one."""
    for text in reversed(overrides):
        path = text.split("=", 1)[0].split(".")
        for key in filter(None, keys):
            parts = key.split(".")
            n = min(len(path), len(parts))
            if path[:n] == parts[:n]:
                return f"{source} --set {text}"
    return source


def message(err: dict) -> str:
    return "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")


def _keys(err: dict) -> list[str]:
    """The dotted keys an error is about: pydantic's location, less its internal steps, plus an ``At``'s keys."""
    parts = ["from" if p == "from_" else str(p) for p in err["loc"]
             if not str(p).startswith(("function-", "model-")) and p != "[key]"]
    problem = (err.get("ctx") or {}).get("error")
    if not isinstance(problem, At):
        return [".".join(parts)]
    return [".".join([*parts, k]) for k in (problem.key, *problem.also)]


def format_validation_error(path: str, e: ValidationError, overrides: list[str] = ()) -> str:
    err = e.errors()[0]
    keys = _keys(err)
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{origin(path, list(overrides), *keys)}: {keys[0] + ': ' if keys[0] else ''}{message(err)}{more}"
