"""Profiles: find the YAML, follow `extends`, apply `--set`, validate into a frozen `Profile`.

Which profile, first match wins: the explicit name/path (`--profile`) > $EDGE_RUNTIME_PROFILE >
the tier the hardware probe selects. Values, highest first: `--set` > the profile file > the
files it extends (nearest first). Every key is declared, with its meaning, in `profile_schema.py`.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.policy.schema import Profile, Section

__all__ = ["ENV_VAR", "Profile", "ProfileChoice", "ProfileError", "choose_profile", "list_profiles",
           "load_profile", "parse_override", "profiles_dir"]

ENV_VAR = "EDGE_RUNTIME_PROFILE"
_RESERVED = ("source",)  # set by the loader, never by a file


class ProfileError(EdgeRuntimeError, ValueError):
    """A profile cannot be found, parsed or validated; the message says where and what is allowed."""


@dataclass(frozen=True)
class ProfileChoice:
    """Which profile to load and why (shown by `doctor`)."""

    spec: str  # a shipped name or a path
    chosen_by: str  # "--profile", ENV_VAR or "hardware"
    explanation: str
    warning: Optional[str] = None


# -- finding files ----------------------------------------------------------------------------
def profiles_dir() -> Path:
    """The shipped profiles: the checkout's top-level profiles/ first, else the wheel's copy."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").is_file() and (repo / "profiles").is_dir():
        return repo / "profiles"
    return Path(str(importlib.resources.files("edge_runtime") / "_profiles"))


def _tier_order(name: str) -> tuple[float, str]:
    match = re.fullmatch(r"(\d+)gb", name)
    return (-1 if name == "cpu" else int(match.group(1)) if match else float("inf"), name)


def list_profiles() -> list[str]:
    """Names of the shipped profiles, smallest tier first."""
    folder = profiles_dir()
    names = [p.stem for p in folder.glob("*.yaml")] if folder.is_dir() else []
    return sorted(names, key=_tier_order)


def _resolve(spec: str, base_dir: Path) -> Path:
    """A shipped name, or a path (relative paths are taken from `base_dir`)."""
    if spec in list_profiles():
        return profiles_dir() / f"{spec}.yaml"
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_file():
        return path.resolve()
    if os.sep in spec or "/" in spec or spec.endswith((".yaml", ".yml")):
        raise ProfileError(f"profile file not found: {path}")
    hint = difflib.get_close_matches(spec, list_profiles(), n=1)
    guess = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ProfileError(f"unknown profile {spec!r}{guess}; allowed: {', '.join(list_profiles())} "
                       f"or a path to a .yaml file")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"profile file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile file {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ProfileError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of sections (memory:, precision:, ...), "
                           f"got {type(data).__name__}")
    return data


