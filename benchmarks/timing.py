"""One timing helper for every benchmark: median milliseconds, copy bandwidth, a table,
and the provenance lines every results file starts with.

GPU: :func:`sample` as ``triton.testing.do_bench`` times (CUDA events, L2 flushed between
calls, a warm-up, as many calls as fit ``rep_ms``) but never fewer than
:data:`MIN_RUNS` timed calls: ``do_bench`` times a call slower than ``rep_ms`` once or
twice. CPU (``--smoke`` runs in the Triton interpreter): a host clock, :data:`CPU_RUNS`
calls after one warm-up, only to exercise code paths. :func:`timed` returns the median as
a float that also carries the run count and the spread (:class:`Ms`), which
:class:`Table` prints.
"""

from __future__ import annotations

import datetime
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MIN_RUNS = 10  # timed calls at least, on a GPU, whatever rep_ms allows
CPU_RUNS = 3  # the interpreter's (code paths only: its calls take seconds)
L2_FLUSH_BYTES = 256 << 20  # do_bench's: written between calls so no input stays in L2


class Ms(float):
    """Milliseconds (the median of ``runs`` timed calls) with ``runs`` and ``iqr`` (the
    interquartile range of the calls, ms; 0 for fewer than 2 calls). Arithmetic on it
    gives plain floats."""

    runs: int
    iqr: float

    def __new__(cls, times: list[float]) -> Ms:
        if not times:
            raise ValueError("no timed call")
        out = super().__new__(cls, statistics.median(times))
        out.runs = len(times)
        q = statistics.quantiles(times, n=4) if len(times) > 1 else (0.0, 0.0, 0.0)
        out.iqr = q[2] - q[0]
        return out

    def spread(self) -> str:
        """The interquartile range as a share of the median (``""`` when unknown)."""
        return f"{self.iqr / self:.1%}" if self > 0 and self.runs > 1 else ""


class _HostEvent:
    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: _HostEvent) -> float:
        return (end.t - self.t) * 1e3


class HostClock:
    """:func:`sample`'s clock on the CPU: ``perf_counter`` events, nothing to flush."""

    def event(self) -> _HostEvent:
        return _HostEvent()

    def synchronize(self) -> None:
        pass

    def clear_cache(self) -> None:
        pass


