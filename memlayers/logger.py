"""What a training run reports: progress bar, metrics.jsonl, TensorBoard, loss.png and
usage.png (memory models: rows used and Gini per memory layer, :mod:`memlayers.usage`).

Only the logging rank (rank 0) writes; on other ranks every method is a no-op.
TensorBoard and matplotlib are optional extras (``pip install memlayers[all]``): without
them the run still writes metrics.jsonl and says once what it skipped.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from memlayers.files import write_atomic


@dataclass
class LoggingArgs:
    every: int = 10  # steps between metrics.jsonl / TensorBoard records (and the last step)
    progress: bool = True  # tqdm progress bar
    tensorboard: bool = True  # events under <run_dir>/tb
    plot: bool = True  # <run_dir>/loss.png (and usage.png) at the end
    # usage/<layer>/... per log step: rows used, KL from uniform and Gini of each memory
    # layer's reads (memlayers.usage.TrainingUsage); models without memory layers log none
    usage: bool = True

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError(f"logging.every must be >= 1, got {self.every!r}")
        for name in ("progress", "tensorboard", "plot", "usage"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(
                    f"logging.{name} must be true or false, got {getattr(self, name)!r}"
                )


def pyplot(what: str, note=None):
    """``matplotlib.pyplot`` on the Agg backend (files only, no display), or None after
    ``note`` (default: print to stderr) says that ``what`` is not written and how to get it:
    matplotlib is an optional extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        msg = f"matplotlib is not installed: no {what} (pip install 'memlayers[plot]')"
        if note is None:
            print(msg, file=sys.stderr)
        else:
            note(msg)
        return None
    return plt


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl``; a last line cut short (the run was killed while
    writing it) is skipped with a note on stderr, a bad line before it is a ValueError
    naming the file and line."""
    text = Path(path).read_text()
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    out = []
    for i, line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != lines[-1][0]:
                raise ValueError(f"{path}: line {i} is not JSON") from None
            print(f"{path}: skipped its last line, cut short (line {i})", file=sys.stderr)
    return out


def rows_used_pct(record: dict) -> float | None:
    """The progress line's ``used=``: the shared table's rows read in the log window (all
    layers' reads of it: is the table as a whole read?), or without one the least-read
    layer's; None when the record has no usage statistics."""
    if "usage/shared_table/rows_used_pct" in record:
        return record["usage/shared_table/rows_used_pct"]
    used = [v for k, v in record.items() if k.startswith("usage/") and k.endswith("/rows_used_pct")]
    return min(used) if used else None


class RunLogger:
    def __init__(
        self, run_dir: Path, args: LoggingArgs, total_steps: int, start_step: int, enabled: bool
    ) -> None:
        self.run_dir, self.args, self.enabled = Path(run_dir), args, enabled
        self.total_steps = total_steps
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.tb = None
        self.bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops events a crashed run wrote after its last checkpoint.
                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
            except ImportError:
                self.message(
                    "tensorboard is not installed: no tb/ events (pip install tensorboard)"
                )
        if args.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Keep only records up to ``step`` (a resumed run rewrites what follows). A
        partial last line (a crash mid-write) is dropped; a bad line before it is an error
        naming the file and line."""
        if not self.metrics_path.exists():
            return
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keep = []
        for i, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if i == len(lines):
                    break
                raise ValueError(f"{self.metrics_path}:{i}: not a JSON record ({e})") from None
            if record.get("step", 0) <= step:
                keep.append(line)
        write_atomic(self.metrics_path, "".join(line + "\n" for line in keep))

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def _write(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            # The wall clock goes as each point's walltime: as a float32 scalar it was
            # off by up to 128 s (~1.8e9 s has 24 bits of mantissa).
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"], walltime=record.get("time"))

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` (a step with no record)."""
        if self.enabled and self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log_step(self, record: dict) -> None:
        """A log interval's record (means over its steps): bar, metrics.jsonl, TensorBoard."""
        if not self.enabled:
            return
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}", "tok_s": f"{record['tok_per_s']:,.0f}"}
            if "mfu" in record:
                post["mfu"] = f"{100 * record['mfu']:.1f}%"
            used = rows_used_pct(record)
            if used is not None:
                post["used"] = f"{used:.0f}%"
            self.bar.set_postfix(post, refresh=False)
        self.advance(record["step"])
        self._write({**record, "time": time.time()})

    def log_eval(self, record: dict) -> None:
        if self.enabled:
            self._write({**record, "time": time.time()})
            self.message(
                "step {step}: ".format(**record)
                + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.args.plot and self.metrics_path.exists():
            self.plot()
            self.plot_usage()

    def _pyplot(self, what: str):
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            self.message(f"matplotlib is not installed: no {what} (pip install matplotlib)")
            return None
        return plt

    def _records(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def plot(self) -> Path | None:
        """Train (and validation) loss against step, into ``loss.png``."""
        plt = self._pyplot("loss.png")
        if plt is None:
            return None
        records = self._records()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("loss", "val_loss"):
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key, marker="o" if key != "loss" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats / token)")
        ax.set_title(self.run_dir.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.run_dir / "loss.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def plot_usage(self) -> Path | None:
        """Rows used (in the log window, and ever: dashed) and Gini of the read counts
        against step, one line per memory layer and the shared table, into ``usage.png``
        (loss.png's companion); nothing for a run that logged no usage statistics."""
        records = [r for r in self._records() if any(k.startswith("usage/") for k in r)]
        if not records:
            return None
        plt = pyplot("usage.png", self.message)
        if plt is None:
            return None
        names = [k.split("/")[1] for r in records for k in r if k.startswith("usage/")]
        names = list(dict.fromkeys(names))  # block_<i>..., shared_table, in logged order
        fig, (used_ax, gini_ax) = plt.subplots(1, 2, figsize=(11, 4))
        for i, name in enumerate(names):
            color, wide = f"C{i}", 2.0 if name == "shared_table" else 1.2
            for ax, stat, style in (
                (used_ax, "rows_used_pct", "-"),
                (used_ax, "rows_ever_used_pct", "--"),
                (gini_ax, "gini_count", "-"),
            ):
                key = f"usage/{name}/{stat}"
                pts = [(r["step"], r[key]) for r in records if key in r]
                if pts:
                    label = name if style == "-" else None
                    ax.plot(*zip(*pts, strict=True), style, color=color, lw=wide, label=label)
        used_ax.set_ylabel("rows read (% of table; dashed: since step 1)")
        used_ax.set_ylim(0, 105)
        gini_ax.set_ylabel("Gini of read counts (0 = even)")
        gini_ax.set_ylim(0, 1)
        for ax in (used_ax, gini_ax):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        used_ax.legend()
        fig.suptitle(f"{self.run_dir.name}: memory usage per log window")
        fig.tight_layout()
        out = self.run_dir / "usage.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out
