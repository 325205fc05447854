"""How much of a trained value table's Adam second moment a row factor explains, and a
row × column factor (issue 16 item 3: which lighter second moment could keep the step).

Per-element Adam divides each value's update by ``sqrt(v_ij)``; the row-wise moment
(``optim.value_optimizer=sparse_adam_rowwise``) keeps one ``v`` per row, an Adafactor-style
factored moment a row factor times a column profile (``v_ij ≈ r_i · c_j``). Both read
fewer bytes; both change each value's step by ``sqrt(v_approx / v)``. From a run's
checkpoint (a per-element ``exp_avg_sq``: ``sparse_adam`` or ``sparse_adam_bf16``) this
prints, per value table, over the rows ever touched (every element's ``v > 0``):

- the variance of ``log v``, and what is left of it after a row term (``a_i``) and after a
  row plus a column term (``a_i + b_j``): the share each approximation can explain;
- the mean ``|log sqrt(v_approx / v)|`` for the row-wise moment (``v_approx`` = the row's
  mean of ``v``) and the factored one (times the column's mean of ``v / row mean``,
  normalised to mean 1): how far each element's step is from per-element Adam's, as a
  log factor (0.69 = off by 2× on average);
- the column profile's range.

    python benchmarks/moment_structure.py runs/tiny-memory-plus/checkpoints/step_001000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def exp_avg_sq_tables(state: dict) -> dict[str, torch.Tensor]:
    """``{path: [N, D] exp_avg_sq}`` of every two-dimensional second moment in a saved
    optimizer state (``optimizer.pt``: ``{"values": {"state": {i: {...}}}, ...}``)."""
    found = {}

    def walk(node, path):
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, f"{path}/{key}")
        elif path.endswith("/exp_avg_sq") and torch.is_tensor(node) and node.dim() == 2:
            found[path] = node

    walk(state.get("values", {}), "values")
    return found


def structure(v: torch.Tensor) -> dict:
    """The numbers above for one ``[N, D]`` second moment (its rows with every ``v > 0``)."""
    v = v.double()
    v = v[(v > 0).all(dim=1)]
    if v.shape[0] < 2:
        raise ValueError(f"fewer than two touched rows ({v.shape[0]}): nothing to factor")
    lv = v.log()
    row = lv.mean(dim=1, keepdim=True)
    col = (lv - row).mean(dim=0, keepdim=True)
    row_mean = v.mean(dim=1, keepdim=True)
    profile = (v / row_mean).mean(dim=0, keepdim=True)
    profile = profile / profile.mean()

    def step_error(approx):
        return (0.5 * (approx / v).log()).abs().mean().item()

    return {
        "rows": v.shape[0],
        "log_var": lv.var().item(),
        "log_var_after_row": (lv - row).var().item(),
        "log_var_after_row_col": (lv - row - col).var().item(),
        "step_error_rowwise": step_error(row_mean),
        "step_error_factored": step_error(row_mean * profile),
        "profile_min": profile.min().item(),
        "profile_max": profile.max().item(),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", type=Path, help="a run's checkpoint directory")
    a = p.parse_args(argv)
    f = a.checkpoint / "optimizer.pt"
    if not f.is_file():
        raise SystemExit(f"error: no optimizer.pt in {a.checkpoint}")
    tables = exp_avg_sq_tables(torch.load(f, map_location="cpu", weights_only=True))
    if not tables:
        raise SystemExit(
            f"error: {f} holds no per-element value second moment (a run with "
            f"optim.value_optimizer=sparse_adam or sparse_adam_bf16)"
        )
    for path, v in tables.items():
        s = structure(v)
        print(
            f"{path} {tuple(v.shape)}, {s['rows']:,} rows touched: var(log v) "
            f"{s['log_var']:.3f}, {s['log_var_after_row']:.3f} after a row term, "
            f"{s['log_var_after_row_col']:.3f} after row + column; mean |log step ratio| "
            f"row-wise {s['step_error_rowwise']:.3f}, factored {s['step_error_factored']:.3f}; "
            f"column profile {s['profile_min']:.3f}-{s['profile_max']:.3f}"
        )


if __name__ == "__main__":
    main()
