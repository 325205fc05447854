"""One timing helper for every benchmark: median milliseconds, copy bandwidth, a table.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, median). CPU
(``--smoke`` runs in the Triton interpreter): a host clock, only to exercise code paths.
"""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, rep_ms: float = 100.0) -> float:
    """Median milliseconds of ``fn()`` after a warm-up."""
    if torch.cuda.is_available():
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, nbytes: int) -> tuple[float, float]:
    """``(ms, TB/s)`` of a device-to-device copy of ``nbytes``, counting read + write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), rep_ms=200)
    return ms, 2 * nbytes / ms / 1e9


class Table:
    """Printed as rows are added; ``markdown()`` at the end. TB/s and the fraction of the
    copy bandwidth measured in the same run are derived from the bytes given."""

    def __init__(self, copy_tbs: float | None = None):
        self.copy_tbs, self.rows = copy_tbs, []

    def add(self, name: str, ms: float, nbytes: float | None = None, note: str = "") -> float:
        tbs = nbytes / ms / 1e9 if nbytes else None
        self.rows.append((name, ms, nbytes, tbs, note))
        bw = f" {tbs:6.2f} TB/s" if tbs else ""
        print(f"  {name:<64} {ms:9.3f} ms{bw}  {note}", flush=True)
        return ms

    def markdown(self) -> str:
        out = ["| what | ms | GB moved | TB/s | of copy BW | note |", "|---|---|---|---|---|---|"]
        for name, ms, nbytes, tbs, note in self.rows:
            gb = f"{nbytes / 1e9:.2f}" if nbytes else ""
            t = f"{tbs:.2f}" if tbs else ""
            frac = f"{tbs / self.copy_tbs:.0%}" if tbs and self.copy_tbs else ""
            out.append(f"| {name} | {ms:.3f} | {gb} | {t} | {frac} | {note} |")
        return "\n".join(out)


def bandwidth_table() -> tuple[torch.device, str, Table]:
    """``(device, card name, table)`` of a bandwidth benchmark: the table's first row is
    the device's copy bandwidth (4 GiB on a GPU, 1 MiB in the interpreter), measured in
    the same run, and its TB/s column is read as a fraction of it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = card_name(device)
    nbytes = 4 << 30 if device.type == "cuda" else 1 << 20
    copy_ms, copy_tbs = copy_bandwidth(device, nbytes)
    print(f"{card}: copy {copy_tbs:.2f} TB/s (read + write)", flush=True)
    table = Table(copy_tbs)
    table.add("device-to-device copy (read + write)", copy_ms, 2 * nbytes)
    return device, card, table


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)"


def report(text: str, out: str | None) -> None:
    """Print the tables (the device call's reply shows the end) and write them to ``out``."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
