"""Triton kernels compiled for a GPU target on the CPU: what the interpreter cannot see.

CI runs the kernels in Triton's interpreter, which executes their Python: a kernel that
reads a plain global (``X = 1.5`` instead of ``X = tl.constexpr(1.5)``), or uses an op the
GPU compiler refuses, passes there and fails at its first launch on a GPU. So the kernels
named here are also compiled to PTX for an H100 (sm_90), in a process without the
interpreter (Triton's wheel brings the CUDA compiler; no GPU is needed), and the PTX is
checked where a property of it matters.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from memlayers.ops.embedding_bag_triton import _bwd_kernel, _score_grad_kernel
    from memlayers.ops.quantized_triton import PACK_BLOCK_D, PACK_WARPS, _int8_pack_kernel
    from memlayers.ops.row_adam_triton import (
        ADAM_BLOCK_D, ADAM_WARPS, SPLIT_MASTER, row_adam_kernel, row_adam_rowwise_kernel)

    target = GPUTarget("cuda", 90, 32)
    out = {}

    def build(name, fn, signature, constexprs, warps=4):
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        out[name] = triton.compile(src, target=target, options={"num_warps": warps}).asm["ptx"]

    pack = {"weight_ptr": "*bf16", "rows_ptr": "*i64", "data_ptr": "*i8",
            "scales_ptr": "*bf16", "U": "i32", "D": "constexpr", "BLOCK_D": "constexpr",
            "ALL": "constexpr"}
    for weight in ("bf16", "fp32"):
        for all_rows in (False, True):
            build(f"pack-{weight}-{all_rows}", _int8_pack_kernel,
                  {**pack, "weight_ptr": "*" + weight},
                  {"D": 768, "BLOCK_D": PACK_BLOCK_D, "ALL": all_rows}, warps=PACK_WARPS)
    build("pack-d300", _int8_pack_kernel, pack,  # a partial last tile
          {"D": 300, "BLOCK_D": PACK_BLOCK_D, "ALL": False}, warps=PACK_WARPS)
    build("pack-d1", _int8_pack_kernel, {**pack, "weight_ptr": "*fp32"},
          {"D": 1, "BLOCK_D": 1, "ALL": False}, warps=1)
    score = {"values_ptr": "*i8", "scales_ptr": "*bf16", "indices_ptr": "*i64",
             "grad_out_ptr": "*bf16", "dw_ptr": "*fp32", "K": "i32", "D": "constexpr",
             "BLOCK_D": "constexpr", "CHUNK": "constexpr", "SPLIT": "constexpr",
             "SCALED": "constexpr"}
    build("score-int8", _score_grad_kernel, score,
          {"D": 768, "BLOCK_D": 256, "CHUNK": 8, "SPLIT": 2, "SCALED": True}, warps=1)
    build("score-bf16", _score_grad_kernel, {**score, "values_ptr": "*bf16"},
          {"D": 768, "BLOCK_D": 256, "CHUNK": 8, "SPLIT": 2, "SCALED": False}, warps=1)
    walk = {"grad_out_ptr": "*i8", "values_ptr": "*bf16", "ws_ptr": "*fp32",
            "bags_ptr": "*i64", "srows_ptr": "*i32", "ordinal_ptr": "*i32", "seg_ptr": "*i64",
            "grad_values_ptr": "*bf16", "heads_ptr": "*fp32", "tails_ptr": "*fp32",
            "parts_ptr": "*fp32", "gscales_ptr": "*bf16", "E": "i32", "CHUNK": "i32",
            "D": "constexpr", "DENSE_OUT": "constexpr", "WRITE_DV": "constexpr",
            "WRITE_DW": "constexpr", "BLOCK_D": "constexpr", "STAGES": "constexpr",
            "GSCALED": "constexpr"}
    for gscaled in (True, False):
        build(f"walk-{'int8' if gscaled else 'bf16'}", _bwd_kernel,
              {**walk, "grad_out_ptr": "*i8" if gscaled else "*bf16"},
              {"D": 768, "DENSE_OUT": False, "WRITE_DV": True, "WRITE_DW": False,
               "BLOCK_D": 256, "STAGES": 1, "GSCALED": gscaled}, warps=1)
    # The presets' row Adam step with the split master (bf16 table, int16 remainders,
    # bf16 moments, the clip's scale), element-wise and with a row-wise v.
    adam = {"param_ptr": "*bf16", "rows_ptr": "*i64", "grad_ptr": "*bf16",
            "exp_avg_ptr": "*bf16", "exp_avg_sq_ptr": "*bf16", "D": "i32", "n_dtiles": "i32",
            "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
            "one_minus_beta2": "fp32", "decay": "fp32", "sqrt_bc2": "fp32", "eps": "fp32",
            "neg_step_size": "fp32", "seed": "i32", "param_seed": "i32", "master_ptr": "*i16",
            "scale_ptr": "*fp32", "DENSE": "constexpr", "DECAY": "constexpr",
            "BLOCK_D": "constexpr", "BF16_M": "constexpr", "BF16_V": "constexpr",
            "BF16_P": "constexpr", "MASTER": "constexpr", "SCALE": "constexpr"}
    flags = {"DENSE": False, "DECAY": False, "BF16_M": True, "BF16_P": True,
             "MASTER": SPLIT_MASTER, "SCALE": True}
    build("adam-split", row_adam_kernel, adam,
          {**flags, "BLOCK_D": ADAM_BLOCK_D, "BF16_V": True}, warps=ADAM_WARPS)
    build("adam-split-rowwise", row_adam_rowwise_kernel, {**adam, "exp_avg_sq_ptr": "*fp32"},
          {**flags, "BLOCK_D": 1024, "BF16_V": False}, warps=4)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def ptx():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9 warns when unset (its default: on)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_kernels_compile_for_a_gpu(ptx):
    assert set(ptx) == {"pack-bf16-False", "pack-bf16-True", "pack-fp32-False",
                        "pack-fp32-True", "pack-d1", "pack-d300", "score-int8", "score-bf16",
                        "walk-int8", "walk-bf16", "adam-split",
                        "adam-split-rowwise"}  # fmt: skip
    assert all(".entry" in code for code in ptx.values())


def test_the_packing_rounds_as_torch_does(ptx):
    # Correctly rounded divisions (absmax / 127, w / s) without flushing subnormals, and
    # the round-to-even by adding and taking away 1.5 · 2**23, not folded away.
    for name in ("pack-bf16-False", "pack-fp32-True", "pack-d300"):
        code = ptx[name]
        assert "div.rn.f32" in code and "div.full" not in code and "div.approx" not in code
        assert ".ftz" not in code
        assert "0f4B400000" in code and "0fCB400000" in code  # + 1.5·2**23, − 1.5·2**23


def test_the_split_master_step_keeps_ieee_arithmetic(ptx):
    # The step's square root and divisions correctly rounded, subnormals kept (the
    # reference's bits); every element-wise store 16 bits wide (table, remainder, moments:
    # no fp32 master written), the row-wise v's one fp32 a row.
    for name in ("adam-split", "adam-split-rowwise"):
        code = ptx[name]
        assert "sqrt.rn.f32" in code and "div.rn.f32" in code and ".ftz" not in code
        stores = re.findall(r"\bst\.global\.(\w+)", code)
        assert stores.count("b16") >= 3 and set(stores) <= {"b16", "b32"}
        assert stores.count("b32") == (1 if "rowwise" in name else 0)
