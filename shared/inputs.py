"""What the APIs accept from a client, whatever the route.

Python's JSON parser and pydantic let through values that cannot be stored or
sent back: a NUL character (PostgreSQL's text and jsonb refuse it), a lone UTF-16
surrogate (not Unicode; nothing encodes it), NaN or an infinite number (JSON has
no such number). Each would fail later as a 500, or be silently turned into
null. Every request body derives from `RequestBody`, and every free-text query
or form field is `StoredText`, so such input is a 422 that names where it was.
"""

import json
import math
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Query
from pydantic import AfterValidator, BaseModel, model_validator
from pydantic_core import PydanticCustomError

# PostgreSQL's bigint: offsets and log positions beyond it cannot be compared.
MAX_BIGINT = 2**63 - 1
# How deep a request body may nest objects and arrays, the body itself being
# level 1. Deeper documents cannot all be validated and stored (pydantic stops
# near 200 levels, Python's JSON parser near 1,000).
MAX_DEPTH = 64
_DEEPER = f"nests objects and arrays deeper than {MAX_DEPTH} levels"


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored, or None if it can."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate)"
    return None


def _storable_text(text: str) -> str:
    problem = text_problem(text)
    if problem is not None:
        raise PydanticCustomError(
            "unstorable_text", "the text {problem}", {"problem": problem}
        )
    return text


StoredText = Annotated[str, AfterValidator(_storable_text)]
Offset = Annotated[
    int, Query(ge=0, le=MAX_BIGINT, description="skip this many items first")
]


def problems(value: Any) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Where in a parsed JSON document a value cannot be stored, and why; and
    whether it nests deeper than MAX_DEPTH.

    Most documents have none, which the JSON encoder (C code) tells at once:
    only then is the document walked, in Python, to say where. The walk keeps a
    stack of its own, not recursion: a deeply nested body must not end in a
    RecursionError.
    """
    text = json_text(value)
    yield from _too_deep(value, text)
    if text is not None and "\\u0000" not in text:
        return
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem is not None:
                yield path, f"the text {problem}"
        elif isinstance(item, float):
            if not math.isfinite(item):
                yield path, "the number is not finite (JSON has no NaN or Infinity)"
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = text_problem(key) if isinstance(key, str) else None
                if problem is not None:
                    # Not named: the key itself could not be sent back.
                    yield path, f"a key {problem}"
                else:
                    pending.append(((*path, key), child))
        elif isinstance(item, list):
            pending.extend(((*path, i), child) for i, child in enumerate(item))


class RequestBody(BaseModel):
    """The base of every JSON request body: refuses what cannot be stored."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_unstorable(cls, data: Any) -> Any:
        for path, problem in problems(data):
            where = ".".join(str(part) for part in path) or "the body"
            raise PydanticCustomError(
                "unstorable_value",
                "{where}: {problem}",
                {"where": where, "problem": problem},
            )
        return data


def json_text(value: Any) -> str | None:
    """`value` as JSON text that encodes to UTF-8, or None if it has none (NaN,
    infinity, a lone surrogate, something that is not JSON at all)."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        text.encode("utf-8")
    except (ValueError, TypeError, RecursionError):
        return None
    return text


def _too_deep(
    value: Any, text: str | None
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Where `value`, whose JSON text is `text` (None if it has none), nests
    deeper than MAX_DEPTH.

    A document with no more brackets than that cannot (counting them is C
    code); only the containers of the others are walked.
    """
    if text is not None and text.count("{") + text.count("[") <= MAX_DEPTH:
        return
    pending: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while pending:
        path, item = pending.pop()
        if len(path) >= MAX_DEPTH:
            # Named by the field it is in: the whole path would be that long.
            yield path[:1], _DEEPER
            return
        if not isinstance(item, dict | list):
            continue
        children = item.items() if isinstance(item, dict) else enumerate(item)
        pending.extend(
            ((*path, key), child)
            for key, child in children
            if isinstance(child, dict | list)
        )
