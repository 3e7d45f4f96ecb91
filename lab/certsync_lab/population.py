"""A deterministic, realistic population of AD users with S/MIME certificates, and its LDAP loader.

Most users hold one to three certificates (renewals leave the older ones expired). A fixed share of
users carries one planted scenario each (see SCENARIO_SHARES); every value also records what a correct
validator should conclude about it (`SeedUser.expected`, keyed by the SHA-256 of the raw value).

Build the population before writing the PKI's trust files: CRLs list the serials revoked so far.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
import time
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import ldap3
from ldap3.utils.dn import escape_rdn

from certsync_lab.samba import SambaDC

log = logging.getLogger(__name__)

# Share of the population that gets each planted scenario (each at least one user when it fits).
SCENARIO_SHARES: dict[str, float] = {
    "expired": 0.05,
    "not_yet_valid": 0.03,
    "no_email_eku": 0.03,
    "unknown_issuer": 0.03,
    "email_mismatch": 0.03,
    "weak_key": 0.03,
    "weak_signature": 0.03,
    "revoked": 0.03,
    "malformed_truncated": 0.02,
    "malformed_garbage": 0.02,
    "too_many_values": 0.01,
    "too_many_valid": 0.01,
    "pkcs7_certs_only": 0.05,
    "pkcs7_signed": 0.05,
    "no_mail": 0.02,
    "disabled": 0.03,
}
DEFECT_TAGS = tuple(SCENARIO_SHARES)
VALID = None  # expected outcome of a value that must be accepted
LIFETIME = timedelta(days=730)
UAC_ENABLED = 512
UAC_DISABLED = 514
USER_CLASSES = ("top", "person", "organizationalPerson", "user")
OFFLINE_FROM = 5000  # populations at least this large are loaded offline by the lab stack

GIVEN_NAMES = (
    "Anna", "Ben", "Chloé", "David", "Elif", "Farid", "Greta", "Hugo", "Ingrid", "José",
    "Katarzyna", "Liam", "Maëlle", "Noah", "Olga", "Pablo", "Quentin", "Rosa", "Søren", "Tanja",
    "Umar", "Vera", "William", "Xiu", "Yusuf", "Zoë", "Amélie", "Björn", "Carmen", "Dmitri",
)  # fmt: skip
SURNAMES = (
    "Müller", "Smith", "García", "Nguyen", "O'Brien", "Kowalski", "Rossi", "Dubois", "Öztürk",
    "Johansson", "Novák", "Silva", "Schmidt", "Brown", "Martin", "Fischer", "Jensen", "Lopez",
    "Weber", "Andersen", "Costa", "Wagner", "Horvath", "Ivanova", "Kim", "Lee", "Moreau", "Berg",
)  # fmt: skip
OTHER_DOMAINS = ("legacy.example.org", "acquired.example.net")


class IssuingPki(Protocol):
    """What the generator needs from `certsync_lab.pki.Pki`."""

    def issue(self, **kwargs: Any) -> bytes: ...
    def pkcs7_certs_only(self, ders: Sequence[bytes], *, ber: bool = False) -> bytes: ...
    def pkcs7_signed(self, **kwargs: Any) -> bytes: ...
    def ca_der(self, name: str) -> bytes: ...


@dataclass(frozen=True)
class SeedUser:
    sam_account_name: str
    given_name: str
    surname: str
    display_name: str
    mail: str | None
    proxy_addresses: list[str]
    user_certificate: list[bytes] = field(repr=False)
    user_smime_certificate: list[bytes] = field(repr=False)
    disabled: bool
    defects: list[str]
    # sha256 hex of each raw value -> planted defect tag, or None when the value must be accepted.
    expected: dict[str, str | None] = field(repr=False)

    @property
    def valid_count(self) -> int:
        return sum(1 for outcome in self.expected.values() if outcome is VALID)


def generate_population(
    *,
    count: int,
    pki: IssuingPki,
    seed: int = 0,
    at: datetime,
    mail_domain: str = "corp.example.test",
) -> list[SeedUser]:
    """Build `count` users deterministically for (seed, at, mail_domain) and the PKI's keys."""
    rng = random.Random(seed)
    scenarios = _assign_scenarios(count, rng)
    names = _Names()
    users = []
    for index in range(count):
        given, surname = rng.choice(GIVEN_NAMES), rng.choice(SURNAMES)
        identity = names.claim(given, surname)
        builder = _UserBuilder(pki=pki, rng=rng, at=at, identity=identity, mail_domain=mail_domain)
        users.append(builder.build(scenarios.get(index)))
    log.info("generated %s users (%s with a planted scenario)", count, len(scenarios))
    return users


