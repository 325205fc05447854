"""The benchmark review's defects (benchmarks/timing.py, bench_row_adam, bench_memory_layer,
bench_embedding_bag, bench_parallel, profile_step), each with a test that fails without
its fix. They test what the scripts time, count and write: on the CPU their Triton paths
run in the interpreter; on a GPU machine the same calls run on the card (``DEV``)."""

import argparse
import json
import re
import sys
import types
import warnings

import pytest
import torch
from benchmark_scripts import load

from memlayers import MemoryValues, SparseValueAdam, get_preset
from memlayers.ops import embedding_bag
from memlayers.ops.read_copy import READ_COPY

NEVER_TAKEN = "never taken"
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the scripts' own pick


@pytest.fixture(scope="module")
def timing():
    return load("timing")


# --- timing.py: a minimum run count (finding 7), provenance (finding 12) -------------


class FakeClock:
    """:func:`timing.sample`'s clock on a fake time that only ``fn`` advances."""

    def __init__(self):
        self.now = 0.0

    def event(self):
        clock = self

        class Event:
            def record(self):
                self.t = clock.now

            def elapsed_time(self, end):
                return end.t - self.t

        return Event()

    def synchronize(self):
        pass

    def clear_cache(self):
        pass


def test_a_slow_function_is_timed_at_least_min_runs_times(timing):
    clock = FakeClock()
    calls = []

    def slow():  # 80 ms a call against a 100 ms budget: do_bench timed it once
        calls.append(1)
        clock.now += 80.0

    times = timing.sample(slow, clock, rep_ms=100, min_runs=timing.MIN_RUNS)
    assert len(times) >= timing.MIN_RUNS >= 10
    assert times == [80.0] * len(times)
    fast = FakeClock()

    def quick():  # 1 ms a call: the budget allows 100
        fast.now += 1.0

    assert len(timing.sample(quick, fast, rep_ms=100, min_runs=timing.MIN_RUNS)) == 100


def test_timed_reports_its_run_count_and_spread_and_the_table_prints_them(timing, capsys):
    ms = timing.timed(lambda: sum(range(1000)))
    assert isinstance(ms, float) and ms.iqr >= 0
    if DEV.type == "cuda":  # CUDA events: at least MIN_RUNS, more where the budget allows
        assert ms.runs >= timing.MIN_RUNS
    else:
        assert ms.runs == timing.CPU_RUNS
    assert timing.Ms([1.0, 2.0, 3.0, 4.0, 100.0]) == 3.0
    table = timing.Table(1.0)
    table.add("row", timing.Ms([1.0, 1.0, 2.0]), 1e6)
    assert "(3 runs, IQR" in capsys.readouterr().out
    header, _, row = table.markdown().splitlines()
    assert "| runs | IQR |" in header
    assert row.startswith("| row | 1.000 | 3 | ")


def test_every_out_file_starts_with_argv_commit_date_card_and_versions(timing, tmp_path):
    out = tmp_path / "r.md"
    old = sys.argv
    sys.argv = ["bench_x.py", "--smoke", "--out", str(out)]
    try:
        timing.report("| a | b |", str(out))
    finally:
        sys.argv = old
    text = out.read_text()
    first, second = text.splitlines()[:2]
    assert f"argv: `bench_x.py --smoke --out {out}`" in first
    commit = re.search(r"Commit (\S+), (\d{4}-\d\d-\d\d \d\d:\d\d UTC); card: ([^;]+);", second)
    assert commit and re.fullmatch(r"[0-9a-f]{4,40}|unknown", commit.group(1))
    import triton

    assert f"torch {torch.__version__}, triton {triton.__version__}" in second
    assert text.rstrip().endswith("| a | b |")
    assert timing.git_commit(tmp_path) == "unknown"  # outside a checkout


# --- bench_row_adam: time what the optimizer runs (finding 2) -------------------------


