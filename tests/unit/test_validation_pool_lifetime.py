"""The validation pool's worker processes never outlive the process that started them: a task
killed with SIGKILL (timeout, OOM killer, an operator) runs no cleanup, so the workers must go by
themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from certsync_lab.pki import Pki

# Validates the same certificates over and over, long enough to be killed in the middle.
WORKLOAD = """
import sys
from datetime import datetime
from pathlib import Path
from certsync.certificates.parallel import validate_many
from certsync.certificates.trust import TrustSpec

home = Path(sys.argv[1])
spec = TrustSpec(anchors=home / "anchors.pem", intermediates=(home / "intermediates.pem",))
items = [("userCertificate", (home / f"leaf{i}.der").read_bytes()) for i in range(20)] * 20000
at = datetime.fromisoformat(sys.argv[2])
validate_many(items, trust=spec, at=at, processes=2, batch_size=200)
print("finished before it was killed")
"""


def _workers(parent: psutil.Process, deadline: float) -> list[psutil.Process]:
    """The pool's worker processes, once both are up."""
    while time.monotonic() < deadline:
        workers = [c for c in parent.children() if "spawn_main" in " ".join(c.cmdline())]
        if len(workers) == 2:
            return workers
        time.sleep(0.05)
    raise AssertionError(f"no pool workers appeared: {[c.cmdline() for c in parent.children()]}")


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _twenty_leaves(home: Path) -> Pki:
    """Trust files and 20 leaves under the names the task scripts read."""
    pki = Pki(algorithm="ec", seed=3)
    files = pki.write_trust_files(home)
    for i in range(20):
        (home / f"leaf{i}.der").write_bytes(pki.issue(email=f"u{i}@example.org"))
    os.replace(files.anchors, home / "anchors.pem")
    os.replace(files.intermediates, home / "intermediates.pem")
    return pki


def test_killing_the_task_process_leaves_no_worker_behind(tmp_path: Path) -> None:
    pki = _twenty_leaves(tmp_path)
    task = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, str(tmp_path), pki.now.isoformat()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        workers = _workers(psutil.Process(task.pid), time.monotonic() + 60)
        time.sleep(0.5)  # mid-batch
        assert task.poll() is None, task.communicate()
        os.kill(task.pid, signal.SIGKILL)
        task.wait(timeout=10)
        deadline = time.monotonic() + 10
        while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [w.pid for w in workers if not _gone(w)]
        assert alive == [], f"workers {alive} outlived their killed parent"
    finally:
        if task.poll() is None:
            task.kill()
            task.wait()


# As the Celery executor runs a task: a fork of a daemonic billiard pool process, which inherits its
# daemon flag and billiard's authkey type.
IN_A_DAEMON = """
if __name__ != "__main__":  # a worker that re-runs the parent's script (as `airflow` would) fails
    raise SystemExit("the worker re-ran the parent's script")
import billiard, os, sys
from datetime import datetime
from pathlib import Path
from certsync.certificates.parallel import validate_many
from certsync.certificates.trust import TrustSpec

def task(home, at):
    pid = os.fork()
    if pid == 0:
        spec = TrustSpec(anchors=home / "anchors.pem", intermediates=(home / "intermediates.pem",))
        items = [("userCertificate", (home / f"leaf{i}.der").read_bytes()) for i in range(20)]
        verdicts = validate_many(items, trust=spec, at=at, processes=2, batch_size=5)
        print("accepted", sum(v.ok for v in verdicts), flush=True)
        os._exit(0)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))

if __name__ == "__main__":
    args = (Path(sys.argv[1]), datetime.fromisoformat(sys.argv[2]))
    pool_process = billiard.get_context("fork").Process(target=task, args=args, daemon=True)
    pool_process.start()
    pool_process.join()
    sys.exit(pool_process.exitcode)
"""


def test_a_task_forked_from_a_daemonic_pool_process_validates_on_workers(tmp_path: Path) -> None:
    pki = _twenty_leaves(tmp_path)
    script = tmp_path / "in_a_daemon.py"
    script.write_text(IN_A_DAEMON)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), pki.now.isoformat()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accepted 20" in result.stdout
