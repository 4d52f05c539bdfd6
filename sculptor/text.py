"""Text from requests must be valid Unicode.

JSON may carry a lone UTF-16 surrogate as an escape ("\\ud800"); Python's json module decodes it into a
str that no UTF-8 encoder, tokenizer or Redis client accepts. Such text is refused at the boundary with
a message saying where it is, rather than failing later as a server error.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

_SURROGATE = re.compile("[\ud800-\udfff]")
HOW_TO_FIX = ("write characters outside the Basic Multilingual Plane as a surrogate pair (\\ud83d\\ude00) "
              "or as UTF-8, and check that the text was not cut in the middle of one")


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in `text`, or None."""
    match = _SURROGATE.search(text)
    return match.start() if match else None


def _valid(text: str) -> str:
    at = lone_surrogate(text)
    if at is not None:
        raise ValueError(f"holds a lone UTF-16 surrogate (\\u{ord(text[at]):04x}) at character {at}: {HOW_TO_FIX}")
    return text


Text = Annotated[str, AfterValidator(_valid)]


def find_invalid_text(value: object, path: str = "") -> str | None:
    """Where in a decoded JSON value (keys included) a string holds a lone surrogate, as `a.b[2]`, or None."""
    stack = [(value, path)]
    while stack:  # iterative: a deeply nested value must not exhaust the recursion limit
        node, where = stack.pop()
        if isinstance(node, str):
            if lone_surrogate(node) is not None:
                return where or "the value"
        elif isinstance(node, dict):
            for key, item in node.items():
                if lone_surrogate(key) is not None:
                    return f"a key in {where or 'the object'}"
                stack.append((item, f"{where}.{key}" if where else key))
        elif isinstance(node, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(node))
    return None


def check_text(value: object, what: str) -> str | None:
    """A message for `what` when it holds invalid text, else None."""
    where = find_invalid_text(value)
    return None if where is None else f"{what}: {where} holds a lone UTF-16 surrogate: {HOW_TO_FIX}"
