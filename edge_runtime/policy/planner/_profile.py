"""Read profile settings by dotted path from any object with attributes (frozen dataclasses,
pydantic models, SimpleNamespace) or dicts, so the planner does not depend on profiles.py."""

from __future__ import annotations

from typing import Any


def setting(profile: Any, path: str, default: Any = None) -> Any:
    node = profile
    for part in path.split("."):
        if node is None:
            return default
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return default if node is None else node


def gpu_vram_gib(profile: Any) -> float:
    """0 / None / missing VRAM means a CPU-only profile."""
    return float(setting(profile, "memory.vram_gib", 0) or 0)