# -- merging with provenance ------------------------------------------------------------------
class _Merged:
    """A deep-merged dict plus, per leaf key path, the source that set it last (for errors)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.origins: dict[tuple[str, ...], tuple[int, str]] = {}
        self._seq = 0

    def apply(self, layer: Mapping[str, Any], origin: str, prefix: tuple[str, ...] = ()) -> None:
        target = self.data
        for part in prefix:
            if not isinstance(target.get(part), dict):
                target[part] = {}
            target = target[part]
        for k, v in layer.items():
            path = (*prefix, str(k))
            if isinstance(v, dict) and isinstance(target.get(k), dict):
                self.apply(v, origin, path)  # sections merge key by key
                continue
            target[k] = copy.deepcopy(v)  # leaves (lists included) replace
            self.origins = {p: o for p, o in self.origins.items() if p[:len(path)] != path}
            self._record(path, v, origin)

    def _record(self, path: tuple[str, ...], value: Any, origin: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                self._record((*path, str(k)), v, origin)
        else:
            self._seq += 1
            self.origins[path] = (self._seq, origin)

    def origin(self, path: tuple[str, ...], default: str) -> str:
        """Who set `path`, or the most recent source of any key beneath it."""
        path = tuple(part.split("[")[0] for part in path)  # list items belong to their list
        hits = [o for p, o in self.origins.items() if p[:len(path)] == path]
        return max(hits)[1] if hits else default


def _load_chain(path: Path, merged: _Merged, seen: tuple[Path, ...] = ()) -> None:
    """Apply the files `path` extends (farthest first), then `path` itself."""
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ProfileError(f"extends cycle: {chain}")
    raw = _read_yaml(path)
    for name in _RESERVED:
        if name in raw:
            raise ProfileError(f"{path}: key {name!r} is set by the loader; remove it from the file")
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ProfileError(f"{path}: extends = {parent!r}: expected a profile name "
                               f"({', '.join(list_profiles())}) or a path to a YAML file")
        _load_chain(_resolve(parent, path.parent), merged, (*seen, path))
    raw.setdefault("name", path.stem)  # a user file is named after itself, not its base
    merged.apply(raw, str(path))


# -- --set overrides --------------------------------------------------------------------------
def _did_you_mean(path: tuple[str, ...], siblings: Sequence[str]) -> str:
    """A hint for an unknown key: a close sibling, else a key of that name in another section."""
    hint = difflib.get_close_matches(path[-1], siblings, n=1)
    if hint:
        return f" (did you mean {'.'.join((*path[:-1], hint[0]))!r}?)"
    leaves = {k.rsplit(".", 1)[-1]: k for k in _all_keys()}
    hint = difflib.get_close_matches(path[-1], list(leaves), n=1)
    return f" (did you mean {leaves[hint[0]]!r}?)" if hint else ""


def _all_keys(model: type[BaseModel] = Profile, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            keys += _all_keys(ann, f"{prefix}{name}.")
        elif name not in _RESERVED:
            keys.append(prefix + name)
    return keys


def _check_key(path: tuple[str, ...], item: str) -> None:
    """Reject a --set key the schema does not have, before it is merged anywhere."""
    model: Optional[type[BaseModel]] = Profile
    for i, part in enumerate(path):
        if model is None:
            raise ProfileError(f"--set {item}: {'.'.join(path[:i])} is a value, not a section")
        fields = [f for f in model.model_fields if f not in _RESERVED]
        if part not in fields:
            dotted = ".".join(path[: i + 1])
            raise ProfileError(f"--set {item}: unknown key {dotted!r}{_did_you_mean(path[: i + 1], fields)}; "
                               f"allowed here: {', '.join(fields)}")
        ann = model.model_fields[part].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, Section) else None


def parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """`cleanup.policy=every_n` -> (("cleanup", "policy"), "every_n"); the value is read as YAML."""
    key, sep, text = item.partition("=")
    path = tuple(key.strip().split("."))
    if not sep or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in path):
        raise ProfileError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set cleanup.policy=every_n")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        raise ProfileError(f"--set {item}: value {text!r} is not valid YAML ({problem})") from None
    _check_key(path, item)
    return path, value


# -- validation messages ----------------------------------------------------------------------
def _walk(loc: Sequence[Any]) -> tuple[tuple[str, ...], Any]:
    """Key path of a pydantic error location (union tags dropped) and the field it ends on."""
    model: Any = Profile
    path: list[str] = []
    field = None
    for part in loc:
        if model is None or not isinstance(part, str):
            if isinstance(part, int) and path:
                path[-1] += f"[{part}]"
            continue
        path.append(part)
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        model = ann if isinstance(ann, type) and issubclass(ann, Section) else None
        if field is None:
            break
    return tuple(path), field


def _explain(errors: Sequence[Mapping[str, Any]], merged: _Merged, top: str) -> str:
    """One line for the errors pydantic reports at one key path."""
    err = errors[0]
    path, field = _walk(err["loc"])
    dotted = ".".join(path) or "(top level)"
    where = merged.origin(path, top)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _walk(err["loc"][:-1])[1]
        section = parent.annotation if parent else Profile
        fields = [f for f in section.model_fields if f not in _RESERVED]
        return f"{where}: unknown key {dotted!r}{_did_you_mean(path, fields)}; allowed here: {', '.join(fields)}"
    if kind == "missing":
        return (f"{where}: missing key {dotted!r}; add it, or start the file with "
                f"'extends: 8gb' (any shipped profile) to inherit it")
    if kind == "value_error":
        return f"{where}: {err['msg'].removeprefix('Value error, ')}"
    extra = (field.json_schema_extra or {}) if field else {}
    why = f" ({err['msg']})" if len(errors) == 1 else ""  # a union's per-member messages confuse
    allowed = f"; allowed: {extra['allowed']}" if "allowed" in extra else ""
    return f"{where}: {dotted} = {err['input']!r} is not allowed{why}{allowed}"


def _validate(merged: _Merged, top: Path) -> Profile:
    try:
        return Profile.model_validate({**merged.data, "source": str(top)})
    except ValidationError as exc:
        by_path: dict[tuple[str, ...], list[Any]] = {}
        for err in exc.errors():
            by_path.setdefault(_walk(err["loc"])[0], []).append(err)
        lines = [_explain(errs, merged, str(top)) for errs in by_path.values()]
        sep = "\n  " if len(lines) > 1 else " "
        raise ProfileError("invalid profile:" + sep + sep.join(lines)) from None


# -- public API -------------------------------------------------------------------------------
def choose_profile(name_or_path: Optional[str | os.PathLike] = None, env: Mapping[str, str] = os.environ,
                   hw: Any = None) -> ProfileChoice:
    """Pick the profile: argument > $EDGE_RUNTIME_PROFILE > tier from the hardware probe."""
    if name_or_path:
        spec = os.fspath(name_or_path)
        return ProfileChoice(spec, "--profile", f"asked for profile {spec!r}")
    if env.get(ENV_VAR):
        return ProfileChoice(env[ENV_VAR], ENV_VAR, f"{ENV_VAR}={env[ENV_VAR]}")
    from edge_runtime.policy.hardware import probe  # lazy: probing imports torch
    from edge_runtime.policy.tiers import select_tier

    tier = select_tier(hw if hw is not None else probe())
    return ProfileChoice(tier.name, "hardware", tier.explanation, tier.warning)


def load_profile(name_or_path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = (),
                 env: Mapping[str, str] = os.environ) -> Profile:
    """Resolve, merge and validate a profile; raises ProfileError with a precise message."""
    spec = choose_profile(name_or_path, env).spec
    top = _resolve(spec, Path.cwd())
    merged = _Merged()
    _load_chain(top, merged)
    for item in overrides:
        path, value = parse_override(item)
        merged.apply({path[-1]: value}, f"--set {item} (on profile {top})", path[:-1])
    return _validate(merged, top)
