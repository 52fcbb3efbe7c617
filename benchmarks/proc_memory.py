"""Resident-memory probes of this process (Linux /proc), shared by the benchmark scripts."""

from __future__ import annotations


def rss_kib(field: str) -> int | None:
    """VmRSS / VmHWM of this process in KiB (None where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
