"""Training text that ships with Python, split deterministically into train and held-out.

No download is ever needed: the corpus is

* the sections of ``pydoc_data.topics.topics`` (the text ``help("if")`` shows:
  the language reference, about 0.5 MB), and
* the docstrings of the top-level pure-Python standard library modules, read with
  ``ast`` from the source files (never imported: some stdlib modules have import
  side effects, e.g. ``this`` and ``antigravity``), about 0.7 MB.

Contracts:

* Everything is a pure function of the running Python installation: the same
  interpreter version gives the same documents, the same split and the same prompts.
* A document is held out or not by a hash of its id alone (no seed, no ordering),
  so the split never changes with the build seed, and adding documents (a newer
  Python) does not move the others across the split.
* ``heldout_prompts`` only returns prompts taken from held-out documents that do not
  occur (whitespace-normalised) anywhere in the train split, so they are unseen text
  for every model built from ``train_texts``.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# About one document in ten is held out; the split salt is part of the contract
# (changing it changes every held-out prompt the benchmarks use).
HELDOUT_PERCENT = 10
SPLIT_SALT = "llmesh-corpus-v1"

# Docstrings shorter than this are mostly "Return self==value." boilerplate.
MIN_DOCSTRING_WORDS = 12

# A pydoc topic heading is a line followed by a line of only "*", "=" or "-".
_HEADING_RULE = re.compile(r"^([*=\-])\1{2,}\s*$")


@dataclass(frozen=True)
class Document:
    """One unit of the corpus; ``id`` is stable across runs and decides the split."""

    id: str
    text: str


def _topic_sections(key: str, text: str) -> list[Document]:
    """Split one pydoc topic into its headed sections.

    The topics are few (~80) and some are very long, so splitting them gives the
    hash split many small units and a held-out share close to HELDOUT_PERCENT.
    """
    lines = text.splitlines()
    starts = [0]
    for i in range(1, len(lines)):
        if _HEADING_RULE.match(lines[i]) and lines[i - 1].strip() and i - 1 > starts[-1]:
            starts.append(i - 1)
    starts.append(len(lines))
    docs = []
    for n, (a, b) in enumerate(zip(starts, starts[1:])):
        body = "\n".join(lines[a:b]).strip()
        if body:
            docs.append(Document(f"topic:{key}#{n}", body))
    return docs


def _pydoc_documents() -> list[Document]:
    from pydoc_data.topics import topics  # imported here: nothing happens at import time

    docs: list[Document] = []
    for key in sorted(topics):
        docs.extend(_topic_sections(key, topics[key]))
    return docs


def _stdlib_docstrings() -> list[Document]:
    """Docstrings of the top-level ``*.py`` modules of the stdlib, parsed, not imported."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        module = path.stem
        # Walk with qualified names so ids are unique and stable.
        stack: list[tuple[ast.AST, str]] = [(tree, module)]
        while stack:
            node, name = stack.pop()
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc.split()) >= MIN_DOCSTRING_WORDS:
                docs.append(Document(f"doc:{name}", doc.strip()))
            for child in reversed(getattr(node, "body", [])):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    stack.append((child, f"{name}.{child.name}"))
    return docs


def load_documents() -> list[Document]:
    """All documents, in a fixed order, exact duplicate texts removed (first id wins).

    Takes about two seconds (parsing the stdlib sources).
    """
    seen_ids: set[str] = set()
    seen_texts: set[str] = set()
    out: list[Document] = []
    for doc in _pydoc_documents() + _stdlib_docstrings():
        # Ids can repeat (a method defined twice under `if` branches); texts repeat
        # a lot (shared docstrings). Either would leak text across the split.
        if doc.id in seen_ids or doc.text in seen_texts:
            continue
        seen_ids.add(doc.id)
        seen_texts.add(doc.text)
        out.append(doc)
    return out


def is_heldout(doc_id: str) -> bool:
    """Whether the document with this id belongs to the held-out split."""
    digest = hashlib.sha256(f"{SPLIT_SALT}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def split_documents(docs: list[Document] | None = None) -> tuple[list[Document], list[Document]]:
    """``(train, heldout)``, each in corpus order. Loads the corpus when not given."""
    docs = load_documents() if docs is None else docs
    train = [d for d in docs if not is_heldout(d.id)]
    heldout = [d for d in docs if is_heldout(d.id)]
    return train, heldout


def train_texts(docs: list[Document] | None = None) -> list[str]:
    """Texts of the train split, in corpus order."""
    return [d.text for d in split_documents(docs)[0]]


def heldout_texts(docs: list[Document] | None = None) -> list[str]:
    """Texts of the held-out split, in corpus order."""
    return [d.text for d in split_documents(docs)[1]]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def _is_prose(words: list[str]) -> bool:
    """A paragraph that reads like a sentence, not code, a grammar rule or a table."""
    if not words[0][:1].isupper() or not words[0].isalpha():
        return False
    letters = sum(ch.isalpha() or ch in " ,.'\"-" for ch in " ".join(words))
    return letters >= 0.9 * len(" ".join(words))


def prompts_from(
    texts: list[str],
    n: int,
    seed: int = 0,
    min_words: int = 16,
    min_prompt_words: int = 8,
    max_prompt_words: int = 16,
    exclude: str = "",
) -> list[str]:
    """Up to ``n`` prompts: the first 8-16 words of prose paragraphs of ``texts``.

    Paragraphs need at least ``min_words`` words. The candidate order and each
    prompt's length come from ``random.Random(seed)``, so the result is a pure function
    of the arguments. A prompt that occurs in ``exclude`` (compared
    whitespace-normalised) is skipped. Fewer than ``n`` come back only when the texts
    run out of paragraphs.
    """
    candidates: list[list[str]] = []
    seen: set[str] = set()
    for text in texts:
        for para in _paragraphs(text):
            words = para.split()
            if len(words) >= min_words and _is_prose(words):
                key = " ".join(words[:max_prompt_words])
                if key not in seen:
                    seen.add(key)
                    candidates.append(words)
    rng = random.Random(seed)
    rng.shuffle(candidates)
    excluded = _normalise(exclude)
    out: list[str] = []
    for words in candidates:
        k = rng.randint(min_prompt_words, max_prompt_words)
        prompt = " ".join(words[:k])
        if excluded and prompt in excluded:
            continue
        out.append(prompt)
        if len(out) == n:
            break
    return out


def heldout_prompts(
    n: int,
    seed: int = 0,
    min_words: int = 16,
    min_prompt_words: int = 8,
    max_prompt_words: int = 16,
    documents: list[Document] | None = None,
) -> list[str]:
    """``n`` short prompts (the first 8-16 words of held-out prose paragraphs).

    Deterministic for a given ``seed`` (and Python installation); none of them occurs
    in the train split. At most a few hundred exist (``len`` may be < ``n`` when
    more are asked for than there are). Used by the model build to measure the
    draft's agreement and by the benchmarks as unseen prompts. ``documents`` (the
    output of ``load_documents``) saves loading the corpus again.
    """
    train, heldout = split_documents(documents)
    return prompts_from(
        [d.text for d in heldout],
        n,
        seed=seed,
        min_words=min_words,
        min_prompt_words=min_prompt_words,
        max_prompt_words=max_prompt_words,
        exclude="\n".join(d.text for d in train),
    )


def train_prompts(n: int, seed: int = 0, min_words: int = 16) -> list[str]:
    """Like ``heldout_prompts`` but from the train split (the draft's distillation prompts)."""
    return prompts_from(train_texts(), n, seed=seed, min_words=min_words)
