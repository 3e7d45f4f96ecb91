"""Python helpers for the /_emulator/ control plane of a running emulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import requests

from certsync_lab.emulator.controls import EmulatorConfig

TIMEOUT_S = 10.0


class EmulatorControl:
    def __init__(self, *, url: str, ca_file: Path) -> None:
        self.url = url.rstrip("/")
        self._session = requests.Session()
        # Environment CA bundles would override verify=; the emulator is trusted via its CA only.
        self._session.trust_env = False
        self._session.verify = str(ca_file)

    def close(self) -> None:
        self._session.close()

    def _call(self, method: str, path: str, payload: Any = None) -> Any:
        response = self._session.request(
            method, f"{self.url}/_emulator/{path}", json=payload, timeout=TIMEOUT_S
        )
        if response.status_code >= 400:
            raise ValueError(f"emulator refused {method} {path}: {response.text}")
        return response.json()

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "health"))

    def state(self) -> dict[str, Any]:
        return dict(self._call("GET", "state"))

    def requests(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "requests")["requests"])

    def clear_requests(self) -> int:
        return int(self._call("DELETE", "requests")["cleared"])

    def config(self) -> dict[str, Any]:
        return dict(self._call("GET", "config"))

    def set_config(self, **changes: Any) -> dict[str, Any]:
        """Partial update, e.g. set_config(rate_per_s=2, burst=2, faults=[...])."""
        return dict(self._call("PUT", "config", changes))

    def reset_config(self) -> dict[str, Any]:
        return self.set_config(**EmulatorConfig().as_dict())

    def inject_fault(
        self,
        *,
        cmdlet: str,
        count: int,
        status: int = 503,
        exception_type: str | None = None,
        text: str | None = None,
        retry_after: int | None = None,
    ) -> dict[str, Any]:
        faults = list(self.config()["faults"])
        faults.append(
            {
                "cmdlet": cmdlet,
                "count": count,
                "status": status,
                "exception_type": exception_type,
                "text": text,
                "retry_after": retry_after,
            }
        )
        return self.set_config(faults=faults)

    def hold(
        self,
        *,
        cmdlet: str,
        count: int,
        before_ms: float = 0.0,
        after_ms: float = 0.0,
        then_status: int | None = None,
    ) -> dict[str, Any]:
        """Hold the next `count` calls of `cmdlet` before and/or after the cmdlet runs; with
        `then_status`, refuse each held call after `before_ms` instead of running it."""
        holds = list(self.config()["holds"])
        rule = {"cmdlet": cmdlet, "count": count, "before_ms": before_ms, "after_ms": after_ms}
        holds.append({**rule, "then_status": then_status})
        return self.set_config(holds=holds)
