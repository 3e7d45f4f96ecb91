"""Add LDIF records straight into a stopped Samba AD DC's sam.ldb, through Samba's own modules.

Run by the interpreter that runs samba-tool (Samba's Python bindings belong to it, not to the lab's
virtualenv), never imported by the lab:

    python3 -I samba_offline_add.py SMB_CONF OU_DN BATCH < records.ldif

The records come on stdin, one LDIF entry each, separated by a blank line. The session is the
domain's Administrator (as the LDAP loader binds), so objectSid (a RID from the DC's pool),
objectGUID, the USNs, the replication metadata and the security descriptor are assigned by the same
module stack an LDAP add goes through. Accounts whose sAMAccountName exists under OU_DN are
skipped, and so is a DN that exists (as the LDAP loader does). Entries are committed in
transactions of BATCH.
The last line on stdout is a JSON summary.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from typing import IO

import ldb  # type: ignore[import-not-found]
from samba.auth import admin_session  # type: ignore[import-not-found]
from samba.param import LoadParm  # type: ignore[import-not-found]
from samba.samdb import SamDB  # type: ignore[import-not-found]

USERS = "(&(objectClass=user)(!(objectClass=computer)))"


def open_samdb(smb_conf: str) -> SamDB:
    lp = LoadParm()
    lp.load(smb_conf)
    probe = SamDB(url=lp.samdb_url(), lp=lp)
    domain_sid = str(probe.get_domain_sid())
    # batch_mode: no nested transaction per add, whose commit copies every index list the add
    # touched (the objectClass and one-level lists hold every user); an error fails the whole batch.
    options = ["batch_mode:1"]
    return SamDB(url=lp.samdb_url(), session_info=admin_session(lp, domain_sid), lp=lp, options=options)


def ensure_ou(samdb: SamDB, ou_dn: str) -> tuple[set[str], set[str]]:
    """Create the OU if missing; return the lower-cased account names and the case-folded DNs of
    the users already under it (an add that fails would fail its whole batch, so none is tried)."""
    try:
        found = samdb.search(ou_dn, scope=ldb.SCOPE_SUBTREE, expression=USERS, attrs=["sAMAccountName"])
    except ldb.LdbError as exc:
        if exc.args[0] != ldb.ERR_NO_SUCH_OBJECT:
            raise
        samdb.add({"dn": ou_dn, "objectClass": ["top", "organizationalUnit"]})
        return set(), set()
    names = {str(m["sAMAccountName"][0]).lower() for m in found if "sAMAccountName" in m}
    return names, {m.dn.get_casefold() for m in found}


def records(stream: IO[str]) -> Iterator[str]:
    lines: list[str] = []
    for line in stream:
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines)
            lines = []
    if lines:
        yield "".join(lines)


def add_one(samdb: SamDB, record: str, present: set[str], dns: set[str]) -> int:
    for _changetype, msg in samdb.parse_ldif(record):
        name = str(msg["sAMAccountName"][0]).lower() if "sAMAccountName" in msg else None
        if name in present or msg.dn.get_casefold() in dns:
            return 0
        try:
            samdb.add(msg)
        except ldb.LdbError as exc:
            raise RuntimeError(f"cannot add {msg.dn}: {exc.args[1]}") from exc
        if name:
            present.add(name)
        dns.add(msg.dn.get_casefold())
        return 1
    return 0


def main(argv: list[str]) -> int:
    smb_conf, ou_dn, batch = argv[0], argv[1], int(argv[2])
    began = time.monotonic()
    samdb = open_samdb(smb_conf)
    present, dns = ensure_ou(samdb, ou_dn)
    added = seen = 0
    samdb.transaction_start()
    try:
        for record in records(sys.stdin):
            added += add_one(samdb, record, present, dns)
            seen += 1
            if seen % batch == 0:
                samdb.transaction_commit()
                elapsed = time.monotonic() - began
                print(f"{seen} records, {added} added, {elapsed:.1f} s", file=sys.stderr, flush=True)
                samdb.transaction_start()
    except BaseException:
        samdb.transaction_cancel()
        raise
    samdb.transaction_commit()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    summary = {
        "records": seen,
        "added": added,
        "seconds": round(time.monotonic() - began, 3),
        "cpu_s": round(cpu.ru_utime + cpu.ru_stime, 3),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
