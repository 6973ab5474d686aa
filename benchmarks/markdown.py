"""The Markdown pieces every benchmark's README section is written with.

Tables and the formats of seconds, bytes and targets, shared so that the sections of
``benchmarks/README.md`` read alike; each benchmark module renders its own section with them
and :mod:`benchmarks.report` assembles the page.
"""

from __future__ import annotations

from typing import Any

from fedpeft.server.progress import format_bytes


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: ``header``, then one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    """Seconds as milliseconds below 10 s (``12.3 ms``), as seconds from there (``12.3 s``)."""
    return f"{seconds * 1e3:,.1f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def size(n: float) -> str:
    """Bytes in decimal units (``792 B``, ``25.4 kB``, ``1.2 MB``): the round lines' format."""
    return format_bytes(n)


def verdict(flag: Any) -> str:
    """A target's outcome as the JSON records it: true, false, or null when not measured."""
    return "not measured" if flag is None else "met" if flag else "missed"
