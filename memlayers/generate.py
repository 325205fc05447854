"""Continue a prompt with a trained run's model (greedy or sampled).

    memlayers generate runs/tiny-memory-plus --prompt "Which city was Anya Briar Forger born in?"
    memlayers generate runs/x --prompt "The capital of France is" --max-new-tokens 20
    memlayers generate runs/x --prompt "Once" --temperature 0.8 --top-p 0.9 --seed 1 -n 3
    memlayers generate runs/tiny-memory-plus-int8 --prompt "..."   # a quantized run
    memlayers generate runs/tiny-memory-plus --quantized 4 --prompt "..."   # quantized here
    memlayers generate runs/tiny-memory-plus --offload --prompt "..."   # tables on the host
    memlayers generate runs/tiny-memory-plus --zero-copy --prompt "..."   # read in place
    memlayers generate runs/x --compile --prompt "..."   # compiled decode step (CUDA graph)

The prompt is encoded with the run's tokenizer after an EOS (documents in the packed
training stream start after one), so it reads like the start of a training document.
Only ids the tokenizer can decode are emitted: a model whose embedding is padded past its
tokenizer (a pretrained one's, ``model.hf``) decodes over the tokenizer's ids alone
(:func:`memlayers.model.restrict_vocab_`).
A quantized run (``memlayers quantize``) loads as it was saved; ``--quantized 8|4``
quantizes a float run's value tables after loading, for this call only
(:func:`memlayers.quantize.quantize_tables_`). ``--offload`` keeps the value tables
memory-mapped in host memory and gathers the rows each token reads to the device, for a
table that does not fit there (:mod:`memlayers.offload`); it composes with both.
``--zero-copy`` (implies ``--offload``) page-locks the tables in host RAM instead and the
GPU reads the rows in place, with no host sync (with ``--quantized``, only the packed
tables are page-locked). ``--compile`` decodes with a static KV cache and the decode step
through ``torch.compile``, replayed from a CUDA graph on a GPU (:mod:`memlayers.decoding`):
the same tokens, faster once compiled (the first call pays the compilation). Tables
offloaded with ``--offload`` (gather) and MoE blocks are compiled but not graph-captured:
their lookups need the host; ``--zero-copy`` tables are captured.
"""

from __future__ import annotations

import torch

from memlayers.decoding import graph_blockers, static_generate
from memlayers.eval import EvalError
from memlayers.model import check_sampling
from memlayers.offload import set_offload_mode_
from memlayers.ops.offloaded import offload_mode
from memlayers.ops.quantized import resolve_group
from memlayers.quantize import quantize_tables_, table_format
from memlayers.run import load_run


def generate(
    run_dir: str,
    prompt: str,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int = 0,
    device: str = "auto",
    quantized: int | None = None,
    group: int | None = None,
    offload: bool | str = False,
    compile: bool = False,
) -> list[str]:
    """``n`` continuations of ``prompt`` (text after the prompt, up to EOS); with
    ``quantized`` (8 or 4) the value tables are quantized first (``group``: columns per
    scale); with ``offload`` (``True``/``"gather"`` or ``"zero-copy"``) they stay in host
    memory (:mod:`memlayers.offload`); with
    ``compile`` the decode step is compiled, and captured in a CUDA graph on a GPU when
    it can be (:func:`memlayers.decoding.static_generate`)."""
    check_sampling(max_new_tokens, temperature, top_p)  # before loading anything
    if n < 1:
        raise ValueError(f"n (the number of samples) must be >= 1, got {n}")
    if quantized is not None:
        resolve_group(quantized, group, 2)  # bits and group, before loading anything
    elif group is not None:
        raise ValueError(f"group={group} needs quantized=8|4 (--quantized)")
    mode = offload_mode(offload) if offload else None
    # Zero-copy and quantized here: the float tables are loaded mapped (gather), quantized
    # from the mapping, and only the packed ones page-locked (a zero-copy load would copy
    # the float tables out of the file and page-lock them first: 4.3 GB for the 373m
    # preset's fp32 table, to pin 0.6 GB of int4).
    zero_copy_packed = quantized is not None and mode == "zero-copy"
    # decodable: a padded embedding's extra ids (a pretrained model's) are never emitted
    run = load_run(
        run_dir, device, offload="gather" if zero_copy_packed else offload, decodable=True
    )
    tok, model = run.tokenizer, run.model
    if quantized is not None:
        table = table_format(model)
        if table is not None and table["format"].startswith("int"):
            raise ValueError(
                f"{run.checkpoint} is quantized already ({table['format']}): drop --quantized"
            )
        quantize_tables_(model, quantized, group)
        if zero_copy_packed:
            set_offload_mode_(model, "zero-copy")
    if tok is None:
        raise EvalError(f"{run.run_dir}: the dataset has no tokenizer, so no text to generate")
    try:
        ids = [tok.eos_id] + tok.encode(prompt)
    except KeyError as e:  # the closed bios vocabulary
        raise EvalError(f"cannot encode the prompt: {e.args[0]}") from None
    device_ = next(model.parameters()).device
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise EvalError(
            f"the prompt has {len(ids)} tokens; max_seq_len is {model.config.max_seq_len}"
        )
    x = torch.tensor([ids] * n, device=device_)  # [n, T0]
    gen = torch.Generator(device=device_).manual_seed(seed)
    new = min(max_new_tokens, room)
    if compile:
        graph = device_.type == "cuda" and not graph_blockers(model)
        out = static_generate(model, x, new, temperature, top_p, tok.eos_id, gen,
                              compile=True, cuda_graph=graph)  # fmt: skip
    else:
        out = model.generate(x, new, temperature, top_p, eos_id=tok.eos_id, generator=gen)
    texts = []
    for row in out[:, len(ids) :].tolist():
        row = row[: row.index(tok.eos_id)] if tok.eos_id in row else row
        texts.append(tok.decode(row))
    return texts
