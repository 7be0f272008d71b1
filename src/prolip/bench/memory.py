"""How much memory a block of work needed at its peak: the cost every bench record reports beside its seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class PeakMemory:
    """The memory a block needed at its peak beyond what was held when it started, in MB: on a GPU from the
    allocator's peak; on a CPU from the process's peak resident set (VmHWM, reset before the block; where it cannot
    be reset, the lifetime peak, said so). What the process held before (the backbone, cached features) is left out,
    so a small fit reads as small."""

    def __init__(self, device: Any):
        self.device = torch.device(device)
        self.mb: float | None = None
        self.measure = "none"
        self._start: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
            self.measure = "CUDA allocator peak above the start"
        else:
            reset = _reset_peak_rss()
            self._start = _current_rss_mb() if reset else 0.0
            self.measure = "process peak RSS above the start" if reset else "process lifetime peak RSS"
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else _peak_rss_mb()
        self.mb = None if peak is None or self._start is None else max(0.0, peak - self._start)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _current_rss_mb() -> float:
    return _status_mb("VmRSS") or 0.0


def _peak_rss_mb() -> float | None:
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