class CudaClock:
    """:func:`sample`'s clock on a GPU: CUDA events, and do_bench's L2 flush (a 256 MB
    buffer zeroed before each timed call)."""

    def __init__(self) -> None:
        self.cache = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def event(self):
        return torch.cuda.Event(enable_timing=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def clear_cache(self) -> None:
        self.cache.zero_()


def sample(
    fn, clock, rep_ms: float, min_runs: int, warmup_ms: float = 25.0, estimate_runs: int = 5
) -> list[float]:
    """Milliseconds of each timed call of ``fn``: one untimed call; with ``estimate_runs``
    a runtime estimate over that many calls (cache cleared before each), then warm-up
    calls for ``warmup_ms`` (at least one) and ``rep_ms / estimate`` timed calls, but
    ``min_runs`` at least (do_bench's loop, with that floor); without, ``min_runs`` timed
    calls. The cache is cleared before each timed call."""
    if min_runs < 1:
        raise ValueError(f"min_runs must be >= 1, got {min_runs}")
    fn()
    clock.synchronize()
    n_warmup, n_repeat = 0, min_runs
    if estimate_runs:
        start, end = clock.event(), clock.event()
        start.record()
        for _ in range(estimate_runs):
            clock.clear_cache()
            fn()
        end.record()
        clock.synchronize()
        estimate = max(start.elapsed_time(end) / estimate_runs, 1e-6)
        n_warmup = max(1, int(warmup_ms / estimate))
        n_repeat = max(min_runs, int(rep_ms / estimate))
    for _ in range(n_warmup):
        fn()
    starts = [clock.event() for _ in range(n_repeat)]
    ends = [clock.event() for _ in range(n_repeat)]
    for s, e in zip(starts, ends, strict=True):
        clock.clear_cache()
        s.record()
        fn()
        e.record()
    clock.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def timed(fn, rep_ms: float = 100.0, min_runs: int | None = None) -> Ms:
    """Median milliseconds of ``fn()`` after a warm-up, with the run count and spread
    (:class:`Ms`): on a GPU over ``rep_ms`` of calls and :data:`MIN_RUNS` at least, on the
    CPU :data:`CPU_RUNS` calls (``min_runs`` overrides either floor)."""
    if torch.cuda.is_available():
        return Ms(sample(fn, CudaClock(), rep_ms, min_runs or MIN_RUNS))
    return Ms(sample(fn, HostClock(), rep_ms, min_runs or CPU_RUNS, estimate_runs=0))


def copy_bandwidth(device, nbytes: int) -> tuple[float, float]:
    """``(ms, TB/s)`` of a device-to-device copy of ``nbytes``, counting read + write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), rep_ms=200)
    return ms, 2 * nbytes / ms / 1e9


def runs_of(ms: float) -> tuple[str, str]:
    """``(runs, IQR as a share of the median)`` of a :func:`timed` result, as printed
    (empty for a plain float)."""
    if not isinstance(ms, Ms):
        return "", ""
    return str(ms.runs), ms.spread()


def runs_note(ms: float) -> str:
    """``"  (N runs, IQR x%)"`` after a printed :func:`timed` result ("" for a plain float)."""
    runs, iqr = runs_of(ms)
    return f"  ({runs} runs, IQR {iqr or '-'})" if runs else ""


class Table:
    """Printed as rows are added; ``markdown()`` at the end. TB/s and the fraction of the
    copy bandwidth measured in the same run are derived from the bytes given; the run
    count and interquartile range (share of the median) of each :func:`timed` result."""

    def __init__(self, copy_tbs: float | None = None):
        self.copy_tbs, self.rows = copy_tbs, []

    def add(self, name: str, ms: float, nbytes: float | None = None, note: str = "") -> float:
        tbs = nbytes / ms / 1e9 if nbytes else None
        self.rows.append((name, ms, nbytes, tbs, note))
        bw = f" {tbs:6.2f} TB/s" if tbs else ""
        print(f"  {name:<64} {ms:9.3f} ms{bw}{runs_note(ms)}  {note}", flush=True)
        return ms

    def markdown(self) -> str:
        out = [
            "| what | ms | runs | IQR | GB moved | TB/s | of copy BW | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, ms, nbytes, tbs, note in self.rows:
            gb = f"{nbytes / 1e9:.2f}" if nbytes else ""
            t = f"{tbs:.2f}" if tbs else ""
            frac = f"{tbs / self.copy_tbs:.0%}" if tbs and self.copy_tbs else ""
            runs, iqr = runs_of(ms)
            out.append(f"| {name} | {ms:.3f} | {runs} | {iqr} | {gb} | {t} | {frac} | {note} |")
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


REPO = Path(__file__).resolve().parents[1]  # the checkout these scripts belong to


def git_commit(repo: Path | str = REPO) -> str:
    """``git rev-parse --short HEAD`` of ``repo``; ``"unknown"`` outside a checkout (a
    copied tree, no git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def provenance(argv: list[str] | None = None) -> dict:
    """What made a result: the command line (``argv``, default ``sys.argv``: the script
    and its arguments), the checkout's commit, the date (UTC), the card and the torch and
    Triton versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if torch.cuda.is_available():
        card = card_name(torch.device("cuda"))
    else:
        card = "cpu (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu"
    return {
        "argv": shlex.join(sys.argv if argv is None else argv),
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "card": card,
        "torch": torch.__version__,
        "triton": triton_version,
    }


def provenance_header(argv: list[str] | None = None) -> str:
    """:func:`provenance` as the markdown lines a results file starts with."""
    p = provenance(argv)
    return (
        f"argv: `{p['argv']}`  \n"
        f"Commit {p['commit']}, {p['date']}; card: {p['card']}; torch {p['torch']}, "
        f"triton {p['triton']}.\n"
    )


def report(text: str, out: str | None) -> None:
    """Print the tables (the device call's reply shows the end) and write them to ``out``,
    both under the :func:`provenance_header` lines."""
    text = provenance_header() + "\n" + text
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
