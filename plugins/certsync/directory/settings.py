"""How to reach the directory and which users are in scope, checked before anything is read.

The scope is one or more base DNs, an optional extra LDAP filter and an optional group whose
members (nested ones too, through AD's in-chain matching rule) are in scope. A malformed DN or filter
fails here, naming the setting, so that a typo never reads (and withdraws) the wrong users.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

from ldap3.core.exceptions import LDAPInvalidDnError, LDAPInvalidFilterError
from ldap3.operation.search import parse_filter
from ldap3.utils.dn import parse_dn

USER_FILTER = "(&(objectClass=user)(!(objectClass=computer)))"
IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN: nested group membership
MAX_PAGE_SIZE = 1000  # AD's default MaxPageSize; a bigger page is silently cut to it
# How a delta read finds what changed: uSNChanged against the watermark, or the DirSync control.
CHANGE_TRACKING = ("usn", "dirsync")


def split_dns(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Base DNs from a list or a ';'-separated string (';' must be escaped inside a DN, RFC 4514)."""
    parts = value if isinstance(value, list | tuple) else re.split(r"(?<!\\);", value)
    return tuple(p.strip() for p in parts if p.strip())


def check_dn(setting: str, dn: str) -> None:
    try:
        parse_dn(dn)
    except LDAPInvalidDnError as exc:
        raise ValueError(f"{setting} {dn!r} is not a valid DN: {exc}") from None


def check_filter(setting: str, text: str) -> None:
    try:
        parse_filter(text, None, auto_escape=False, auto_encode=False, validator=None, check_names=False)
    except (LDAPInvalidFilterError, ValueError, IndexError) as exc:
        raise ValueError(f"{setting} {text!r} is not a valid LDAP filter: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class DirectorySettings:
    url: str
    bind_dn: str
    password: str = field(repr=False)
    # One DN or several separated by ';' (or a sequence); see base_dns.
    base_dn: str | tuple[str, ...]
    search_filter: str | None = None  # ANDed with USER_FILTER
    group_dn: str | None = None  # members only (nested membership counts)
    page_size: int = 500
    ca_file: str | None = None
    start_tls: bool = False
    # Without TLS a simple bind sends the password in clear: only when explicitly allowed.
    allow_plain_bind: bool = False
    timeout_s: int = 10
    time_limit_s: int = 120  # per search, enforced by the server
    change_tracking: str = "usn"

    def __post_init__(self) -> None:
        scheme = urlparse(self.url).scheme
        if scheme not in ("ldap", "ldaps"):
            raise ValueError(f"ldap url must start with ldap:// or ldaps://, got scheme {scheme!r}")
        if not self.base_dns:
            raise ValueError("ldap base_dn is required")
        if scheme == "ldap" and not self.start_tls and not self.allow_plain_bind:
            raise ValueError(
                "ldap:// without start_tls would send the bind password in clear: use ldaps:// or"
                " start_tls (with ca_file), or set allow_plain_bind for a lab directory"
            )
        for dn in self.base_dns:
            check_dn("ldap base_dn", dn)
        _check_disjoint(self.base_dns)
        if self.group_dn:
            check_dn("ldap group_dn", self.group_dn)
        if self.search_filter:
            check_filter("ldap search_filter", _wrapped(self.search_filter))
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"ldap page_size must be between 1 and {MAX_PAGE_SIZE} (AD's MaxPageSize)")
        if self.time_limit_s < 1:
            raise ValueError("ldap time_limit_s must be at least 1 second")
        if self.change_tracking not in CHANGE_TRACKING:
            raise ValueError(
                f"ldap change_tracking must be one of {', '.join(CHANGE_TRACKING)}, not {self.change_tracking!r}"
            )

    @property
    def base_dns(self) -> tuple[str, ...]:
        return split_dns(self.base_dn)

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "ldaps" or self.start_tls

    @property
    def scope_filter(self) -> str:
        """The filter every in-scope user matches."""
        parts = [USER_FILTER]
        if self.search_filter:
            parts.append(_wrapped(self.search_filter))
        if self.group_dn:
            parts.append(f"(memberOf:{IN_CHAIN}:={escape_value(self.group_dn)})")
        return parts[0] if len(parts) == 1 else f"(&{''.join(parts)})"

    def scope_text(self) -> str:
        host = urlparse(self.url).hostname or ""
        tracking = "" if self.change_tracking == "usn" else f" tracking={self.change_tracking}"
        return f"{host} base={list(self.base_dns)} filter={self.scope_filter}{tracking}"

    def scope_key(self) -> str:
        """Changes whenever the scope does: a watermark of another scope forces a full read."""
        return hashlib.sha256(self.scope_text().encode()).hexdigest()


def _wrapped(text: str) -> str:
    """An extra filter may be given without its outer parentheses (department=IT)."""
    text = text.strip()
    return text if text.startswith("(") else f"({text})"


def _check_disjoint(dns: tuple[str, ...]) -> None:
    """Nested base DNs would read the users below both twice."""
    norm = [",".join(part.strip().lower() for part in re.split(r"(?<!\\),", dn)) for dn in dns]
    for i, a in enumerate(norm):
        for j, b in enumerate(norm):
            if i != j and (a == b or a.endswith("," + b)):
                raise ValueError(f"ldap base_dn {dns[i]!r} lies within {dns[j]!r}: give the outer one only")


def escape_value(value: str) -> str:
    """An assertion value for a filter (RFC 4515): a DN may hold parentheses and backslashes."""
    out = []
    for ch in value:
        out.append(f"\\{ord(ch):02x}" if ch in "*()\\\x00" else ch)
    return "".join(out)
