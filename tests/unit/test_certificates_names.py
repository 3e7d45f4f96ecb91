"""The DER subject reader gives exactly cryptography's RFC 4514 text and RDN count, or steps aside."""

from __future__ import annotations

import warnings

import pytest
from cryptography import x509
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from certsync.certificates import names
from certsync.certificates.facts import describe, extension_map
from certsync.certificates.names import issuer_der, issuer_from_der, subject_from_der
from certsync_lab.pki import Pki

KNOWN_OIDS = ["550403", "550405", "550406", "550407", "55040a", "55040b", "55042a",
              "0992268993f22c640119", "2a864886f70d010901"]  # fmt: skip
OTHER_OIDS = ["550441", "2b0601040182371402", "5504"]
TAGS = [0x0C, 0x13, 0x16, 0x14, 0x1E, 0x1C, 0x12, 0x03, 0x04]
ALPHABET = st.sampled_from(list("aZ09 -.@#,+;<>\\\"'=()/?:\0é€\U0001f600"))
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _enc(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes([tag, size]) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(raw)]) + raw + content


def _elements(der: bytes) -> list[bytes]:
    """The encoded children of the outermost element."""
    first = der[1]
    pos = 2 + (first & 0x7F if first & 0x80 else 0)
    out = []
    while pos < len(der):
        first = der[pos + 1]
        count = first & 0x7F if first & 0x80 else 0
        size = int.from_bytes(der[pos + 2 : pos + 2 + count], "big") if count else first
        end = pos + 2 + count + size
        out.append(der[pos:end])
        pos = end
    return out


@pytest.fixture(scope="module")
def template() -> tuple[bytes, list[bytes], list[bytes]]:
    der = Pki(algorithm="ec", seed=5).issue(email="names@example.org")
    outer = _elements(der)
    return der, outer, _elements(outer[0])


def _with_subject(template: tuple[bytes, list[bytes], list[bytes]], subject: bytes) -> bytes:
    return _with_name(template, 5, subject)


def _with_name(template: tuple[bytes, list[bytes], list[bytes]], index: int, name: bytes) -> bytes:
    """The template with the issuer (index 3) or subject (5) replaced: version, serial, signature,
    issuer, validity, subject, ..."""
    _, outer, tbs = template
    fields = [*tbs[:index], name, *tbs[index + 1 :]]
    return _enc(0x30, _enc(0x30, b"".join(fields)) + b"".join(outer[1:]))


def _value(tag: int, text: str, raw: bytes | None) -> bytes:
    if raw is not None:
        return raw
    if tag == 0x1E:
        return text.encode("utf-16-be")
    if tag == 0x1C:
        return text.encode("utf-32-be")
    return text.encode("utf-8")


ATTRIBUTE = st.tuples(
    st.sampled_from(KNOWN_OIDS * 3 + OTHER_OIDS),
    st.sampled_from([0x0C, 0x13, 0x16] * 3 + TAGS),
    st.text(ALPHABET, max_size=70),
    st.one_of(st.none(), st.none(), st.binary(max_size=8)),
)
NAMES = st.lists(st.lists(ATTRIBUTE, min_size=1, max_size=2), max_size=4)
PRINTABLE = "AZaz09 '()+,-./:=?"
ASCII = PRINTABLE + '@#"\\;<>\0_'
PLAUSIBLE = st.one_of(
    st.tuples(st.sampled_from(["550403", "55040a", "55040b", "550407"]), st.just(0x0C),
              st.text(ALPHABET, min_size=1, max_size=20), st.none()),
    st.tuples(st.sampled_from(["550403", "550405", "55040a"]), st.just(0x13),
              st.text(st.sampled_from(PRINTABLE), min_size=1, max_size=20), st.none()),
    st.tuples(st.sampled_from(["2a864886f70d010901", "0992268993f22c640119"]), st.just(0x16),
              st.text(st.sampled_from(ASCII), min_size=1, max_size=20), st.none()),
    st.tuples(st.just("550406"), st.just(0x13), st.text(st.sampled_from("ADEZ"), min_size=2, max_size=2),
              st.none()),
)  # fmt: skip


def _name_der(rdns: list[list[tuple[str, int, str, bytes | None]]]) -> bytes:
    sets = []
    for rdn in rdns:
        pairs = [
            _enc(0x06, bytes.fromhex(oid)) + _enc(tag, _value(tag, text, raw)) for oid, tag, text, raw in rdn
        ]
        sets.append(_enc(0x31, b"".join(sorted(_enc(0x30, p) for p in pairs))))
    return _enc(0x30, b"".join(sets))


def _cryptography_view(der: bytes) -> tuple[str, int] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # out-of-range lengths warn; the fast reader skips them
            subject = x509.load_der_x509_certificate(der).subject
            return subject.rfc4514_string(), len(subject.rdns)
    except Exception:  # cryptography cannot read this name; the fast reader must not either
        return None