def _assign_scenarios(count: int, rng: random.Random) -> dict[int, str]:
    """Pick distinct users for each scenario at its share (at least one each while users last)."""
    order = list(range(count))
    rng.shuffle(order)
    assigned: dict[int, str] = {}
    for tag, share in SCENARIO_SHARES.items():
        wanted = max(1, round(share * count))
        for _ in range(wanted):
            if not order:
                return assigned
            assigned[order.pop()] = tag
    return assigned


@dataclass(frozen=True)
class _Identity:
    sam: str
    given: str
    surname: str
    display: str
    local: str  # the ASCII local part of the primary address


class _Names:
    """Hands out unique account names, display names and mail local parts."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def claim(self, given: str, surname: str) -> _Identity:
        g, s = _ascii(given), _ascii(surname)
        base_sam = (g[:1] + s)[:16]
        base_local = f"{g}.{s}"
        for n in range(1, 10_000):
            suffix = "" if n == 1 else str(n)
            sam, local = f"{base_sam}{suffix}", f"{base_local}{suffix}"
            if sam not in self._taken and local not in self._taken:
                self._taken.update((sam, local))
                display = f"{given} {surname}" + (f" ({n})" if n > 1 else "")
                return _Identity(sam=sam, given=given, surname=surname, display=display, local=local)
        raise ValueError("name space exhausted")


def _ascii(text: str) -> str:
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in folded.lower() if ch.isalnum())


class _UserBuilder:
    """Builds one user's addresses and certificate values for a scenario."""

    def __init__(
        self,
        *,
        pki: IssuingPki,
        rng: random.Random,
        at: datetime,
        identity: _Identity,
        mail_domain: str,
    ) -> None:
        self.pki, self.rng, self.at, self.who = pki, rng, at, identity
        self.mail = f"{identity.local}@{mail_domain}"
        self.aliases = self._aliases(mail_domain)
        self.certs: list[bytes] = []
        self.smime: list[bytes] = []
        self.expected: dict[str, str | None] = {}

    def _aliases(self, mail_domain: str) -> list[str]:
        options = [f"{self.who.sam}@{mail_domain}"]
        options += [f"{self.who.local}@{domain}" for domain in OTHER_DOMAINS]
        return options[: self.rng.choice((0, 1, 1, 2, 3))]

    def build(self, scenario: str | None) -> SeedUser:
        if scenario is None:
            self._history(self.rng.choice((1, 1, 1, 2, 2, 3)))
        else:
            getattr(self, f"_plant_{scenario}")()
        no_mail = scenario == "no_mail"
        proxies = [] if no_mail else [f"SMTP:{self.mail}"] + [f"smtp:{a}" for a in self.aliases]
        return SeedUser(
            sam_account_name=self.who.sam,
            given_name=self.who.given,
            surname=self.who.surname,
            display_name=self.who.display,
            mail=None if no_mail else self.mail,
            proxy_addresses=proxies,
            user_certificate=self.certs,
            user_smime_certificate=self.smime,
            disabled=scenario == "disabled",
            defects=[] if scenario is None else [scenario],
            expected=self.expected,
        )

    # value helpers

    def _add(self, value: bytes, outcome: str | None, *, smime: bool = False) -> bytes:
        (self.smime if smime else self.certs).append(value)
        self.expected[hashlib.sha256(value).hexdigest()] = outcome
        return value

    def _issue(self, *, not_before: datetime | None = None, **kwargs: Any) -> bytes:
        start = not_before or self.at - timedelta(days=self.rng.randint(20, 700))
        kwargs.setdefault("key", self.rng.choice(("rsa2048", "rsa2048", "ec-p256", "ec-p384")))
        kwargs.setdefault("email", self._cert_address())
        return self.pki.issue(not_before=start, not_after=start + LIFETIME, **kwargs)

    def _cert_address(self) -> str:
        # Most certificates name the primary address; some name an alias the user also holds.
        if self.aliases and self.rng.random() < 0.2:
            return self.rng.choice(self.aliases)
        return self.mail

    def _expired(self, *, years_ago: int = 1, **kwargs: Any) -> bytes:
        start = self.at - LIFETIME - timedelta(days=365 * years_ago + self.rng.randint(1, 300))
        return self._issue(not_before=start, **kwargs)

    def _history(self, total: int) -> None:
        """A current certificate plus older renewals that have expired."""
        for years_ago in range(total - 1, 0, -1):
            self._add(self._expired(years_ago=years_ago), "expired")
        self._add(self._issue(), VALID)

    def _maybe_valid_too(self) -> None:
        if self.rng.random() < 0.5:
            self._add(self._issue(), VALID)

    # planted scenarios (called by name from build)

    def _plant_expired(self) -> None:
        self._add(self._expired(), "expired")

    def _plant_not_yet_valid(self) -> None:
        start = self.at + timedelta(days=self.rng.randint(2, 60))
        self._add(self._issue(not_before=start), "not_yet_valid")
        self._maybe_valid_too()

    def _plant_no_email_eku(self) -> None:
        self._add(self._issue(eku=("1.3.6.1.5.5.7.3.2",)), "no_email_eku")
        self._maybe_valid_too()

    def _plant_unknown_issuer(self) -> None:
        self._add(self._issue(issuer="unknown"), "unknown_issuer")
        self._maybe_valid_too()

    def _plant_email_mismatch(self) -> None:
        stranger = f"{self.who.local}@elsewhere.example.com"
        self._add(self._issue(email=stranger), "email_mismatch")
        self._maybe_valid_too()

    def _plant_weak_key(self) -> None:
        self._add(self._issue(key="rsa1024"), "weak_key")
        self._maybe_valid_too()

    def _plant_weak_signature(self) -> None:
        self._add(self._issue(sig_hash="sha1", key="rsa2048"), "weak_signature")
        self._maybe_valid_too()

    def _plant_revoked(self) -> None:
        self._add(self._issue(revoked=True), "revoked")
        self._maybe_valid_too()

    def _plant_malformed_truncated(self) -> None:
        der = self._issue()
        self._add(der[: len(der) // 2], "malformed_truncated")
        self._maybe_valid_too()

    def _plant_malformed_garbage(self) -> None:
        size = self.rng.randint(16, 400)
        # Half start like a DER SEQUENCE so the parser cannot reject them by the first byte.
        prefix = b"\x30\x82" if self.rng.random() < 0.5 else b""
        self._add(prefix + self.rng.randbytes(size), "malformed_garbage")
        self._maybe_valid_too()

    def _plant_too_many_values(self) -> None:
        for n in range(15):
            self._add(self._expired(years_ago=1 + n % 4), "expired")
        for _ in range(3):
            self._add(self._issue(), VALID)

    def _plant_too_many_valid(self) -> None:
        # A CA that re-issues often: seventeen current certificates, of which only the fifteen
        # newest may be published (Entra's LargeObject limit); the two oldest are over the limit.
        for n in range(17):
            value = self._issue(not_before=self.at - timedelta(days=20 + 10 * n))
            self._add(value, VALID if n < 15 else "over_limit")

    def _plant_pkcs7_certs_only(self) -> None:
        leaf = self._issue()
        chain = [leaf, self.pki.ca_der("intermediate")]
        blob = self.pki.pkcs7_certs_only(chain, ber=self.rng.random() < 0.3)
        self._add(blob, VALID, smime=True)
        if self.rng.random() < 0.5:
            self._add(leaf, VALID)

    def _plant_pkcs7_signed(self) -> None:
        # Outlook-style blobs (signing time from the PKI's clock, RSA signer) are reproducible;
        # cryptography's own builder stamps the wall-clock time, so it is not used here.
        signer = self._add(self._issue(key="rsa2048"), VALID)
        encryption = self._issue(key="rsa2048")
        extra = [self.pki.ca_der("intermediate")] if self.rng.random() < 0.5 else []
        blob = self.pki.pkcs7_signed(
            signer=signer, encryption_cert=encryption, extra=extra, ber=self.rng.random() < 0.3
        )
        self._add(blob, VALID, smime=True)

    def _plant_no_mail(self) -> None:
        self._history(1)

    def _plant_disabled(self) -> None:
        self._history(self.rng.choice((1, 2)))


def load_population(
    *,
    url: str,
    bind_dn: str,
    password: str,
    ou_dn: str,
    users: Sequence[SeedUser],
) -> int:
    """Add `users` under `ou_dn` (created if missing); existing users are left alone. Returns added."""
    began = time.monotonic()
    conn = _bind(url, bind_dn, password)
    try:
        _ensure_ou(conn, ou_dn)
        present = _existing_accounts(conn, ou_dn)
        upn_suffix = _dns_domain(ou_dn)
        added = 0
        for user in users:
            if user.sam_account_name.lower() in present:
                continue
            added += _add_user(conn, ou_dn, user, upn_suffix)
    finally:
        conn.unbind()
    elapsed = time.monotonic() - began
    log.info("loaded %s of %s users in %.1f s", added, len(users), elapsed)
    return added


def load_population_offline(*, samba: SambaDC, ou_dn: str, users: Sequence[SeedUser]) -> int:
    """Add `users` under `ou_dn` as `load_population` does, but straight into the DC's database
    while it is stopped (Samba's own modules assign SIDs, GUIDs and USNs as over LDAP); a running
    DC is stopped and restarted. Existing users are left alone. Returns added."""
    began = time.monotonic()
    added = samba.add_offline(population_ldif(users, ou_dn=ou_dn), ou_dn=ou_dn)
    log.info("loaded %s of %s users offline in %.1f s", added, len(users), time.monotonic() - began)
    return added


def population_ldif(users: Sequence[SeedUser], *, ou_dn: str) -> Iterator[str]:
    """One LDIF entry per user, with the attributes and DN the LDAP loader adds (every value
    base64-encoded, so names and DER blobs need no escaping)."""
    upn_suffix = _dns_domain(ou_dn)
    for user in users:
        lines = [_ldif_line("dn", _user_dn(user, ou_dn))]
        lines += [_ldif_line("objectClass", name) for name in USER_CLASSES]
        for name, value in _user_attributes(user, upn_suffix).items():
            lines += [_ldif_line(name, v) for v in (value if isinstance(value, list) else [value])]
        yield "\n".join(lines) + "\n"


def _ldif_line(name: str, value: str | bytes) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return f"{name}:: {base64.b64encode(raw).decode()}"


def _bind(url: str, bind_dn: str, password: str) -> ldap3.Connection:
    server = ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=10)
    conn = ldap3.Connection(server, user=bind_dn, password=password, receive_timeout=60)
    if not conn.bind():
        # The result never echoes the password; keep only its description.
        raise PopulationLoadError(f"bind as {bind_dn} failed: {conn.result['description']}")
    return conn


class PopulationLoadError(RuntimeError):
    """The directory refused a bind, the OU or a user."""


def _ensure_ou(conn: ldap3.Connection, ou_dn: str) -> None:
    if conn.search(ou_dn, "(objectClass=organizationalUnit)", ldap3.BASE, attributes=[]):
        return
    if not conn.add(ou_dn, ["top", "organizationalUnit"]):
        raise PopulationLoadError(f"cannot create {ou_dn}: {conn.result['description']}")
    log.info("created %s", ou_dn)


def _existing_accounts(conn: ldap3.Connection, ou_dn: str) -> set[str]:
    entries = conn.extend.standard.paged_search(
        ou_dn,
        "(&(objectClass=user)(!(objectClass=computer)))",
        ldap3.SUBTREE,
        attributes=["sAMAccountName"],
        paged_size=1000,
        generator=True,
    )
    names = set()
    for entry in entries:
        if entry.get("type") == "searchResEntry":
            names.update(v.decode().lower() for v in entry["raw_attributes"]["sAMAccountName"])
    return names


def _dns_domain(dn: str) -> str:
    parts = [rdn.split("=", 1)[1] for rdn in dn.split(",") if rdn.strip().upper().startswith("DC=")]
    return ".".join(parts).lower()


def _user_attributes(user: SeedUser, upn_suffix: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "sAMAccountName": user.sam_account_name,
        "userPrincipalName": f"{user.sam_account_name}@{upn_suffix}",
        "givenName": user.given_name,
        "sn": user.surname,
        "displayName": user.display_name,
        "userAccountControl": str(UAC_DISABLED if user.disabled else UAC_ENABLED),
    }
    optional = {
        "mail": user.mail,
        "proxyAddresses": user.proxy_addresses,
        "userCertificate": user.user_certificate,
        "userSMIMECertificate": user.user_smime_certificate,
    }
    attributes.update({name: value for name, value in optional.items() if value})
    return attributes


def _user_dn(user: SeedUser, ou_dn: str) -> str:
    return f"CN={escape_rdn(user.display_name)},{ou_dn}"


def _add_user(conn: ldap3.Connection, ou_dn: str, user: SeedUser, upn_suffix: str) -> int:
    attributes = _user_attributes(user, upn_suffix)
    if conn.add(_user_dn(user, ou_dn), list(USER_CLASSES), attributes):
        return 1
    if conn.result["result"] == 68:  # entryAlreadyExists: loaded by an earlier run
        return 0
    raise PopulationLoadError(f"cannot add {user.sam_account_name}: {conn.result['description']}")
