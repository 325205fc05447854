"""The evaluation results as the printed table and the two headline lines."""

from __future__ import annotations

from memlayers.report import si


def format_results(r: dict) -> str:
    """The results as a readable table."""
    p = r["params"]
    lines = [
        f"eval of {r['run_dir']} at step {r['step']} ({si(r['tokens_trained'])} tokens, "
        f"{r['train_flops']:.3g} training FLOPs; dataset {r['dataset']})",
        f"  parameters  total {si(p['total'])}, non-embedding {si(p['non_embedding'])}, "
        f"active/token {si(p['active_per_token'])}, memory table {si(p['memory_table'])}",
    ]
    if "value_table" in r:
        t = r["value_table"]
        group = f", group {t['group']}" if t.get("group") else ""
        where = ", offloaded to host memory" if t.get("offloaded") else ""
        if t.get("offload_mode") == "zero-copy":
            where += " (zero-copy)"
        lines.append(f"  value table {t['format']}{group}: {t['bytes']:,} bytes{where}")
    pp = r["perplexity"]
    bpb = f", {pp['bits_per_byte']:.3f} bits/byte" if "bits_per_byte" in pp else ""
    lines.append(
        f"  perplexity  {pp['ppl']:.3f} on {pp['tokens']:,} {r['perplexity_split']} tokens "
        f"({pp['loss']:.4f} nats/token, {pp['bits_per_token']:.3f} bits/token{bpb})"
    )
    if r.get("qa"):
        w = max(12, *(len(n) for n in r["qa"]))
        lines.append(
            f"  {'QA set':<{w}}  {'n':>6}  {'EM':>6}  {'F1':>6}  {'NLL/tok':>8}  {'NLL/ans':>8}"
        )
        for name, s in r["qa"].items():
            rows = [(name, s)] + [(f"  {a}", v) for a, v in s.get("by_attribute", {}).items()]
            for label, v in rows:
                lines.append(
                    f"  {label:<{w}}  {v['n']:>6}  {100 * v['exact_match']:>5.1f}%  "
                    f"{100 * v['f1']:>5.1f}%  {v['answer_nll_per_token']:>8.3f}  "
                    f"{v['answer_nll']:>8.3f}"
                )
    if "knowledge" in r:
        k = r["knowledge"]
        lines.append(
            f"  knowledge   {k['bits']:,.0f} bits stored of {k['capacity']:,.0f} "
            f"({100 * k['fraction']:.1f}%): {k['bits_per_param']:.4f} /param, "
            f"{k['bits_per_non_embedding_param']:.4f} /non-embedding param, "
            f"{k['bits_per_active_param']:.4f} /active param, {k['bits_per_flop']:.3g} /FLOP"
        )
        lines.append(
            "              " + ", ".join(f"{a} {b:,.0f}" for a, b in k["by_attribute"].items())
        )
    if r.get("usage"):
        lines.append(
            f"  {'memory':<12}  {'rows used':>9}  {'KL(u)':>7}  {'Gini':>6}  (of log n = "
            f"{next(iter(r['usage'].values()))['kl_max']:.2f})"
        )
        for name, u in r["usage"].items():
            lines.append(
                f"  {name:<12}  {u['rows_used_pct']:>8.1f}%  {u['kl_uniform']:>7.3f}  "
                f"{u['gini']:>6.3f}"
            )
    return "\n".join(lines)


def headline(r: dict) -> str:
    """Two lines for the end of ``memlayers train``: QA accuracy and bits stored."""
    out = []
    for name, s in r.get("qa", {}).items():
        out.append(
            f"{name} QA: exact match {100 * s['exact_match']:.1f}% (F1 {100 * s['f1']:.1f}%) "
            f"on {s['n']} questions, answer NLL {s['answer_nll_per_token']:.3f} nats/token"
        )
    if "knowledge" in r:
        k = r["knowledge"]
        out.append(
            f"knowledge stored: {k['bits']:,.0f} bits of {k['capacity']:,.0f} "
            f"({100 * k['fraction']:.1f}%), {k['bits_per_active_param']:.4f} bits/active param"
        )
    return "\n".join(out)