def _cryptography_issuer(der: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return x509.load_der_x509_certificate(der).issuer.rfc4514_string()
    except Exception:  # cryptography cannot read this name; the fast reader must not either
        return None


@SETTINGS
@given(rdns=st.lists(st.lists(PLAUSIBLE, min_size=1, max_size=1), max_size=5))
def test_plausible_names_are_read_fast_and_identically(template, rdns):
    name = _name_der(rdns)
    der = _with_subject(template, name)
    fast = subject_from_der(der)
    assert fast is not None
    assert (fast.text, fast.rdn_count) == _cryptography_view(der)
    as_issuer = _with_name(template, 3, name)
    assert issuer_from_der(as_issuer) == _cryptography_issuer(as_issuer) == fast.text
    assert issuer_der(as_issuer) == name


@SETTINGS
@given(rdns=NAMES)
def test_hostile_names_are_read_identically_or_not_at_all(template, rdns):
    der = _with_subject(template, _name_der(rdns))
    try:
        x509.load_der_x509_certificate(der)
    except ValueError:
        assume(False)  # the certificate itself is unreadable; validation never gets this far
    fast = subject_from_der(der)
    if fast is not None:
        assert (fast.text, fast.rdn_count) == _cryptography_view(der)
    as_issuer = _with_name(template, 3, _name_der(rdns))
    if (issuer := issuer_from_der(as_issuer)) is not None:
        assert issuer == _cryptography_issuer(as_issuer)


@pytest.mark.parametrize(
    ("rdns", "text"),
    [
        (
            [[("550403", 0x0C, "Ann Smith", None)], [("55040a", 0x13, "Example", None)]],
            "O=Example,CN=Ann Smith",
        ),
        ([[("550403", 0x0C, "a,b+c", None)]], "CN=a\\,b\\+c"),
        ([[("2a864886f70d010901", 0x16, "ann@example.org", None)]], "1.2.840.113549.1.9.1=ann@example.org"),
        ([[("550406", 0x13, "DE", None)], [("550403", 0x0C, " #x ", None)]], "CN=\\ #x\\ ,C=DE"),
        ([], ""),
    ],
)
def test_common_names_take_the_fast_path(template, rdns, text):
    der = _with_subject(template, _name_der(rdns))
    fast = subject_from_der(der)
    assert fast is not None
    assert (fast.text, fast.rdn_count) == (text, len(rdns)) == _cryptography_view(der)


@pytest.mark.parametrize(
    "rdns",
    [
        [[("550403", 0x0C, "a", None), ("55040a", 0x0C, "b", None)]],  # multi-valued RDN
        [[("550403", 0x14, "T61", None)]],  # TeletexString
        [[("550403", 0x1E, "bmp", None)]],  # BMPString
        [[("550403", 0x0C, "x" * 65, None)]],  # over cryptography's CN limit
        [[("550406", 0x13, "DEU", None)]],  # not a two-letter country
        [[("550403", 0x13, "a@b", None)]],  # '@' is not a PrintableString character
        [[("550441", 0x0C, "pseudonym", None)]],  # an attribute outside the table
        [[("550403", 0x0C, "", b"\xff")]],  # not UTF-8
    ],
)
def test_unusual_names_are_left_to_cryptography(template, rdns):
    assert subject_from_der(_with_subject(template, _name_der(rdns))) is None
    assert issuer_from_der(_with_name(template, 3, _name_der(rdns))) is None


def test_describe_is_the_same_with_or_without_der(template):
    der = template[0]
    cert = x509.load_der_x509_certificate(der)
    slow = describe(cert, cert.serial_number, extension_map(cert))
    fast = describe(cert, cert.serial_number, extension_map(cert), der=der)
    assert fast.subject_rdns == len(cert.subject.rdns)
    assert fast._replace(subject_rdns=None) == slow


def test_truncated_der_is_left_to_cryptography(template):
    der = template[0]
    assert subject_from_der(der) is not None
    issuer = issuer_der(der)
    assert issuer is not None and issuer_from_der(der) is not None
    issuer_end = der.index(issuer) + len(issuer)
    for cut in (3, 20, 60, issuer_end - 1, len(der) // 3):
        assert subject_from_der(der[:cut]) is None
        # The issuer comes before the subject: a cut after it still leaves it whole.
        if cut < issuer_end:
            assert issuer_from_der(der[:cut]) is None and issuer_der(der[:cut]) is None


def test_each_rdn_encoding_is_formatted_once_and_the_cache_stays_bounded(template, monkeypatch):
    formatted = []

    def counting(rdn: bytes) -> str:
        formatted.append(rdn)
        return original(rdn)

    original = names._rdn_text
    monkeypatch.setattr(names, "_rdn_text", counting)
    monkeypatch.setattr(names, "RDN_CACHE_SIZE", 8)
    monkeypatch.setattr(names, "_rdn_texts", {})
    shared = [("55040a", 0x13, "Example", None)], [("550406", 0x13, "DE", None)]
    people = [
        _with_subject(template, _name_der([*shared, [("550403", 0x0C, f"User, {i}", None)]]))
        for i in range(20)
    ]
    for der in people[:2]:
        assert (subject_from_der(der).text, 3) == _cryptography_view(der)  # type: ignore[union-attr]
    assert len(formatted) == 4  # O and C once, each common name once
    assert issuer_from_der(people[0]) == _cryptography_issuer(people[0])
    for der in people:
        view = subject_from_der(der)
        assert view is not None and (view.text, view.rdn_count) == _cryptography_view(der)
        assert len(names._rdn_texts) <= 8
    again = subject_from_der(people[0])  # its common name was evicted with the others
    assert again is not None and (again.text, again.rdn_count) == _cryptography_view(people[0])
