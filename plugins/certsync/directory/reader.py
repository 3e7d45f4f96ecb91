"""Paged reads of Active Directory (or any AD-compatible LDAP server) over a verified TLS channel.

One connection serves a whole extract. The reader knows the LDAP side of full and delta reads: which
DC answers (rootDSE dsServiceName and the invocationId of its NTDS Settings), the users in scope,
those changed since a USN, the tombstones of deleted users (show-deleted control), and where users
that dropped out of the scope went. What to do with it is the store's business.
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlparse

import ldap3
from ldap3.core.exceptions import LDAPException, LDAPTimeLimitExceededResult

from certsync.directory.decoding import decode_entries_raw
from certsync.directory.entries import ATTRIBUTES, DirectoryUser, clean, guid_filter, guid_of, to_user
from certsync.directory.settings import USER_FILTER, DirectorySettings

log = logging.getLogger(__name__)

SHOW_DELETED = "1.2.840.113556.1.4.417"  # LDAP_SERVER_SHOW_DELETED_OID: tombstones are returned
# DirSync reports an object only when one of the requested attributes changed: ask for every one the
# scope and the pipeline depend on (name: renames and moves; member: group membership).
DIRSYNC_ATTRIBUTES = ("objectGUID", "isDeleted", "objectClass", "name", "member", *(
    a for a in ATTRIBUTES if a not in ("objectGUID", "uSNChanged")))  # fmt: skip
GUID_BATCH = 200  # users looked up by objectGUID per search


class DirectoryError(RuntimeError):
    """The directory could not be reached or refused the configured account or scope."""


@dataclass(frozen=True)
class ServerIdentity:
    """Which DC answers, and how far its USNs go. USNs only compare within one DC's database."""

    dc_service_name: str
    invocation_id: uuid.UUID
    highest_usn: int
    naming_context: str


