"""The Lua scripts, as package data (``lua/*.lua``), with the constants both sides share."""

from __future__ import annotations

from functools import cache
from importlib import resources

from .records import BREAKER_BUCKETS, KILL_SHARE


@cache
def lua(*names: str) -> str:
    """The named files joined, after the constants the Python side also uses (records.py)."""
    header = f"local BUCKETS = {BREAKER_BUCKETS}\nlocal KILL_SHARE = {KILL_SHARE!r}\n"
    return header + "\n".join(resources.files(__package__).joinpath("lua", f"{n}.lua").read_text() for n in names)
