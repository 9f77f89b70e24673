"""Byte sizes as people write them ('5GB', '500MB', '1024'; K, M, G are powers of 2) and as the memory plan prints them."""

from __future__ import annotations

UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30, "T": 2**40,
         "TB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB', '500M', '1024' (or an int) -> bytes; ValueError for anything else, or a size <= 0."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        number = str(text).strip().rstrip("KMGTBkmgtb ")
        unit = str(text).strip()[len(number):].strip().upper()
        try:
            size = int(float(number) * UNITS[unit])
        except (ValueError, KeyError):
            raise ValueError(f"not a size: {text!r} (examples: 500MB, 5GB)") from None
    if size <= 0:
        raise ValueError(f"must be positive, got {text!r} (examples: 500MB, 5GB)")
    return size


def format_size(size: int | float) -> str:
    """Bytes in the largest binary unit that keeps three digits or fewer, one decimal: 14483456000 -> '13.5 GiB',
    1048576000 -> '1.0 GiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale * 1000 / 1024:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"
