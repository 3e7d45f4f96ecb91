"""Certificate values as Exchange Online returns them on read, in every shape the evidence allows.

A capture showed ``UserCertificate`` typed ``#Collection(String)`` but empty, so the shape of a value
is unknown: a base64 string, ``{"Data": "<base64>"}`` or ``{"Data": [48, 130, ...]}``. Anything else
(a .NET type name such as ``"System.Byte[]"``, numbers out of byte range, text that is not base64) is
unreadable, and unreadable never means "no certificates": the caller stops and says what it saw.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any


class UnreadableValue(ValueError):
    """A certificate property came back in a shape certsync cannot turn into bytes."""


def _describe(raw: Any) -> str:
    text = repr(raw)
    return text if len(text) <= 80 else text[:77] + "..."


def _from_text(text: str) -> bytes:
    if text.startswith("System.") or not text:
        raise UnreadableValue(f"a type name or empty text instead of bytes: {_describe(text)}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UnreadableValue(f"text that is not base64: {_describe(text)}") from None


def _from_ints(values: list[Any]) -> bytes:
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise UnreadableValue(f"an array that is not bytes: {_describe(values)}")
    return bytes(values)


def decode_value(raw: Any) -> bytes:
    """One value: base64 text, or an object whose Data is base64 text or an array of bytes."""
    if isinstance(raw, str):
        return _from_text(raw)
    if isinstance(raw, dict) and "Data" in raw:
        data = raw["Data"]
        if isinstance(data, str):
            return _from_text(data)
        if isinstance(data, list):
            return _from_ints(data)
    raise UnreadableValue(f"a value of unknown shape: {_describe(raw)}")


def decode_values(raw: Any, *, name: str) -> tuple[bytes, ...]:
    """Every value of a multi-valued byte[] property (absent or null: none)."""
    if raw is None:
        return ()
    if isinstance(raw, (str, dict)):
        raw = [raw]  # a single value where a list was expected: still readable
    if not isinstance(raw, list):
        raise UnreadableValue(f"{name}: {_describe(raw)} is not a list of values")
    try:
        return tuple(decode_value(value) for value in raw)
    except UnreadableValue as exc:
        raise UnreadableValue(f"{name}: {exc}") from None


def value_shape(raw: Any) -> str:
    """A short name of the shape a property came back in, for `certsync probe` to report."""
    if raw is None:
        return "absent"
    if isinstance(raw, list):
        if not raw:
            return "empty list"
        return "list of " + value_shape(raw[0])
    if isinstance(raw, str):
        return "type name" if raw.startswith("System.") else "base64 string"
    if isinstance(raw, dict):
        data = raw.get("Data")
        return {str: "{Data: base64}", list: "{Data: [int, ...]}"}.get(type(data), f"object {sorted(raw)}")
    return type(raw).__name__