class DirectoryReader:
    """Reads users in the configured scope; unreadable entries land in `skipped` with a reason."""

    def __init__(self, *, settings: DirectorySettings) -> None:
        self._settings = settings
        self.skipped: list[tuple[str, str]] = []

    @property
    def settings(self) -> DirectorySettings:
        return self._settings

    def _connect(self) -> ldap3.Connection:
        s = self._settings
        parsed = urlparse(s.url)
        use_ssl = parsed.scheme == "ldaps"
        tls = ldap3.Tls(ca_certs_file=s.ca_file, validate=ssl.CERT_REQUIRED) if s.tls else None
        server = ldap3.Server(
            parsed.hostname or "localhost",
            port=parsed.port or (636 if use_ssl else 389),
            use_ssl=use_ssl,
            tls=tls,
            connect_timeout=s.timeout_s,
            get_info=ldap3.NONE,
        )
        try:
            conn = ldap3.Connection(
                server,
                user=s.bind_dn,
                password=s.password,
                receive_timeout=max(s.timeout_s, s.time_limit_s + 10),
                raise_exceptions=True,
                read_only=True,
                auto_range=True,  # attr;range=... of large multi-valued attributes is fetched whole
            )
            if s.start_tls:
                conn.open()
                conn.start_tls()
            conn.bind()
        except LDAPException as exc:
            # ldap3 messages never contain the password; keep only the class and text.
            raise DirectoryError(
                f"cannot bind to {s.url} as {s.bind_dn}: {type(exc).__name__}: {exc}"
            ) from None
        return decode_entries_raw(conn)

    @contextmanager
    def session(self) -> Iterator[ldap3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.unbind()

    def check(self) -> None:
        """Bind and read every base DN (and the group) once, so bad settings fail before anything
        is written."""
        s = self._settings
        with self.session() as conn:
            for setting, dn in [
                *(("base_dn", b) for b in s.base_dns),
                *([("group_dn", s.group_dn)] * bool(s.group_dn)),
            ]:
                try:
                    conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=[])
                except LDAPException as exc:
                    raise DirectoryError(f"ldap {setting} {dn!r} is not readable: {exc}") from None
            self.identity(conn)

    def identity(self, conn: ldap3.Connection) -> ServerIdentity:
        """The answering DC (read before a search: its USN bounds what the search may miss)."""
        try:
            conn.search(
                "", "(objectClass=*)", ldap3.BASE,
                attributes=["dsServiceName", "highestCommittedUSN", "defaultNamingContext"],
            )  # fmt: skip
            root = conn.response[0]["raw_attributes"]
            service = bytes(root["dsServiceName"][0]).decode()
            conn.search(service, "(objectClass=*)", ldap3.BASE, attributes=["invocationId"])
            invocation = bytes(conn.response[0]["raw_attributes"]["invocationId"][0])
            return ServerIdentity(
                dc_service_name=service,
                invocation_id=uuid.UUID(bytes_le=invocation),
                highest_usn=int(root["highestCommittedUSN"][0]),
                naming_context=bytes(root["defaultNamingContext"][0]).decode(),
            )
        except (LDAPException, KeyError, IndexError, ValueError) as exc:
            raise DirectoryError(
                f"the server at {self._settings.url} does not identify itself as an AD DC"
                f" (rootDSE dsServiceName/highestCommittedUSN, invocationId): {type(exc).__name__}: {exc}"
            ) from None

    # -- reads -------------------------------------------------------------------------------

    def _paged(
        self,
        conn: ldap3.Connection,
        base: str,
        search_filter: str,
        attributes: Iterable[str],
        *,
        deleted: bool = False,
    ) -> Iterator[tuple[str, dict[str, list[bytes]]]]:
        s = self._settings
        try:
            entries = conn.extend.standard.paged_search(
                base,
                search_filter,
                ldap3.SUBTREE,
                attributes=list(attributes),
                paged_size=s.page_size,
                time_limit=s.time_limit_s,
                controls=[(SHOW_DELETED, True, None)] if deleted else None,
                generator=True,
            )
            for entry in entries:
                if entry.get("type") == "searchResEntry":
                    yield entry["dn"], entry["raw_attributes"]
        except LDAPTimeLimitExceededResult:
            raise DirectoryError(
                f"ldap search below {base!r} exceeded the server time limit of {s.time_limit_s}s"
                " (raise time_limit_s or narrow the scope)"
            ) from None
        except LDAPException as exc:
            raise DirectoryError(f"ldap search below {base!r} failed: {type(exc).__name__}: {exc}") from None

    def _users(self, conn: ldap3.Connection, extra: str = "") -> Iterator[DirectoryUser]:
        scope = self._settings.scope_filter
        search_filter = f"(&{scope}{extra})" if extra else scope
        for base in self._settings.base_dns:
            for dn, raw in self._paged(conn, base, search_filter, ATTRIBUTES):
                user = self._read_entry(dn, raw)
                if user is not None:
                    yield user

    def iter_users(self, conn: ldap3.Connection | None = None) -> Iterator[DirectoryUser]:
        """Every user in scope (a full read)."""
        if conn is not None:
            yield from self._users(conn)
            return
        with self.session() as own:
            yield from self._users(own)

    def changed_in_domain(
        self, conn: ldap3.Connection, *, since: int, naming_context: str
    ) -> tuple[list[tuple[uuid.UUID, bool]], bool]:
        """(objectGUID, deleted) of every user of the domain changed after `since`, tombstones
        included, and whether any group changed (a membership change bumps the group's USN, never
        the member's: memberOf is a back link). One search: a uSNChanged range is a scan on some
        servers (Samba), so the users in scope are then looked up by objectGUID (iter_by_guid),
        which is indexed, instead of scanning again below each base DN."""
        search_filter = f"(&(uSNChanged>={since + 1})(|{USER_FILTER}(objectClass=group)))"
        users: list[tuple[uuid.UUID, bool]] = []
        group = False
        for dn, raw in self._paged(
            conn, naming_context, search_filter, ["objectGUID", "isDeleted", "objectClass"], deleted=True
        ):
            classes = {bytes(v).lower() for v in raw.get("objectClass", [])}
            if b"group" in classes:
                group = True
            elif b"user" in classes and b"computer" not in classes:
                deleted = any(bytes(v).upper() == b"TRUE" for v in raw.get("isDeleted", []))
                users.extend(self._guid(dn, raw, deleted=deleted))
        return users, group

    def dirsync(
        self, conn: ldap3.Connection, *, cookie: bytes | None, naming_context: str, collect: bool = True
    ) -> tuple[list[tuple[uuid.UUID, bool, bool]], bytes]:
        """Users and groups changed since `cookie` (None: everything, to get a first cookie) as
        (objectGUID, deleted, is_group), and the cookie to ask with next time."""
        search_filter = "(|(objectClass=user)(objectClass=group))"
        changes: list[tuple[uuid.UUID, bool, bool]] = []
        try:
            sync = conn.extend.microsoft.dir_sync(
                naming_context, search_filter, attributes=list(DIRSYNC_ATTRIBUTES), cookie=cookie
            )
            while sync.more_results:
                for entry in sync.loop():
                    if collect and entry.get("type") == "searchResEntry":
                        changes.extend(self._dirsync_change(entry["dn"], entry["raw_attributes"]))
        except LDAPException as exc:
            raise DirectoryError(
                f"DirSync below {naming_context!r} failed: {type(exc).__name__}: {exc}"
            ) from None
        return changes, bytes(sync.cookie)

    def _dirsync_change(self, dn: str, raw: dict[str, list[bytes]]) -> Iterator[tuple[uuid.UUID, bool, bool]]:
        classes = {bytes(v).lower() for v in raw.get("objectClass", [])}
        if b"computer" in classes:
            return
        deleted = any(bytes(v).upper() == b"TRUE" for v in raw.get("isDeleted", []))
        # DirSync returns only the attributes that changed: a group whose membership changed comes
        # with `member` (or `member;range=...` for incremental values) but not its objectClass.
        member = (values for name, values in raw.items() if name.split(";")[0].lower() == "member")
        group = b"group" in classes or any(values for values in member)
        for guid, _ in self._guid(dn, raw, deleted=deleted):
            yield guid, deleted, group

    def iter_scope_guids(self, conn: ldap3.Connection) -> Iterator[uuid.UUID]:
        """The identities of every user in scope, without their values (cheap)."""
        for base in self._settings.base_dns:
            for dn, raw in self._paged(conn, base, self._settings.scope_filter, ["objectGUID"]):
                for guid, _ in self._guid(dn, raw, deleted=False):
                    yield guid

    def iter_by_guid(self, conn: ldap3.Connection, guids: Iterable[uuid.UUID]) -> Iterator[DirectoryUser]:
        """The in-scope users among `guids`, with all their values."""
        for batch in _batches(guids, GUID_BATCH):
            yield from self._users(conn, guid_filter(batch))

    def locate(
        self, conn: ldap3.Connection, guids: Iterable[uuid.UUID], *, naming_context: str
    ) -> dict[uuid.UUID, str]:
        """Why each of `guids` is no longer in scope: 'left_scope' when it still lives in the
        domain, else 'deleted' (a tombstone, or not found at all)."""
        found: dict[uuid.UUID, str] = {}
        for batch in _batches(guids, GUID_BATCH):
            found.update((g, "deleted") for g in batch)
            search_filter = f"(&(objectClass=user){guid_filter(batch)})"
            for dn, raw in self._paged(
                conn, naming_context, search_filter, ["objectGUID", "isDeleted"], deleted=True
            ):
                deleted = any(bytes(v).upper() == b"TRUE" for v in raw.get("isDeleted", []))
                for guid, _ in self._guid(dn, raw, deleted=deleted):
                    found[guid] = "deleted" if deleted else "left_scope"
        return found

    def _guid(
        self, dn: str, raw: dict[str, list[bytes]], *, deleted: bool
    ) -> Iterator[tuple[uuid.UUID, bool]]:
        try:
            yield guid_of(raw), deleted
        except (KeyError, IndexError, ValueError) as exc:
            self._skip(dn, exc)

    def _read_entry(self, dn: str, raw: dict[str, list[bytes]]) -> DirectoryUser | None:
        """One entry as a user, or None (recorded in `skipped`) when it cannot be one: a single
        odd object must not stop the extract of all the others."""
        try:
            return to_user(dn, raw)
        except (KeyError, IndexError, ValueError) as exc:
            self._skip(dn, exc)
            return None

    def _skip(self, dn: str, exc: Exception) -> None:
        reason = f"unreadable {type(exc).__name__}: {exc}"[:300]
        self.skipped.append((clean(dn), reason))
        log.warning("skipping directory entry %s: %s", clean(dn), reason)


def _batches(items: Iterable[uuid.UUID], size: int) -> Iterator[list[uuid.UUID]]:
    batch: list[uuid.UUID] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