def test_row_adam_times_the_steps_without_the_range_check_but_one_labelled_row(monkeypatch):
    import memlayers.ops.row_adam as ra

    bench = load("bench_row_adam")
    checks = {"n": 0}
    orig = ra._check_row_range

    def spy(rows, n):
        checks["n"] += 1
        return orig(rows, n)

    monkeypatch.setattr(ra, "_check_row_range", spy)
    per_call = []

    def once(fn, rep_ms=100.0):
        before = checks["n"]
        fn()
        per_call.append(checks["n"] - before)
        return 1.0

    monkeypatch.setattr(bench, "timed", once)
    table = bench.Table(1.0)
    args = types.SimpleNamespace(rows=64, lookups=40, sweep=True, dense=False)
    bench.bench_dim(args, table, 16, DEV)
    names = [r[0] for r in table.rows]
    assert len(names) == len(per_call)
    checked = [name for name, n in zip(names, per_call, strict=True) if n]
    assert checked == ["D=16: the trainer's step with the rows' range check (check_range=True)"]


# --- bench_memory_layer (findings 3, 4, 10, 13) ---------------------------------------


@pytest.fixture(scope="module")
def ml():
    return load("bench_memory_layer")


def small_args(ml, *extra):
    return ml.parse_args(["--dim", "32", "--n-keys", "8", "--heads", "2", "--topk", "4",
                          "--tokens", "16", *extra])  # fmt: skip


def test_the_ffn_at_the_8b_width_is_the_papers_8b_and_its_size_is_printed(ml, monkeypatch):
    assert ml.ffn_hidden(4096) == 14336  # the paper's 8B (scaling_model.PAPER_8B.ffn)
    assert ml.ffn_hidden(1024) == 2816 and ml.ffn_hidden(768) == 2048  # the presets' rule
    assert ml.ffn_hidden(4096, 11008) == 11008
    args = small_args(ml, "--ffn-hidden", "96")
    assert args.ffn_hidden == 96
    with pytest.raises(SystemExit):
        small_args(ml, "--ffn-hidden", "0")
    monkeypatch.setattr(ml, "timed", lambda fn, rep_ms=100.0: (fn(), 1.0)[1])
    rows = []
    x = torch.randn(16, 32)
    ml.bench_ffn(args, x, torch.randn(16, 32), lambda n, ms, note="": rows.append(n) or ms,
                 torch.device("cpu"), torch.float32)  # fmt: skip
    assert rows == ["SwiGLU FFN step (hidden 96)"]
    ratios = ml.ratio_rows(args, {"step": 9.0, "compiled": None, "value_step": 3.0}, 1.0, None)
    assert "(hidden 96), the whole value step | 9.00 |" in ratios[0]
    assert "a third of the value step" in ratios[1] and ratios[1].endswith("| 7.00 |")


