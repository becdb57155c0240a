"""This process's id, known without a system call.

Several steps of every request ask "am I still the process that opened this?" (a socket, a log file,
a LaunchDarkly client) so a forked gunicorn worker never shares its parent's. ``os.getpid()`` is a
system call each time (glibc no longer caches it), and on a virtual machine a system call also costs
the cache and TLB state the request's own code then runs without (bench/RESULTS.md). The pid is
read once and again in every child right after a fork.
"""

from __future__ import annotations

import os

_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def pid() -> int:
    """``os.getpid()``, cached and refreshed after a fork."""
    return _pid
