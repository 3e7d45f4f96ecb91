"""Start and stop the emulator as a child process (tests, the demo, the lab).

One emulator serves a home at a time: starting a home that an emulator already serves (found by
its endpoint.json) attaches to that one instead of launching a second.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from certsync_lab.emulator.control import EmulatorControl
from certsync_lab.emulator.server import ENDPOINT_FILE, read_endpoint

log = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


class EmulatorError(RuntimeError):
    """The emulator process failed to start or answer."""


class EmulatorProcess:
    def __init__(self, *, home: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.home = Path(home)
        self.port = port
        self.host = host
        self._process: subprocess.Popen[bytes] | None = None
        self._endpoint: dict[str, object] | None = None
        self._control: EmulatorControl | None = None
        self._started_here = False

    @property
    def url(self) -> str:
        return str(self._require_endpoint()["url"])

    @property
    def ca_file(self) -> Path:
        return Path(str(self._require_endpoint()["ca_file"]))

    @property
    def tenant_id(self) -> str:
        return str(self._require_endpoint()["tenant_id"])

    @property
    def control(self) -> EmulatorControl:
        if self._control is None:
            self._control = EmulatorControl(url=self.url, ca_file=self.ca_file)
        return self._control

    def _require_endpoint(self) -> dict[str, object]:
        if self._endpoint is None:
            raise EmulatorError("the emulator is not running")
        return self._endpoint

    @property
    def started_here(self) -> bool:
        """True when this object launched the emulator (False when it attached to a running one)."""
        return self._started_here

    def running(self) -> bool:
        """True when an emulator (this object's or another process's) serves this home."""
        return self._announced_pid() is not None

    def start(self) -> EmulatorProcess:
        if self._endpoint is not None:
            raise EmulatorError("the emulator is already running")
        if self._announced_pid() is not None:
            return self._attach()
        self._launch()
        self._started_here = True
        log.info("emulator started at %s (pid %s)", self.url, self._require_endpoint()["pid"])
        return self

    def _attach(self) -> EmulatorProcess:
        endpoint = read_endpoint(self.home)
        if endpoint is None:
            raise EmulatorError("the running emulator withdrew its endpoint; start again")
        if self.port and endpoint.get("port") != self.port:
            log.warning("the running emulator listens on %s, not on port %s", endpoint["url"], self.port)
        self._endpoint = endpoint
        self.control.health()
        log.info("attached to the emulator already serving %s at %s", self.home, self.url)
        return self

    def _launch(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / ENDPOINT_FILE).unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "certsync_lab.emulator",
            "serve",
            "--home",
            str(self.home),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        log_file = open(self.home / "emulator.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            # Its own session, like the lab's other servers: it outlives the `certsync-lab up` that
            # launched it and a hangup of that terminal.
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log_file.close()
        self._endpoint = self._wait_for_endpoint()
        self.control.health()

    def _wait_for_endpoint(self) -> dict[str, object]:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmulatorError(
                    f"emulator exited with {self._process.returncode}; see emulator.log in its home"
                )
            endpoint = read_endpoint(self.home)
            if endpoint is not None and endpoint.get("pid") == self._process.pid:
                return endpoint
            time.sleep(0.05)
        self.stop()
        raise EmulatorError("emulator did not start listening in time")

    def stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        process, self._process = self._process, None
        self._endpoint = None
        self._started_here = False
        if process is None:
            self._stop_announced()
            return
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _stop_announced(self) -> None:
        """Stop an emulator another process started for this home (found by its endpoint file)."""
        pid = self._announced_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _announced_pid(self) -> int | None:
        """The pid in this home's endpoint file when that process is a live emulator."""
        pid = int((read_endpoint(self.home) or {}).get("pid") or 0)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if pid else b""
        except OSError:
            return None
        # Started as `python -m certsync_lab.emulator`, `exchange-emulator` or `certsync-lab emulator`;
        # anything else is a stale file whose pid was reused.
        return pid if b"emulator" in cmdline and b"serve" in cmdline else None

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # An emulator this object only attached to belongs to whoever started it: leave it up.
        if self._started_here:
            self.stop()
        elif self._control is not None:
            self._control.close()
            self._control = None
