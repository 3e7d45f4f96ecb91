"""Just enough DER to walk the few structures certsync reads without a general parser.

Strict on purpose: definite lengths of at most three length bytes, low tag numbers, every element
inside its parent. Anything else raises Unusual (or IndexError on a cut value), and the caller hands
the value to cryptography or asn1crypto, which decide what it is.
"""

from __future__ import annotations

from typing import NamedTuple


class Unusual(Exception):
    """The encoding needs a general parser."""


class Element(NamedTuple):
    tag: int
    start: int  # the tag's offset
    content: int  # the content's offset
    end: int  # one past the content


def header_end(der: bytes, pos: int) -> int:
    first = der[pos + 1]
    if not first & 0x80:
        return pos + 2
    if not 0 < first & 0x7F <= 3:
        raise Unusual
    return pos + 2 + (first & 0x7F)


def element_end(der: bytes, pos: int) -> int:
    content = header_end(der, pos)
    first = der[pos + 1]
    return content + (int.from_bytes(der[pos + 2 : content], "big") if first & 0x80 else first)


def element(der: bytes, pos: int, limit: int) -> Element:
    """The element at `pos`, which must end at or before `limit`."""
    tag = der[pos]
    if tag & 0x1F == 0x1F:  # high tag number form
        raise Unusual
    end = element_end(der, pos)
    if end > limit:
        raise Unusual
    return Element(tag, pos, header_end(der, pos), end)


def children(der: bytes, parent: Element, *tags: int) -> list[Element]:
    """The elements inside `parent`; with `tags`, exactly that many, with those tags."""
    found, pos = [], parent.content
    while pos < parent.end:
        child = element(der, pos, parent.end)
        found.append(child)
        pos = child.end
    if tags and tuple(child.tag for child in found) != tags:
        raise Unusual
    return found


def whole(der: bytes, tag: int) -> Element:
    """The one element `der` holds, with nothing after it."""
    outer = element(der, 0, len(der))
    if outer.tag != tag or outer.end != len(der):
        raise Unusual
    return outer
