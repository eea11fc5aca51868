"""Read upstream's hyperpyyaml files (``cosyvoice2.yaml``) as plain data.

Upstream builds its classes from ``!new:`` / ``!name:`` / ``!apply:`` tags when hyperpyyaml loads the
file. We only need the numbers, so every ``!tag`` is ignored: a tagged mapping becomes a plain dict,
a tagged sequence a list, a tagged scalar its string. ``!ref <key>`` naming a top-level key is
resolved to that key's value (the only form upstream's inference yaml uses); any other ``!ref``
stays a string. Nothing is imported or executed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

_REF = re.compile(r"^<([A-Za-z_][\w]*)>$")


class _Ref(str):
    """A ``!ref <name>`` scalar, resolved after the whole document is read."""


class _TagIgnoringLoader(yaml.SafeLoader):
    pass


def _untagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    value = loader.construct_scalar(node)
    return _Ref(value) if node.tag == "!ref" else value


_TagIgnoringLoader.add_multi_constructor("!", _untagged)


def _resolve(value: Any, top: dict, depth: int = 0) -> Any:
    if isinstance(value, _Ref):
        m = _REF.match(value.strip())
        if m and m.group(1) in top and depth < 8:
            return _resolve(top[m.group(1)], top, depth + 1)
        return str(value)
    if isinstance(value, dict):
        return {k: _resolve(v, top, depth) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, depth) for v in value]
    return value


def loads(text: str) -> dict:
    """Parse hyperpyyaml text into plain dicts/lists/scalars (tags ignored, simple refs resolved)."""
    data = yaml.load(text, Loader=_TagIgnoringLoader)  # noqa: S506 - SafeLoader subclass
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("a CosyVoice yaml must be a mapping at top level")
    return _resolve(data, data)


def load(path: str | Path) -> dict:
    """:func:`loads` on a file."""
    return loads(Path(path).read_text(encoding="utf-8"))
