"""The canonical encoding of audit rows: hostile strings cannot make two different rows encode
alike, and every signature is bound to its row, its place and its key."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from certsync.audit import encoding
from certsync.audit.checkpoints import CHECKPOINT, CUT, VERIFIED, Checkpoint, CheckpointError, sign
from certsync.audit.signing import SigningKey, parse_public_keys, verifies

TEXT_FIELDS = [name for name, kind in encoding.ROW_FIELDS if kind == encoding.TEXT]
AT = datetime(2026, 6, 1, 12, 0, 0, 123456, tzinfo=UTC)
HOSTILE = st.one_of(
    st.text(),
    st.sampled_from(['", "', "\\", "\x00", "\n", "]", '"]', "T\x00\x00\x00\x01", "null", "I", "N"]),
)


def _row(**values: object) -> dict:
    base = {
        "seq": 7,
        "at": AT,
        "run_id": 1,
        "object_guid": uuid.UUID(int=5),
        "user_certificate": [b"\x01" * 32],
        "user_smime_certificate": [],
        "prev_hash": b"\x02" * 32,
        "key_id": "ed25519:0011223344556677",
    }
    return {**base, **values}


@settings(max_examples=400)
@given(first=st.sampled_from(TEXT_FIELDS), a=HOSTILE, b=HOSTILE, c=HOSTILE, d=HOSTILE)
def test_different_texts_never_encode_alike(first: str, a: str, b: str, c: str, d: str) -> None:
    """Moving characters between a field and the next one (or from NULL to empty) changes the bytes."""
    second = TEXT_FIELDS[(TEXT_FIELDS.index(first) + 1) % len(TEXT_FIELDS)]
    one, other = _row(**{first: a, second: b}), _row(**{first: c, second: d})
    assert (encoding.encode_row(one) == encoding.encode_row(other)) == ((a, b) == (c, d))


@given(
    values=st.lists(st.binary(max_size=40), max_size=4), other=st.lists(st.binary(max_size=40), max_size=4)
)
def test_lists_of_bytes_are_unambiguous(values: list[bytes], other: list[bytes]) -> None:
    same = encoding.encode_row(_row(user_certificate=values)) == encoding.encode_row(
        _row(user_certificate=other)
    )
    assert same == (values == other)


def test_null_empty_and_missing_differ_and_types_are_checked() -> None:
    assert encoding.encode_row(_row(detail=None)) != encoding.encode_row(_row(detail=""))
    assert encoding.encode_row(_row(user_smime_certificate=None)) != encoding.encode_row(_row())
    for bad in ({"seq": "7"}, {"seq": True}, {"at": AT.replace(tzinfo=None)}, {"detail": b"x"}):
        try:
            encoding.encode_row(_row(**bad))
        except encoding.EncodingError:
            continue
        raise AssertionError(f"{bad} was encoded")


def test_the_hash_binds_position_predecessor_key_and_time() -> None:
    digest = encoding.row_hash(_row())
    for change in ({"seq": 8}, {"prev_hash": b"\x03" * 32}, {"key_id": "ed25519:ffffffffffffffff"},
                   {"at": AT.replace(microsecond=123457)}):  # fmt: skip
        assert encoding.row_hash(_row(**change)) != digest
    assert encoding.row_hash_at(_row(seq=9), range(1, 20))[encoding.row_hash(_row(seq=9))] == 9


def test_a_row_signature_is_not_a_checkpoint_or_endorsement_signature() -> None:
    key = SigningKey.generate()
    public = key.private.public_key()
    digest = encoding.row_hash(_row())
    signature = key.sign(encoding.signed_message(digest))
    assert verifies(public, signature, encoding.signed_message(digest))
    assert not verifies(public, signature, encoding.endorsement_message(digest))
    assert not verifies(public, signature, digest)


def test_checkpoints_verify_only_with_their_key_and_unaltered() -> None:
    key, other = SigningKey.generate(), SigningKey.generate()
    checkpoint = sign(seq=10, head=b"\x04" * 32, at=AT, key=key)
    keys = parse_public_keys(key.public_text(), where="test")
    checkpoint.check(keys, where="test")
    for bad, message in (
        (checkpoint, "not among the public keys"),
        (type(checkpoint)(**{**checkpoint.__dict__, "seq": 11}), "does not verify"),
    ):
        try:
            bad.check(
                parse_public_keys(other.public_text(), where="t") if bad is checkpoint else keys, where="t"
            )
        except CheckpointError as exc:
            assert message in str(exc)
        else:
            raise AssertionError("a bad checkpoint verified")


def test_legacy_text_escapes_like_postgres_jsonb() -> None:
    row = _row(
        dag_id='a"b\\c\n\t\x01é',
        airflow_run_id="r",
        recipient_id="x",
        primary_smtp="p",
        cmdlet="Set-Mailbox",
        action="add",
        attempt=1,
        outcome="accepted",
        http_status=None,
        error_code=None,
        detail=None,
        client_request_id=uuid.UUID(int=1),
        phase=None,
    )
    text = encoding.legacy_row_text(row)
    assert text.startswith('[7, "2026-06-01T12:00:00.123456Z", 1, "a\\"b\\\\c\\n\\t\\u0001é", "r", ')
    assert (
        '["' + "01" * 32 + '"], [], 1, "accepted", null, null, null, "00000000-0000-0000-0000-000000000001"]'
        in text
    )


def test_a_cut_signs_its_month_and_edges_and_is_no_checkpoint() -> None:
    key = SigningKey.generate()
    keys = {key.key_id: key.private.public_key()}
    at = datetime(2026, 12, 1, tzinfo=UTC)
    cut = sign(seq=9, head=b"\x01" * 32, at=at, key=key, kind=CUT, first_seq=4, first_prev=b"\x02" * 32,
               active_key=key.key_id, label="2026-11")  # fmt: skip
    cut.check(keys, where="cut")
    assert Checkpoint.from_json(cut.to_json(), where="json") == cut
    for changed in ({"label": "2026-10"}, {"first_seq": 1}, {"first_prev": b""}, {"active_key": "x"},
                    {"kind": CHECKPOINT}, {"kind": VERIFIED}):  # fmt: skip
        altered = replace(cut, **changed)
        with pytest.raises(CheckpointError, match="does not verify"):
            altered.check(keys, where="cut")
