"""Where llmesh keeps its files on this machine (no I/O at import)."""

from __future__ import annotations

import os
from pathlib import Path


def default_home() -> Path:
    """``$LLMESH_HOME``, or ``~/.cache/llmesh`` when it is unset or empty.

    Holds ``models/`` (built by `llmesh models build`) and ``logs/``.
    """
    return Path(os.environ.get("LLMESH_HOME") or Path.home() / ".cache" / "llmesh")


def default_model_path(name: str) -> Path:
    """The built default model ``name`` ("target", "draft", "target-large")."""
    return default_home() / "models" / name
