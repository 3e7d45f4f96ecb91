"""Bulk loads (store.db.copy_rows): arrays arrive exactly as psycopg's own adaptation stores them."""

from __future__ import annotations

import psycopg
import pytest

from certsync.store.db import copy_rows, create_engine
from certsync_lab.postgres import EmbeddedPostgres

pytestmark = pytest.mark.integration

TEXTS = [
    [],
    [""],
    ["alice@example.com"],
    ["Ünïcödé@例え.jp", 'quote"and,comma{}', "back\\slash", " spaced ", "NULL"],
    [None, "after a null"],
]
BLOBS = [[], [b""], [b"\x00\xff" * 40, bytearray(b"\x30\x82"), memoryview(b"view")], [b"x", None]]


@pytest.fixture
def engine(embedded_pg: EmbeddedPostgres):
    dsn = embedded_pg.ensure_database("copy_check")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS arrays")
        conn.execute("CREATE TABLE arrays (n int, texts text[], blobs bytea[])")
    engine = create_engine(dsn)
    yield engine
    engine.dispose()


def _rows() -> list[tuple]:
    return [(i, TEXTS[i % len(TEXTS)], BLOBS[i % len(BLOBS)]) for i in range(20)]


def test_flat_arrays_load_as_psycopg_stores_them(engine) -> None:
    with engine.begin() as conn:
        assert copy_rows(conn, "COPY arrays (n, texts, blobs) FROM STDIN", _rows()) == 20
        raw = conn.connection.driver_connection
        # The oracle: the same values through psycopg's own list adaptation, in SQL.
        for n, texts, blobs in _rows():
            raw.execute("INSERT INTO arrays VALUES (%s, %s::text[], %s::bytea[])", (-n - 1, texts, blobs))
        got = raw.execute(
            "SELECT c.n, c.texts, c.blobs, c.texts IS NOT DISTINCT FROM i.texts AND c.blobs IS NOT DISTINCT FROM i.blobs"
            " FROM arrays c JOIN arrays i ON i.n = -c.n - 1 WHERE c.n >= 0 ORDER BY c.n"
        ).fetchall()
    assert len(got) == 20 and all(same for *_, same in got)
    for n, texts, blobs, _ in got:
        assert texts == TEXTS[n % len(TEXTS)]
        assert blobs == [None if b is None else bytes(b) for b in BLOBS[n % len(BLOBS)]]


@pytest.mark.parametrize(
    ("texts", "blobs"),
    [([["nested"]], []), ([1], []), ([], [[b"nested"]]), ([], ["text, not bytes"])],
)
def test_arrays_of_other_shapes_are_refused_by_name(engine, texts, blobs) -> None:
    with engine.begin() as conn, pytest.raises(TypeError, match="flat sequence"):
        copy_rows(conn, "COPY arrays (n, texts, blobs) FROM STDIN", [(1, texts, blobs)])
