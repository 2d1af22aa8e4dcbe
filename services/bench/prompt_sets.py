"""Prompt sets that tell proposers apart: copy-heavy text and open-ended text.

Copy-heavy prompts make the continuation repeat the context, as editing or
summarising a given passage and continuing code that reuses its names do:
a held-out passage given twice and begun a third time, and standard-library
Python source cut mid-function. Open-ended prompts are the first words of
held-out paragraphs (nothing to copy). Deterministic for a given Python
installation; nothing is downloaded.
"""

from __future__ import annotations

import inspect

from services.models.corpus import heldout_prompts, heldout_texts, load_documents

#: Standard-library functions whose source continues with names it has already used.
_CODE = ("textwrap.TextWrapper._wrap_chunks", "json.encoder._make_iterencode", "difflib.SequenceMatcher.get_opcodes",
         "argparse.ArgumentParser._parse_known_args", "csv.Sniffer._guess_quote_and_delimiter",
         "calendar.TextCalendar.formatmonth", "shlex.shlex.read_token", "fractions.Fraction.limit_denominator")


def _source(dotted: str) -> str:
    module_name, *attrs = dotted.split(".")
    obj = __import__(module_name)
    for attr in attrs:
        obj = getattr(obj, attr)
    return inspect.getsource(obj)


def copy_heavy(n: int, max_chars: int = 1500) -> list[str]:
    """``n`` prompts whose continuation repeats their context (alternating
    passages and code), each at most ``max_chars`` characters."""
    passages = [t for t in heldout_texts(load_documents()) if 300 <= len(t) <= 600]
    code = []
    for name in _CODE:
        try:
            src = _source(name)
        except (AttributeError, OSError, TypeError):
            continue
        code.append(src[: min(len(src) * 2 // 3, max_chars)])
    out = []
    for i in range(n):
        if i % 2 == 0 and passages:
            p = passages[(i // 2) % len(passages)]
            out.append(f"{p}\n\n{p}\n\n{p[: len(p) // 3]}"[-max_chars:])
        elif code:
            out.append(code[(i // 2) % len(code)])
    return out


def open_ended(n: int) -> list[str]:
    """``n`` prompts with nothing to copy: the first words of held-out paragraphs."""
    return heldout_prompts(n, seed=1)
