"""This process's memory as Linux counts it, for the benchmarks that measure a step's growth."""

from __future__ import annotations


def status_mb(field: str) -> float:
    """A /proc/self/status field (VmRSS, VmHWM, ...) in MB; NaN where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """VmHWM := VmRSS, so a later VmHWM is the peak since now; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
