"""Joining another process's network namespace from a thread of this one, so that a test's clients
(HTTP, psycopg, LDAP) reach servers that listen inside a namespace the test made."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000


def join_netns(pid: int) -> None:
    """Move the calling thread into the network namespace of `pid` (setns affects one thread only)."""
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into the network namespace of pid {pid} failed")
    finally:
        os.close(fd)