def test_the_layer_is_the_memory_plus_presets_and_its_step_trains_the_balance_loss(ml):
    args = small_args(ml)
    assert args.value_optimizers == ["sparse_adam_bf16+split"]  # the presets' value step
    layer, values, vopt, ropt = ml.build(args, "torch", True, torch.device("cpu"),
                                         torch.float32)  # fmt: skip
    preset = get_preset("134m-memory+").memory
    cfg = layer.config
    assert cfg.query_batch_norm and cfg.balance_loss == preset.balance_loss == 0.1
    shape = {"n_keys", "heads", "topk", "impl", "value_dtype"}  # value_dtype: the table's
    for f in preset.__dataclass_fields__:
        if f not in shape:
            assert getattr(cfg, f) == getattr(preset, f), f
    x, gy = torch.randn(16, 32), torch.randn(16, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # a balance loss not taken warns on the next forward
        for _ in range(2):
            ml.train_step(layer, x, gy, (vopt, ropt))
    assert not [w for w in caught if NEVER_TAKEN in str(w.message)]
    assert layer.aux_loss is None


def test_the_int8_reads_are_timed_beside_the_table_reads_and_leave_the_layer_as_it_was(
    ml, monkeypatch
):
    args = small_args(ml, "--compile")
    monkeypatch.setattr(ml, "timed", lambda fn, rep_ms=100.0: (fn(), 1.0)[1])
    monkeypatch.setattr(ml, "timed_compiled", lambda module, x, gy, opts, profile=0: 2.0)
    # The bench's Triton paths: CUDA tensors on a GPU machine, the interpreter's CPU ones in CI.
    layer, values, vopt, ropt = ml.build(args, "triton", True, DEV, torch.float32)
    x, gy = torch.randn(16, 32, device=DEV), torch.randn(16, 32, device=DEV)
    idx, w = (t.detach() for t in layer.lookup(x))
    layer.take_aux_loss()
    w.requires_grad_()
    gyv = torch.randn(16, 32, device=DEV)
    embedding_bag(values.weight, idx, w.detach(), impl="torch", sparse_grad=True).backward(gyv)
    grad = values.weight.grad
    rows = []
    add = lambda n, ms, note="": rows.append(n.strip()) or ms  # noqa: E731
    out = ml.bench_value_read(args, layer, values, x, gy, (vopt, ropt), idx, w, gyv, grad, add)
    assert set(out) == {"table", "int8", "int8_walk", "int8_compiled", "pack"}
    assert rows[:3] == [
        "Memory+ step, merged grads (the presets' shared table), table reads",
        "Memory+ step, merged grads, value_read=int8",
        "Memory+ step, merged grads, value_read=int8 + grad_read=int8",
    ]
    assert {"of which the walk, float output gradient", "of which the walk, int8 output "
            "gradient", "packing the output gradient"} <= set(rows)  # fmt: skip
    # The compiled step last: nothing compiled runs before the eager parts are timed.
    assert rows[-2:] == [
        "part: packing the stepped rows into the int8 copy",
        "Memory+ step, merged grads, value_read=int8, compiled",
    ]
    assert values.merged is None and values.read_copy is None and values.weight.grad is None
    assert not hasattr(values.weight, READ_COPY)  # later value steps pack nothing
    tri = {"step": 9.0, "compiled": 3.0, "value_step": 3.0, "reads": out}
    ratios = ml.ratio_rows(args, tri, 1.0, 1.0)
    assert any("reading the int8 copy / reading the table (eager) | 1.000 |" in r for r in ratios)
    assert any("(grad_read=int8) / reading the table (eager) | 1.000 |" in r for r in ratios)
    # 2.0 ms compiled, less two thirds of the value step (3.0) and the packing (1.0).
    assert ratios[-1].endswith("| -0.67 |") and "a third of the (eager) value step" in ratios[-1]


def test_each_timed_value_step_gets_a_gradient_not_yet_flagged_coalesced(ml):
    values = MemoryValues(32, 8, sparse_grad=True)
    rows = torch.tensor([[1, 4, 9, 20]])
    grad = torch.sparse_coo_tensor(rows, torch.randn(4, 8), (32, 8), check_invariants=True)
    assert not grad.is_coalesced()  # as autograd's accumulation hands it over
    opt = SparseValueAdam([values.weight], impl="torch")
    seen = []
    step = opt.step

    def spy():
        seen.append(values.weight.grad.is_coalesced())
        step()

    opt.step = spy
    fn = ml.value_step_fn(values, grad, opt)
    for _ in range(3):
        fn()
    assert seen == [False, False, False]  # each call pays coalesce_rows' sortedness check
    assert not grad.is_coalesced()


def test_the_search_op_row_runs_on_the_layers_normalised_queries_and_keys(ml, monkeypatch):
    args = small_args(ml)
    layer, *_ = ml.build(args, "torch", True, torch.device("cpu"), torch.float32)
    x = torch.randn(16, 32)
    seen = {}
    real = ml.product_key_topk

    def spy(q, keys, k, impl="auto", half_top=False, precision="fp32"):
        seen.update(q=q.detach().clone(), keys=keys.detach().clone(), half_top=half_top)
        return real(q, keys, k, "torch", half_top=half_top, precision=precision)

    monkeypatch.setattr(ml, "product_key_topk", spy)
    q, keys = ml.search_inputs(layer, x)
    ml.topk_fn(layer, q, keys, args.topk)()
    with torch.no_grad():
        want_q = layer.router.normed_query(x)
        want_keys = layer.router.normed_keys()
    torch.testing.assert_close(seen["q"], want_q)
    torch.testing.assert_close(seen["keys"], want_keys)
    assert not torch.allclose(seen["keys"], layer.router.keys.detach())  # not the raw keys
    assert seen["half_top"]  # the balance loss's half-key choices, as the layer's search


def test_a_reference_that_does_not_fit_the_card_is_reported_not_fatal(ml, monkeypatch):
    """The presets' impl="torch" step at the paper shape ran out of memory on an H100
    (2026-12-05) and took the whole benchmark down with it."""
    args = small_args(ml)

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.85 GiB. GPU 0")

    monkeypatch.setattr(ml, "build", oom)
    missing = []
    t = ml.bench_torch_layer(args, torch.randn(16, 32), torch.randn(16, 32), None,
                             torch.device("cpu"), torch.float32, True, missing)  # fmt: skip
    assert t is None
    assert missing == ["Memory+ step, impl=torch (sparse grad, lazy Adam reference): not "
                       "timed, out of memory on this card (CUDA out of memory)"]  # fmt: skip


# --- bench_embedding_bag (finding 9) --------------------------------------------------


@pytest.fixture(scope="module")
def eb():
    return load("bench_embedding_bag")


def test_the_trainer_shape_is_todays_trainer_and_the_old_one_keeps_a_name(eb):
    t = eb.SHAPES["trainer"]
    assert (t["dtype"], t["tokens"], t["dim"], t["rows"]) == (torch.bfloat16, 32768, 768, 1 << 20)
    old = eb.SHAPES["trainer-b8-fp32"]
    assert (old["dtype"], old["tokens"], old["dim"]) == (torch.float32, 8192, 768)
    assert "per lookup" in eb.__doc__ and "the fewest the op must move" not in eb.__doc__


def test_bwd_over_uniform_is_a_dash_without_a_uniform_row_of_the_shape(eb):
    def s(bwd):
        return dict(fwd_simple=1.0, fwd=1.0, score=1.0, bwd_simple=1.0, bwd=bwd, fwd_bwd=1.0,
                    note="")  # fmt: skip

    summary = {"paper uniform": s(2.0), "paper zipf": s(3.0), "trainer zipf": s(5.0),
               "replay 0 bfloat16": s(7.0)}  # fmt: skip
    cells = [row.split("|")[9].strip() for row in eb.summary_rows(summary)]
    assert cells == ["1.00", "1.50", "–", "–"]


def test_lookup_rows_say_bytes_per_lookup_and_the_torch_reference_what_it_runs(
    eb, timing, monkeypatch
):
    monkeypatch.setattr(eb, "timed", lambda fn, rep_ms=100.0: (fn(), 1.0)[1])
    table = timing.Table(1.0)
    g = torch.Generator(DEV).manual_seed(0)
    values = eb.random_table(64, 16, torch.float32, DEV, g)
    indices = eb.make_indices("uniform", 64, 8, 6, DEV, g)
    weights = torch.rand(8, 6, generator=g, device=DEV).softmax(-1)
    grad = torch.randn(8, 16, generator=g, device=DEV)
    args = argparse.Namespace(score_launches=None, sweep=False, walk_sweep=False,
                              walk_before=None, torch_ref=True, int8_reads=True)  # fmt: skip
    s = eb.bench_lookups("smoke uniform", values, indices, weights, grad, args, table, None)
    notes = {name: note for name, _, _, _, note in table.rows}
    # --int8-reads: the two kernels reading the int8 copy, at D + 2 bytes a row read.
    int8 = {name: nbytes for name, _, nbytes, *_ in table.rows if "int8 reads" in name}
    assert set(int8) == {"smoke uniform: int8 reads: forward",
                         "smoke uniform: int8 reads: score gradient (shipped)"}  # fmt: skip
    assert set(int8.values()) == {8 * 6 * (16 + 2) + 8 * 6 * 12 + 8 * 16 * 4}
    for row in ("forward, simple baseline", "forward (shipped)", "score gradient (shipped)"):
        assert "per lookup" in notes[f"smoke uniform: {row}"]
    names = list(notes)
    ours = "smoke uniform: forward+backward (ours: float32 table, row-sparse gradient, autograd)"
    assert ours in names
    dense = [n for n in names if "F.embedding_bag" in n and "dense [N, D] gradient" in n]
    sparse = [n for n in names if "F.embedding_bag" in n and "sparse=True" in n]
    assert len(dense) == len(sparse) == 1 and "fp32" in dense[0]
    assert {"torch_fp32", "torch_fp32_sparse"} <= set(s)


# --- bench_parallel (finding 5) and profile_step (finding 14) -------------------------


@pytest.fixture(scope="module")
def bp():
    return load("bench_parallel")


@pytest.mark.parametrize("steps", ["0", "3", "5"])
def test_bench_parallel_refuses_too_few_steps_clearly(bp, steps, capsys):
    with pytest.raises(SystemExit):
        bp.parse_args(["throughput", "--steps", steps])
    assert f"--steps must be >= {bp.MIN_STEPS}" in capsys.readouterr().err
    assert bp.parse_args(["throughput", "--steps", str(bp.MIN_STEPS)]).steps == bp.MIN_STEPS
    assert bp.parse_args(["check", "--steps", "0"]).mode == "check"  # check takes no steps
    with pytest.raises(ValueError, match="--steps must be"):
        bp._train_steps(types.SimpleNamespace(device="cpu", steps=int(steps)), [])


TINY = ["model.preset=tiny-memory+", "model.memory.impl=torch", "data.batch_size=2",
        "data.seq_len=32", "parallel.mp=1", "device=cpu"]  # fmt: skip


def test_bench_parallel_times_the_trainers_step_by_the_median_after_the_warm_up(bp, monkeypatch):
    from memlayers.parallel import ParallelPlan

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    deferred = []
    clip = ParallelPlan.clip_grad_norm_

    def spy(self, model, max_norm, defer_to=None):
        deferred.append(defer_to)
        return clip(self, model, max_norm, defer_to=defer_to)

    monkeypatch.setattr(ParallelPlan, "clip_grad_norm_", spy)
    steps = [50.0, 40.0, 30.0, 0.1, 0.4, 0.2, 0.3]  # seconds: 3 warm-up steps, then 4
    clock = {"now": 0.0, "calls": 0}

    def perf_counter():
        i = clock["calls"]
        clock["calls"] += 1
        if i % 2:  # a step's end
            clock["now"] += steps[i // 2]
        return clock["now"]

    monkeypatch.setattr(bp, "time", types.SimpleNamespace(perf_counter=perf_counter))
    ns = types.SimpleNamespace(device="cpu", steps=len(steps))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = bp._train_steps(ns, [*TINY, "model.memory.balance_loss=0.1"])
    # model(x, targets=y) adds the balance loss's gradient: nothing is left untaken
    assert not [w for w in caught if NEVER_TAKEN in str(w.message)]
    assert len(deferred) == len(steps)
    assert all(type(d).__name__ == "SparseValueAdam" for d in deferred)  # the clip's defer_to
    assert out["step_ms"] == pytest.approx(250.0)  # the median of 0.1, 0.4, 0.2, 0.3 s
    assert out["timed_steps"] == 4
    assert out["table_bytes_per_value"] == 12.0  # tiny: an fp32 table, fp32 moments


def test_bench_parallel_results_hold_their_provenance(bp, tmp_path, monkeypatch):
    monkeypatch.setattr(bp, "throughput", lambda ns: {"mode": "throughput", "steps": ns.steps})
    path = tmp_path / "one.json"
    bp.main(["throughput", "--device", "cpu", "--out", str(path)])
    saved = json.loads(path.read_text())
    assert set(saved["provenance"]) == {"argv", "commit", "date", "card", "torch", "triton"}
    row = dict(saved, world=1, mp=1, impl="torch", tokens_per_s=1.0, step_ms=1.0,
               peak_gib_rank0=0.0, loss_first_last=[1.0, 1.0])  # fmt: skip
    path.write_text(json.dumps(row))
    assert f"commit {saved['provenance']['commit']}" in bp.table([str(path)])


def test_big_sizes_the_table_by_the_resolved_bytes_per_value(bp):
    from memlayers.config import load_config, with_vocab

    args = with_vocab(load_config([], ["model.preset=134m-memory+"]), 32000)
    # a bf16 table, its master's int16 remainders and bf16 moments (presets.PRESET_OPTIM,
    # optim.value_master_split), and with an fp32 master instead
    assert bp.table_bytes_per_value(args) == 8.0
    fp32 = with_vocab(load_config([], ["model.preset=134m-memory+",
                                       "optim.value_master_split=false"]), 32000)  # fmt: skip
    assert bp.table_bytes_per_value(fp32) == 10.0
    gpu = 80 * 10**9
    over = bp.big_overrides(types.SimpleNamespace(impl="torch", batch=8), gpu, 2)
    n_keys = int(next(o for o in over if o.startswith("model.memory.n_keys=")).split("=")[1])
    resolved = with_vocab(load_config([], over), 32000)
    per_value = bp.table_bytes_per_value(resolved)
    total = n_keys**2 * 768 * per_value
    assert bp.BIG_MARGIN * gpu <= total < 1.01 * bp.BIG_MARGIN * gpu


def test_profile_step_refuses_a_bad_steps_count_clearly(capsys):
    ps = load("profile_step")
    for bad in ("0", "-2", "x"):
        with pytest.raises(SystemExit):
            ps.parse_args(["--steps", bad])
        assert "--steps" in capsys.readouterr().err
    assert ps.parse_args(["--steps", "1"]).steps == 1
    with pytest.raises(SystemExit):
        ps.parse_args(["--profile-steps", "0"])


def test_profile_steps_trainer_step_trains_the_balance_loss_and_defers_the_clip(monkeypatch):
    import contextlib

    import memlayers.optim as optim
    from memlayers import build_model
    from memlayers.optim import OptimArgs, build_optimizer

    ps = load("profile_step")
    cfg = get_preset("tiny-memory+")
    cfg.memory.impl, cfg.memory.balance_loss = "torch", 0.1
    model = build_model(cfg, torch.device("cpu"), seed=0, sparse_values=True)
    opt = build_optimizer(model, OptimArgs(), impl="torch")
    deferred = []
    clip = optim.clip_grad_norm_

    def spy(params, max_norm, defer_to=None):
        deferred.append(defer_to)
        return clip(params, max_norm, defer_to=defer_to)

    monkeypatch.setattr(ps, "clip_grad_norm_", spy)
    step = ps.trainer_step(model, opt, 1.0, contextlib.nullcontext())
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch's own (2.11's sparse invariant note) pass
        for _ in range(2):
            loss = step(tokens[:, :-1], tokens[:, 1:])
    assert not [w for w in caught if NEVER_TAKEN in str(w.message)]
    assert torch.isfinite(loss) and deferred == [opt.clip_defer] * 2 and deferred[0] is not None


def test_profile_ops_tables_name_the_ops_run(ml):
    """profile_step.profile_ops (profile_step's tables, bench_memory_layer --profile):
    both tables list the profiled function's ops, with their call counts."""
    ps = load("profile_step")
    a, b = torch.randn(64, 64, device=DEV), torch.randn(64, 64, device=DEV)
    total, by_self = ps.profile_ops(lambda: torch.mm(a, b).relu_(), runs=3, rows=10)
    for table in (total, by_self):
        line = next(ln for ln in table.splitlines() if "aten::mm" in ln)
        assert line.split()[-1] == "3"  # # of Calls
    assert ("Self CUDA" if DEV.type == "cuda" else "Self CPU") in by_self
    assert ml.parse_args(["--profile", "25"]).profile == 25
    assert ml.parse_args([]).profile == 0
    with pytest.raises(SystemExit):
        ml.parse_args(["--profile", "0"])
