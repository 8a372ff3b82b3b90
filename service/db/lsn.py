"""WAL positions (LSNs) as ints, read from and written as PostgreSQL writes them ("16/B374D848")."""

from __future__ import annotations


def parse_lsn(text: str) -> int:
    """An LSN as PostgreSQL writes it as an int; ValueError for anything else."""
    high, slash, low = text.partition("/")
    if not (slash and 0 < len(high) <= 8 and 0 < len(low) <= 8):
        raise ValueError(f"not an LSN: {text!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(position: int) -> str:
    """`position` as PostgreSQL writes an LSN; ValueError outside 0 to 2**64 - 1."""
    if not 0 <= position < 1 << 64:
        raise ValueError(f"not an LSN: {position}")
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"
