"""The Triton embedding bag against the float64 PyTorch path: output, value gradient (dense
and row-sparse) and score gradient, for fp32/bf16/fp16 tables.

On a CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) at small sizes; on a
GPU the same tests run on CUDA, plus sizes and cases only a GPU can hold.
"""

import subprocess
import sys

import pytest
import torch

from memlayers.ops import embedding_bag
from memlayers.ops import embedding_bag_triton as ebt

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (N rows, D, B bags, K per bag)
CASES = {
    "basic": (50, 16, 8, 6),
    "odd-dim": (37, 13, 5, 7),
    "many-duplicates": (3, 24, 10, 32),
    "single-row": (1, 8, 4, 5),
    "one-per-bag": (20, 9, 11, 1),
    "wide-odd-dim": (12, 300, 3, 4),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative error allowed on the output and value gradient: the table dtype's final
# rounding (one ulp: the interpreter truncates bf16 instead of rounding, 2^-7), fp32 sums.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1.5e-3}


def _inputs(n, d, b, k, dtype, seed=0, device=DEVICE, weight_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, d, generator=g).to(dtype)
    indices = torch.randint(0, n, (b, k), generator=g)
    weights = torch.randn(b, k, generator=g).to(weight_dtype)
    grad = torch.randn(b, d, generator=g).to(dtype)
    return [t.to(device) for t in (values, indices, weights, grad)]


def _close(actual, expected, rtol):
    """Relative to the tensor's scale: outputs that cancel to ~0 get the same atol."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


def _reference(values, indices, weights, grad):
    """float64 output, dense value gradient and score gradient (PyTorch path)."""
    v = values.detach().double().requires_grad_()
    w = weights.detach().double().requires_grad_()
    out = embedding_bag(v, indices, w, impl="torch")
    gv, gw = torch.autograd.grad(out, (v, w), grad.double()) if out.numel() else (None, None)
    return out.detach(), gv, gw


def _run(values, indices, weights, grad, sparse_grad, need=(True, True)):
    v = values.clone().requires_grad_(need[0])
    w = weights.clone().requires_grad_(need[1])
    out = embedding_bag(v, indices, w, impl="triton", sparse_grad=sparse_grad)
    out.backward(grad)
    return out, v.grad, w.grad


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, dtype, sparse_grad):
    values, indices, weights, grad = _inputs(*CASES[case], dtype)
    out, gv, gw = _run(values, indices, weights, grad, sparse_grad)
    ref_out, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    assert out.dtype == dtype and gv.dtype == dtype and gw.dtype == weights.dtype
    _close(out, ref_out, RTOL[dtype])
    if sparse_grad:
        # Exactly the rows read, distinct and ascending: untouched rows cost nothing.
        # (AccumulateGrad drops the coalesced flag when it stores .grad; the optimizer
        # checks the order instead of paying for coalesce().)
        assert gv.is_sparse
        assert torch.equal(gv._indices()[0], indices.unique())
        gv = gv.to_dense()
    _close(gv, ref_gv, RTOL[dtype])
    # Score gradients: fp32 dot products of the exact table rows and output gradient.
    _close(gw, ref_gw, 1e-5)


@pytest.mark.parametrize(
    "need", [(True, False), (False, True)], ids=["values-only", "weights-only"]
)
def test_partial_gradients(need):
    values, indices, weights, grad = _inputs(30, 20, 6, 9, torch.float32, seed=1)
    out, gv, gw = _run(values, indices, weights, grad, False, need)
    _, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    assert (gv is None) != need[0] and (gw is None) != need[1]
    if need[0]:
        _close(gv, ref_gv, 1e-5)
    if need[1]:
        _close(gw, ref_gw, 1e-5)


def test_half_weights():
    # bf16 scores (PyTorch's own backward raises NotImplementedError here): fp32 dot
    # products, one rounding to bf16.
    args = _inputs(40, 33, 7, 8, torch.bfloat16, seed=2, weight_dtype=torch.bfloat16)
    out, gv, gw = _run(*args, False)
    ref_out, ref_gv, ref_gw = _reference(*args)
    assert gw.dtype == torch.bfloat16
    _close(out, ref_out, 1e-2)
    _close(gv, ref_gv, 1e-2)
    _close(gw, ref_gw, 1e-2)


@pytest.mark.parametrize("b,k", [(0, 5), (4, 0)], ids=["empty-batch", "empty-bags"])
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
def test_empty(b, k, sparse_grad):
    values, indices, weights, _ = _inputs(10, 6, b, k, torch.float32)
    v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
    out = embedding_bag(v, indices, w, impl="triton", sparse_grad=sparse_grad)
    assert out.shape == (b, 6) and torch.equal(out, torch.zeros_like(out))
    out.sum().backward()
    assert torch.equal(v.grad.to_dense(), torch.zeros_like(values))
    assert w.grad.shape == (b, k)


@pytest.mark.parametrize(
    "fwd,bwd",
    [
        ((1, 1, 1, 1), dict(block_d=8, chunk=1, stages=1)),
        ((2, 2, 3, 1), dict(block_d=16, chunk=3, stages=2)),
        ((4, 4, 2, 1), dict(block_d=64, chunk=64, num_warps=2)),
        ((2, 1, 2, 4), dict(block_d=8, chunk=2, stages=1)),
    ],
    ids=["small-tiles", "odd-steps", "wide-steps", "gathered-rows"],
)
@pytest.mark.parametrize("n", [9, 2], ids=["rows-9", "rows-2-long-runs"])
def test_tilings(fwd, bwd, n):
    # Many column tiles (score parts added across them), rows cut into many pieces (chunk
    # 1 and 3) or held whole (64), chunk tails: every launch computes the same function.
    values, indices, weights, grad = _inputs(n, 45, 6, 7, torch.float32, seed=3)
    ref_out, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    _close(ebt._fwd_launch(values, indices, weights, config=fwd), ref_out, 1e-5)
    gv, gw = ebt._bwd_dense(grad, values, indices, weights, True, True, **bwd)
    _close(gv, ref_gv, 1e-5)
    _close(gw, ref_gw, 1e-5)
    rows, grad_rows, gw = ebt._bwd_sparse(grad, values, indices, weights, True, **bwd)
    _close(grad_rows, ref_gv[rows], 1e-5)
    _close(gw, ref_gw, 1e-5)


def test_fwd_config_rule():
    # Many bags: the whole row per program. Few bags (decoding): tiles halved until the
    # programs fill the SMs, never below FWD_FEW_BLOCK_D columns, rows gathered.
    assert ebt.fwd_config(132, 768, 132) == ebt.FWD_CONFIG
    assert ebt.fwd_config(10_000, 768, 132) == ebt.FWD_CONFIG
    few = (ebt.FWD_FEW_WARPS, ebt.FWD_FEW_STAGES, ebt.FWD_FEW_ROWS)
    assert ebt.fwd_config(1, 768, 132) == (1024 // ebt.FWD_FEW_BLOCK_D, *few)
    # The first split whose programs reach the SMs: 32 bags x 6 tiles of 128 (3 of 256:
    # 96 programs, short), 64 x 3 of 256 (2 of 512: 128, short), 100 x 2 of 512.
    assert ebt.fwd_config(32, 768, 132) == (8, *few)
    assert ebt.fwd_config(64, 768, 132) == (4, *few)
    assert ebt.fwd_config(100, 768, 132) == (2, *few)
    assert ebt.fwd_config(1, 32, 132) == (1, *few)  # a row narrower than a tile: whole


def test_forward_order_fixed_across_launches():
    # Every launch adds a bag's rows in the same order: bitwise equal outputs, equal to
    # the simple baseline's too (no launch parameter can change a result).
    values, indices, weights, _ = _inputs(64, 40, 9, 17, torch.bfloat16, seed=9)
    # The few-bags launches gather several rows per load (ROWS; 17 rows: a partial last
    # gather) and add them in the same order.
    sweep = ebt.FWD_SWEEP + ebt.FWD_FEW_SWEEP + [(8, 1, 2, 4), (1, 2, 1, 32)]
    outs = [ebt._fwd_launch(values, indices, weights, config=c) for c in sweep]
    outs.append(ebt.simple_forward(values, indices, weights))
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


def _skewed_indices(kind, n, b, k, seed):
    """``[B, K]`` lookups: ``half-one-row`` (row 7 takes half), ``zipf`` (p ∝ 1/rank),
    ``all-one-row``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "all-one-row":
        return torch.full((b, k), n // 2, device=DEVICE)
    if kind == "zipf":
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
        flat = torch.multinomial(p / p.sum(), b * k, replacement=True, generator=g)
        return torch.randperm(n, generator=g)[flat].view(b, k).to(DEVICE)
    indices = torch.randint(0, n, (b, k), generator=g)
    indices[torch.rand(b, k, generator=g) < 0.5] = 7
    return indices.to(DEVICE)


SKEWS = ["half-one-row", "zipf", "all-one-row"]


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("skew", SKEWS)
def test_skewed_distributions(skew, dtype, sparse_grad):
    # 48 bags × 12 = 576 lookups: the hot row of half-one-row and all-one-row is longer
    # than the default chunk (256), so it is cut into pieces that a second pass adds.
    # Output and every gradient against float64.
    values, _, weights, grad = _inputs(40, 33, 48, 12, dtype, seed=11)
    indices = _skewed_indices(skew, 40, 48, 12, seed=12)
    ref_out, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    out, gv, gw = _run(values, indices, weights, grad, sparse_grad)
    _close(out, ref_out, RTOL[dtype])
    if sparse_grad:
        assert torch.equal(gv._indices()[0], indices.unique())
    # A hot row's value gradient sums ~300 terms: the fp32 sum is rounded once to the
    # table dtype, so the same tolerance holds.
    _close(gv.to_dense(), ref_gv, RTOL[dtype])
    _close(gw, ref_gw, 1e-5)


@pytest.mark.parametrize("chunk", [16, 5])
@pytest.mark.parametrize("skew", SKEWS)
def test_skewed_pieces(skew, chunk):
    # Small chunks cut every hot row into many pieces (and the Zipf law's middle rows
    # too): the second pass adds them in chunk order. (Every gradient the walk gives, on
    # these cases and more: test_walk_modes.)
    values, _, weights, grad = _inputs(40, 33, 48, 12, torch.float32, seed=11)
    indices = _skewed_indices(skew, 40, 48, 12, seed=12)
    _, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    launch = dict(chunk=chunk)
    dense, dw = ebt._bwd_dense(grad, values, indices, weights, True, True, **launch)
    _close(dense, ref_gv, 1e-5)
    _close(dw, ref_gw, 1e-5)
    rows, grad_rows, dw = ebt._bwd_sparse(grad, values, indices, weights, True, **launch)
    _close(grad_rows, ref_gv[rows], 1e-5)
    _close(dw, ref_gw, 1e-5)


WALK_CASES = [
    *[(skew, chunk, torch.float32) for skew in ["uniform", *SKEWS] for chunk in (256, 16, 5)],
    ("uniform", 256, torch.bfloat16),
    ("zipf", 5, torch.bfloat16),
]


@pytest.mark.parametrize(
    "skew, chunk, dtype", WALK_CASES,
    ids=[f"{s}-chunk-{c}-{str(d).removeprefix('torch.')}" for s, c, d in WALK_CASES],
)  # fmt: skip
def test_walk_modes(skew, chunk, dtype):
    # Every mode of the walk against the reference, rows whole or cut into pieces: value
    # gradient alone (the merged shared-table walk, sum_rows; sparse and dense), score
    # gradient alone, both (dense). And its sums have one order whatever the mode: the
    # value gradient alone is bitwise the one computed beside the score gradient (in the
    # interpreter: a GPU compiles each mode apart and may contract the sums differently).
    values, indices, weights, grad = _inputs(40, 37, 48, 12, dtype, seed=21)
    if skew != "uniform":
        indices = _skewed_indices(skew, 40, 48, 12, seed=22)
    _, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    launch = dict(chunk=chunk)
    score_rtol = 1e-5 if dtype == torch.float32 else 1e-2
    seg = ebt.row_segments(indices, weights, 40, need_count=True)
    out = values.new_empty(seg.rows.numel(), 37)
    ebt._bwd_launch(grad, None, seg, out, False, False, **launch)
    rows, grad_rows = ebt._sparse_rows(seg, out)
    _close(grad_rows, ref_gv[rows], RTOL[dtype])
    value_only, _ = ebt._bwd_dense(grad, values, indices, weights, True, False, **launch)
    _close(value_only, ref_gv, RTOL[dtype])
    _, score_only = ebt._bwd_dense(grad, values, indices, weights, False, True, **launch)
    _close(score_only, ref_gw, score_rtol)
    dense, dw = ebt._bwd_dense(grad, values, indices, weights, True, True, **launch)
    _close(dense, ref_gv, RTOL[dtype])
    _close(dw, ref_gw, score_rtol)
    if not CUDA:
        assert torch.equal(value_only, dense)
        assert torch.equal(grad_rows, dense[rows])
        assert torch.equal(score_only, dw)


def test_simple_baselines_match_reference():
    # The benchmark's baselines (simple forward, reverse-index backward) are tested too.
    values, _, weights, grad = _inputs(30, 21, 10, 9, torch.float32, seed=13)
    indices = _skewed_indices("half-one-row", 30, 10, 9, seed=14)
    ref_out, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    _close(ebt.simple_forward(values, indices, weights), ref_out, 1e-5)
    rows, grad_rows, gw = ebt.simple_backward(grad, values, indices, weights)
    assert torch.equal(rows, indices.unique())
    _close(grad_rows, ref_gv[rows], 1e-5)
    _close(gw, ref_gw, 1e-5)


@pytest.mark.parametrize(
    "chunk, warps, stages, split, block_d",
    [(8, 4, None, 1, None), (1, 1, 1, 1, None), (4, 8, 3, 1, None), (16, 2, 4, 1, None),
     (2, 1, None, 3, None), (1, 4, 3, 2, 4), (2, 2, 1, 9, 8), (4, 1, 3, 1, 4)],
)  # fmt: skip
def test_score_gradient_launches_give_the_same_numbers(chunk, warps, stages, split, block_d):
    # The merged backward's score gradient alone (benchmark's --sweep launches): equal to
    # the reference for every launch, a K that no chunk divides, a D under its power of 2,
    # a bag split over programs that take every split-th chunk (9: more than K has
    # chunks), rows of 13 columns in tiles of 4 or 8 (the last one part masked).
    values, indices, weights, grad = _inputs(23, 13, 6, 7, torch.float32, seed=21)
    _, _, ref_gw = _reference(values, indices, weights, grad)
    got = ebt.score_grad(values, indices, grad, chunk, warps, stages, split, block_d)
    _close(got, ref_gw, 1e-5)


def test_score_gradient_shipped_launch():
    # The default launch (SCORE_GRAD_*; on 2026-12-02 one warp, two programs per bag,
    # 256-column tiles of 8 rows) on rows of 300 columns (a full tile and a part-masked one)
    # and bags of 19 (three chunks, the last part-masked, shared by the bag's programs).
    values, indices, weights, grad = _inputs(64, 300, 5, 19, torch.float32, seed=22)
    _, _, ref_gw = _reference(values, indices, weights, grad)
    _close(ebt.score_grad(values, indices, grad), ref_gw, 1e-5)


def test_score_gradient_refuses_a_tile_that_is_not_a_power_of_two():
    values, indices, _, grad = _inputs(23, 13, 6, 7, torch.float32, seed=21)
    with pytest.raises(ValueError, match="block_d=12"):
        ebt.score_grad(values, indices, grad, block_d=12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sum_rows(dtype):
    # Three sorted row lists concatenated (how autograd adds three lookups' sparse
    # gradients) and a hot row repeated 200 times: distinct ascending rows, fp32 sums.
    g = torch.Generator().manual_seed(15)
    lists = [torch.randperm(50, generator=g)[:20].sort().values for _ in range(3)]
    rows = torch.cat([*lists, torch.full((200,), 3)]).to(DEVICE)
    grads = torch.randn(rows.numel(), 17, generator=g).to(dtype).to(DEVICE)
    distinct, sums = ebt.sum_rows(rows, grads, 50)
    ref = torch.zeros(50, 17, dtype=torch.float64, device=DEVICE)
    ref.index_add_(0, rows, grads.double())
    assert torch.equal(distinct, rows.unique())
    assert sums.dtype == dtype
    _close(sums, ref[distinct], RTOL[dtype])


def test_out_of_range_index_raises():
    # The forward reads no row outside the table (masked) and fails loudly instead. On a
    # GPU the failure is a device-side assert, which ends the process: run it in a child.
    code = (
        "import torch\n"
        "from memlayers.ops import embedding_bag\n"
        f"v = torch.randn(10, 8, device='{DEVICE}')\n"
        f"i = torch.tensor([[1, 10]], device='{DEVICE}')\n"
        f"w = torch.ones(1, 2, device='{DEVICE}')\n"
        "embedding_bag(v, i, w, impl='triton')\n"
        "torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "outside [0, N)" in done.stderr or "device-side assert" in done.stderr


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
def test_skewed_lookups(sparse_grad):
    # 60 lookups into 3 of 200 rows: the walk's buffers are sized by min(B·K, N) = 60, far
    # above U = 3, so the sparse path hands back right-sized copies; rows never read get
    # zeros (dense) or are absent (sparse).
    values, _, weights, grad = _inputs(200, 24, 6, 10, torch.float32, seed=6)
    pick = torch.randint(0, 3, (6, 10), generator=torch.Generator().manual_seed(7))
    indices = torch.tensor([7, 150, 199], device=DEVICE)[pick.to(DEVICE)]
    ref_out, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
    out = embedding_bag(v, indices, w, impl="triton", sparse_grad=sparse_grad)
    out.backward(grad)
    _close(out, ref_out, 1e-5)
    _close(v.grad.to_dense(), ref_gv, 1e-5)
    _close(w.grad, ref_gw, 1e-5)
    if sparse_grad:
        assert v.grad._indices().tolist() == [[7, 150, 199]]
        assert v.grad._values().untyped_storage().nbytes() == 3 * 24 * 4


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
def test_deterministic(sparse_grad):
    # A stable sort and one writer per row: bitwise the same on every run (on a GPU too:
    # the hot rows below have ~30 lookups each, where atomics would reorder the sums).
    args = _inputs(16, 40, 32, 16, torch.bfloat16, seed=4)
    first = _run(*args, sparse_grad)
    second = _run(*args, sparse_grad)
    for a, b in zip(first, second, strict=True):
        if a.is_sparse:
            a, b = a.coalesce(), b.coalesce()
            assert torch.equal(a.indices(), b.indices())
            a, b = a.values(), b.values()
        assert torch.equal(a, b)


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
def test_torch_compile_fullgraph(sparse_grad):
    values, indices, weights, _ = _inputs(40, 16, 5, 6, torch.float32, seed=5)

    def loss(v, idx, w):
        return (embedding_bag(v, idx, w, impl="triton", sparse_grad=sparse_grad) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        v, w = values.clone().requires_grad_(), weights.clone().requires_grad_()
        out = fn(v, indices, w)
        out.backward()
        results.append((out, v.grad.to_dense(), w.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_registered_ops_pass_opcheck():
    # torch.library's own consistency checks: fake kernels, schema, autograd registration.
    values, indices, weights, grad = _inputs(20, 12, 4, 5, torch.float32, seed=6)
    values.requires_grad_()
    weights.requires_grad_()
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(
        ebt.embedding_bag_fwd, (values, indices, weights, False), test_utils=tests
    )
    torch.library.opcheck(
        ebt.embedding_bag_bwd, (grad, values.detach(), indices, weights.detach(), True, True),
        test_utils=tests,
    )  # fmt: skip
    for need_weights in (True, False):
        torch.library.opcheck(
            ebt.embedding_bag_bwd_sparse,
            (grad, values.detach(), indices, weights.detach(), need_weights),
            test_utils=tests,
        )


# --- GPU only: sizes the interpreter can't afford -------------------------------------

GPU_CASES = {
    "paper-shape-small": (4096, 1024, 256, 128),
    "non-pow2-dim": (4096, 1000, 128, 128),
    "wide": (1024, 4096, 64, 32),
    "hot-rows": (8, 512, 512, 128),
}
GPU_SKEWED = {
    # (N, D, B, K): half of 262k lookups on one row, a Zipf law, every lookup on one row.
    "trainer-d": (65536, 768, 2048, 128),
    "paper-d": (65536, 1024, 2048, 128),
}


@gpu_only
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_gpu_sizes(case, dtype, sparse_grad):
    values, indices, weights, grad = _inputs(*GPU_CASES[case], dtype, seed=7)
    out, gv, gw = _run(values, indices, weights, grad, sparse_grad)
    ref_out, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    # On a GPU bf16 rounds to nearest: half an ulp, 2^-9.
    rtol = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}[dtype]
    _close(out, ref_out, rtol)
    _close(gv.to_dense(), ref_gv, rtol)
    _close(gw, ref_gw, 1e-5)


@gpu_only
@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense-grad", "sparse-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("skew", SKEWS)
@pytest.mark.parametrize("case", list(GPU_SKEWED), ids=list(GPU_SKEWED))
def test_gpu_skewed(case, skew, dtype, sparse_grad):
    n, d, b, k = GPU_SKEWED[case]
    values, _, weights, grad = _inputs(n, d, b, k, dtype, seed=16)
    indices = _skewed_indices(skew, n, b, k, seed=17)
    out, gv, gw = _run(values, indices, weights, grad, sparse_grad)
    ref_out, ref_gv, ref_gw = _reference(values, indices, weights, grad)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 4e-3}[dtype]
    _close(out, ref_out, rtol)
    _close(gv.to_dense(), ref_gv, rtol)
    _close(gw, ref_gw, 1e-5)
    again = _run(values, indices, weights, grad, sparse_grad)  # bitwise deterministic
    assert torch.equal(again[1].to_dense(), gv.to_dense()) and torch.equal(again[2], gw)


@gpu_only
def test_gpu_table_past_2_31_elements():
    # 2.2M rows × 1024 = 2.25e9 elements (4.5 GB bf16): rows past element 2^31 must be
    # addressed with int64 offsets. The reference gathers only the rows read.
    n, d = 2_200_000, 1024
    values = torch.empty(n, d, dtype=torch.bfloat16, device="cuda").normal_()
    g = torch.Generator(device="cuda").manual_seed(8)
    indices = torch.randint(n - 100_000, n, (64, 16), device="cuda", generator=g)
    indices[:, 0] = n - 1
    weights = torch.randn(64, 16, device="cuda", generator=g)
    grad = torch.randn(64, d, device="cuda", generator=g).bfloat16()
    for sparse_grad in (False, True):
        v = values.requires_grad_()
        w = weights.clone().requires_grad_()
        out = embedding_bag(v, indices, w, impl="triton", sparse_grad=sparse_grad)
        out.backward(grad)
        rows = values.detach()[indices].double()  # [B, K, D]
        ref = torch.einsum("bk,bkd->bd", weights.double(), rows)
        _close(out, ref, 4e-3)
        _close(w.grad, torch.einsum("bkd,bd->bk", rows, grad.double()), 1e-5)
        touched = indices.unique()
        gv = v.grad.to_dense() if sparse_grad else v.grad
        ref_gv = torch.zeros(n - touched[0], d, dtype=torch.float64, device="cuda")
        contrib = weights.double().unsqueeze(-1) * grad.double().unsqueeze(1)  # [B, K, D]
        ref_gv.index_add_(0, (indices - touched[0]).reshape(-1), contrib.reshape(-1, d))
        _close(gv[touched[0] :], ref_gv, 4e-3)
        if not sparse_grad:
            assert gv[: touched[0]].abs().sum() == 0
        v.grad = None
        del gv


@pytest.mark.parametrize(
    "d,block_d",
    [(768, 256), (1024, 512), (4096, 512), (640, 128), (1000, 512), (96, 128), (24, 32)],
)
def test_backward_tile_rule(d, block_d):
    # The widest tile of at most 512 columns that divides d (768: 3 x 256, measured 8-13%
    # faster than 512 + a half-masked 256 on an H200); otherwise 512, capped at the next
    # power of two of d. An explicit block_d is kept.
    assert ebt.bwd_launch(d)[0] == block_d
    assert ebt.bwd_launch(768, 512)[0] == 512


def test_memory_layer_skips_the_range_check_of_its_own_indices(monkeypatch):
    # The layer's search makes every index (in [0, n_keys**2): the table), so its lookups
    # launch unchecked (no flag fill, compare and assert kernels: decode-step latency),
    # float and quantized alike; a direct embedding_bag call still checks. Unchecked
    # launches give the same output as checked ones.
    from memlayers import MemoryConfig, ProductKeyMemory
    from memlayers.ops import quantized_triton as qt

    calls = []
    fwd, qfwd = ebt._fwd_launch, qt._qfwd_launch

    def rec_fwd(values, indices, weights, config=None, check=True):
        calls.append(("float", check))
        return fwd(values, indices, weights, config, check)

    def rec_qfwd(table, indices, weights, out_dtype=torch.float32, config=None, check=True):
        calls.append(("quantized", check))
        return qfwd(table, indices, weights, out_dtype, config, check)

    monkeypatch.setattr(ebt, "_fwd_launch", rec_fwd)
    monkeypatch.setattr(qt, "_qfwd_launch", rec_qfwd)
    torch.manual_seed(0)
    cfg = MemoryConfig(n_keys=8, heads=2, topk=3, impl="triton")
    layer = ProductKeyMemory(16, cfg, device=DEVICE).eval()
    x = torch.randn(3, 16, device=DEVICE)
    with torch.no_grad():
        out = layer(x)
        idx, w = layer.lookup(x)
        table = layer.values.weight
        checked = embedding_bag(table, idx, w, impl="triton")
        assert calls == [("float", False), ("float", True)]
        torch.testing.assert_close(
            ebt._fwd_launch(table, idx, w, check=False), checked, rtol=0, atol=0
        )
        layer.values.quantize_(8)
        calls.clear()
        layer(x)
        assert calls == [("quantized", False)]
    assert out.shape == x.shape
