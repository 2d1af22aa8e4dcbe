"""The targets' tokenizer in the router, so that kv_aware hashes a text prompt's
blocks from the very token ids the targets will see (the ``tokenizers``
library: the file transformers' fast tokenizers load; no transformers, no torch)."""

from __future__ import annotations

from pathlib import Path


def tokenizer_file(path: str) -> Path:
    """The tokenizer.json of a model directory, or ``path`` itself when it is a
    file. Raises FileNotFoundError naming what is missing."""
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no tokenizer at {path} (give a model directory holding tokenizer.json, "
                                f"or the file)")
    return f


def load_tokenizer(path: str):
    """The targets' fast tokenizer (the ``tokenizers`` library: the file
    transformers' fast tokenizers load), so text prompts become the ids the
    targets will see. Raises FileNotFoundError."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file(path)))
