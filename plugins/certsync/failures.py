"""How a run fails: what a retry can fix (a system down or overloaded) versus what a person must
fix (settings, a guard), and the clear one-line messages both give instead of a driver's traceback.

A wrong password and a DC that is down both surface as "cannot connect"; the difference is in the
exception the driver raised underneath, which the wrappers keep as their context. This module
reads that chain and nothing else: no stage needs to know about it.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import requests
import sqlalchemy as sa
from ldap3.core import exceptions as ldap_exc
from msal.exceptions import MsalServiceError

from certsync.directory import DirectoryError
from certsync.exchange.client import RETRYABLE_STATUS, ExchangeError

# SQLSTATE classes of a server that is going away or overloaded (not of a refused login or schema).
_TRANSIENT_SQLSTATE = ("08", "53", "57P01", "57P02", "57P03", "40001", "40P01")
_TRANSIENT_LDAP = (
    ldap_exc.LDAPCommunicationError,
    ldap_exc.LDAPResponseTimeoutError,
    ldap_exc.LDAPMaximumRetriesError,
    ldap_exc.LDAPServerPoolExhaustedError,
)


class Unavailable(RuntimeError):
    """A system certsync needs could not be reached or asked us to come back later; the message
    names the connection. Retrying later may succeed, so the task is retried with backoff."""


class RunFailed(RuntimeError):
    """The run ended with actions failed or still pending, or stopped before its plan: it was
    recorded as failed, and the DAG run must show it."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what it was raised from or during (wrappers raise `from None`, which
    hides the context from tracebacks but keeps it here)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _database_reason(exc: BaseException) -> str | None:
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate or ""
        # No SQLSTATE: the server never answered (refused, reset, timed out).
        if not state or state.startswith(_TRANSIENT_SQLSTATE):
            return "PostgreSQL is unreachable or went away"
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return "PostgreSQL closed the connection"
    return None


def _reason(exc: BaseException) -> str | None:
    if isinstance(exc, Unavailable):
        return str(exc)
    if isinstance(exc, _TRANSIENT_LDAP):
        return f"the directory is unreachable ({type(exc).__name__})"
    if isinstance(exc, ExchangeError) and (exc.status is None or exc.status in RETRYABLE_STATUS):
        return f"Exchange Online is unreachable or busy ({exc.status or 'no answer'})"
    if isinstance(exc, MsalServiceError):
        return "the token endpoint answered with a server error"
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return f"an HTTPS endpoint is unreachable ({type(exc).__name__})"
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"a connection failed ({type(exc).__name__})"
    return _database_reason(exc)


def transient_reason(exc: BaseException) -> str | None:
    """Why `exc` is worth a retry (a system down, unreachable or busy), or None when it is not:
    a refused login, a missing schema, a bad file, a bug."""
    for link in _chain(exc):
        if isinstance(link, (ldap_exc.LDAPBindError,)) or (
            isinstance(link, DirectoryError) and "invalidCredentials" in str(link)
        ):
            return None
        reason = _reason(link)
        if reason:
            return reason
    return None


def short_message(exc: BaseException) -> str:
    """One line for a person: the wrapper's own message, without the driver's dump."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__
