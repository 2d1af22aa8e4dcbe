"""A body pydantic refused -> the API's 400: (param, message) naming the field
as the client wrote it (pure: no I/O).

pydantic reports a value that fits none of a union's types once per type,
each under a location with the type's tag (``prompt.list[constrained-int].0``);
a client wrote ``prompt[0]``. The tags are dropped, and of a union's errors the
one that explains most is said: a value of the right shape that breaks a rule
(a token id below 0) before the shapes it does not have, and when it has none,
the shapes the field takes (:data:`router.http.schemas.SHAPES`).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ValidationError

from router.http import schemas

#: Error types that say a value has the wrong shape (type) rather than breaking a rule.
SHAPE_ERRORS = {"literal_error", "model_type", "model_attributes_type", "dataclass_type", "is_instance_of"}
#: An escaped UTF-16 surrogate that is not one half of a pair.
LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                            rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _field_names(model: type[BaseModel], seen: set) -> set[str]:
    names = set()
    for name, f in model.model_fields.items():
        names.add(name)
        for sub in _models_in(f.annotation):
            if sub not in seen:
                seen.add(sub)
                names |= _field_names(sub, seen)
    return names


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


#: Every field name of the request bodies: a string in an error's location that is not one is a union's tag.
FIELDS = _field_names(schemas.CompletionRequest, set()) | _field_names(schemas.ChatCompletionRequest, set())


def path_of(loc) -> tuple:
    """The location without union tags: ("messages", 0, "content", "list[TextPart]", 0) -> ("messages", 0, "content", 0)."""
    return tuple(p for p in loc if isinstance(p, int) or p in FIELDS)


def spelled(path: tuple) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out or "body"


def json_type(value) -> str:
    """How a client would name ``value``'s JSON type ("a number", "an array of strings and numbers")."""
    if isinstance(value, list) and value:
        kinds = sorted({json_type(v).removeprefix("a ").removeprefix("an ") for v in value})
        return "an array of " + " and ".join("arrays" + k[5:] if k.startswith("array") else k + "s" for k in kinds)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _is_union(loc) -> bool:
    return any(isinstance(p, str) and p not in FIELDS for p in loc)


def _message(error: dict) -> str:
    if error["type"] == "finite_number":
        return f"must be a finite number, got {error['input']}"
    return error["msg"]


def explain(exc: ValidationError, body: bytes = b"") -> tuple[str | None, str]:
    """(param, message) of the first field ``exc`` refuses: ``param`` the
    top-level field the client sent (None for the body as a whole), the
    message "field: what is wrong" with the field as written in the JSON
    (``messages[0].content[1]``). ``body``: the raw body, read only to say why
    it is not JSON."""
    errors = exc.errors(include_url=False)
    if not errors:
        return None, "body: invalid request"
    first = errors[0]
    if first["type"] == "json_invalid":
        return None, _not_json(first["ctx"]["error"] if "ctx" in first else first["msg"], body)
    if not path_of(first["loc"]):
        if first["type"] == "model_type":
            return None, f"body: must be a JSON object, got {json_type(first['input'])}"
        return None, f"body: {_message(first)}"
    if not _is_union(first["loc"]):
        path = path_of(first["loc"])
        return str(path[0]), f"{spelled(path)}: {_message(first)}"
    # A union's errors: those whose location starts where this union is.
    at = first["loc"][:next(i for i, p in enumerate(first["loc"]) if isinstance(p, str) and p not in FIELDS)]
    mine = [e for e in errors if e["loc"][:len(at)] == at]
    rules = [e for e in mine if not (e["type"].endswith("_type") or e["type"] in SHAPE_ERRORS or e["type"] == "missing")]
    top = path_of(at)
    if rules:
        chosen = rules[0]
        return str(top[0]), f"{spelled(path_of(chosen['loc']))}: {_message(chosen)}"
    whole = next((e["input"] for e in mine if len(path_of(e["loc"])) == len(top)), None)
    shape = schemas.SHAPES.get(str(top[-1]) if not isinstance(top[-1], int) else "", "one of its types")
    return str(top[0]), f"{spelled(top)}: must be {shape}, got {json_type(whole)}"


def _not_json(reason: str, body: bytes) -> str:
    lone = LONE_SURROGATE.search(body)
    if lone and ("surrogate" in reason or "hex escape" in reason):
        return (f"body: a JSON string holds a lone surrogate ({lone.group().decode()} without its pair), which is "
                "not valid Unicode: send the character itself, or both halves of its surrogate pair")
    return f"body: not valid JSON ({reason})"
