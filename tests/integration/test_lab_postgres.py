"""The embedded PostgreSQL: starts, answers, keeps its data and reuses a running server."""

from __future__ import annotations

import os
from pathlib import Path

import psycopg
import pytest

from certsync_lab.postgres import EmbeddedPostgres, EmbeddedPostgresError, _unprivileged_prefix

pytestmark = pytest.mark.integration


def test_session_server_answers_and_creates_databases(embedded_pg: EmbeddedPostgres) -> None:
    assert embedded_pg.dsn.startswith("postgresql://postgres@127.0.0.1:")
    with psycopg.connect(embedded_pg.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    dsn = embedded_pg.ensure_database("lab_check")
    assert embedded_pg.ensure_database("lab_check") == dsn
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("lab_check",)


def test_restart_keeps_data_and_port(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    with EmbeddedPostgres(data_dir=data_dir) as first:
        assert first.started_here
        port = first.port
        dsn = first.ensure_database("keep")
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TABLE t (v int)")
            conn.execute("INSERT INTO t VALUES (42)")
    assert not (data_dir / "postmaster.pid").exists()

    with EmbeddedPostgres(data_dir=data_dir) as second:
        assert second.started_here
        assert second.port == port
        with psycopg.connect(second.dsn_for("keep")) as conn:
            assert conn.execute("SELECT v FROM t").fetchone() == (42,)


def test_second_handle_reuses_running_server_and_leaves_it_up(tmp_path: Path) -> None:
    owner = EmbeddedPostgres(data_dir=tmp_path / "pg").start()
    port = owner.port
    try:
        with EmbeddedPostgres(data_dir=tmp_path / "pg") as guest:
            assert not guest.started_here
            assert guest.port == owner.port
        # The guest's exit must not have stopped the owner's server.
        with psycopg.connect(owner.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        owner.stop()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=2)


def test_explicit_port_is_used(tmp_path: Path) -> None:
    # A port that just served (and was released by) another cluster is known to be usable.
    with EmbeddedPostgres(data_dir=tmp_path / "pg") as pg:
        free = pg.port
    with EmbeddedPostgres(data_dir=tmp_path / "other", port=free) as other:
        assert other.port == free
        assert other.dsn.endswith(f":{free}/postgres")


def test_settings_reach_the_server_it_starts(tmp_path: Path) -> None:
    # A value with a space and a quote must arrive whole through pg_ctl's shell.
    settings = {"shared_buffers": "48MB", "application_name": "lab's server"}
    with EmbeddedPostgres(data_dir=tmp_path / "pg", settings=settings) as pg:
        with psycopg.connect(pg.dsn) as conn:
            shown = {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in settings}
        assert shown == settings


def test_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "notes.txt").write_text("not a cluster")
    with pytest.raises(EmbeddedPostgresError, match="not empty"):
        EmbeddedPostgres(data_dir=tmp_path / "pg").start()


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the user namespace is used only by root")


@as_root
def test_without_user_namespaces_root_gets_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare to be found
    _unprivileged_prefix.cache_clear()
    try:
        with pytest.raises(EmbeddedPostgresError, match=r"refuses to run as root.*user namespace"):
            EmbeddedPostgres(data_dir=tmp_path / "pg").start()
    finally:
        _unprivileged_prefix.cache_clear()


@as_root
def test_a_cluster_of_another_account_is_refused_by_name(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    with EmbeddedPostgres(data_dir=data_dir):
        pass
    # What an older lab left: a cluster owned by the account it ran the server as.
    os.chown(data_dir, 65534, 65534)
    with pytest.raises(EmbeddedPostgresError, match=f"belongs to uid 65534, not to uid {os.geteuid()}"):
        EmbeddedPostgres(data_dir=data_dir).start()
