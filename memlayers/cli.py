"""The ``memlayers`` command, the one front door: every argument parser lives here.

    memlayers train                                   # the main job: tiny Memory+ on bios
    memlayers train [CONFIG.yaml ...] [key=value ...] [--resume | --overwrite] [--print-config]
    memlayers eval runs/tiny-memory-plus [--qa FILE.jsonl]
    memlayers generate runs/tiny-memory-plus --prompt "Which city was ... born in?"
    memlayers compare tiny-dense tiny-memory+
    memlayers consolidate runs/big runs/big-single
    memlayers quantize runs/tiny-memory-plus --bits 8|4 [--group G] [--out DIR]
    memlayers finetune runs/tiny-memory-plus --data NEW.txt [--method sparse-memory|full|lora]
    memlayers data {list,fetch,build}
    memlayers lm-eval runs/tiny-memory-plus --tasks arc_easy   # lm-evaluation-harness
    memlayers export runs/tiny-memory-plus hf/tiny-memory-plus   # transformers format
    memlayers COMMAND --help
    memlayers --debug COMMAND ...                     # an error's traceback, not one line
    python -m memlayers ...                           # the same (and torchrun -m memlayers)

One ``_add_<command>`` function per subcommand declares its arguments and a handler that
calls plain library functions (:func:`memlayers.train.train`,
:func:`memlayers.evaluation.evaluate`, ...); the library modules parse nothing and never import
this one. Each subcommand's ``--help`` shows its library module's docstring of examples.
``data`` has sub-commands of its own (list, fetch, build: :mod:`memlayers.data.corpus`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch.distributed as dist

from memlayers import checkpoint, compare, config, finetune, generate, quantize, train
from memlayers import eval as evaluation
from memlayers.data import corpus

# What a user's input can cause (a bad config or path, a missing or corrupted checkpoint, a
# diverged run, a failed download, an optional extra not installed: transformers, gguf,
# lm-eval): one `error:` line and a non-zero exit, no traceback; `memlayers --debug ...`
# re-raises to show it.
USER_ERRORS = (
    ValueError, OSError, ImportError, checkpoint.CheckpointError, train.NonFiniteLossError,
    corpus.FetchError,
)  # fmt: skip


def _error(e: Exception, rc: int = 1) -> int:
    msg = str(e)
    if isinstance(e, OSError) and e.strerror and e.filename is not None:  # not "[Errno 17] ..."
        msg = f"{e.strerror}: {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    if isinstance(e, ImportError) and "pip install" not in msg:
        # not a missing extra that names its install (memlayers.hf's): show where it was
        msg += " (memlayers --debug COMMAND ... shows the traceback)"
    print(f"error: {msg}", file=sys.stderr)
    return rc


def _subparser(sub, name: str, help_text: str, module, handler) -> argparse.ArgumentParser:
    """A subcommand described by ``module``'s docstring (or by ``module`` itself, a string,
    for commands whose module needs an optional extra to import)."""
    p = sub.add_parser(
        name,
        help=help_text,
        description=module if isinstance(module, str) else module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=handler)
    return p


# ---- train -------------------------------------------------------------------------------


def _add_train(sub) -> None:
    p = _subparser(
        sub, "train", "train or resume a model (CPU, one GPU or torchrun)", train, _train
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="CONFIG.yaml | key=value",
        help="YAML config files (merged in order), then dotted overrides, e.g. optim.lr=1e-3",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--resume", action="store_true", help="continue from run_dir's latest checkpoint"
    )
    how.add_argument(
        "--resume-from",
        metavar="CHECKPOINT",
        help="continue from this checkpoint directory: one of run_dir's own (the newer ones "
        "are set aside, not deleted) or another run's (run_dir must then hold no run)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in run_dir first (without it: an error); with "
        "--resume-from, a checkpoint outside run_dir",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _final_evaluation(args: config.TrainArgs) -> dict:
    """``memlayers eval`` of the finished run (one process): writes
    ``run_dir/eval/results.json`` and prints the table, then the QA accuracy and the bits
    stored as the last lines."""
    t0 = time.perf_counter()
    results = evaluation.evaluate(args.run_dir, device=args.device, progress=args.logging.progress)
    print(evaluation.format_results(results))
    print(f"eval: {time.perf_counter() - t0:.0f}s; {Path(args.run_dir) / 'eval' / 'results.json'}")
    if evaluation.headline(results):
        print(evaluation.headline(results))
    return results


def _train(ns: argparse.Namespace) -> int:
    # A config file first: a compare variant's folder has '=' in its name.
    yamls = [a for a in ns.items if _is_yaml(a) or "=" not in a]
    overrides = [a for a in ns.items if a not in yamls]
    try:
        args = config.load_config(yamls, overrides)
    except ValueError as e:
        if ns.debug:
            raise
        return _error(e, 2)
    if ns.print_config:
        print(config.to_yaml(args), end="")
        return 0
    if ns.resume and ns.overwrite:
        return _error(ValueError("--resume continues the run in run_dir: not with --overwrite"), 2)
    resume = ns.resume_from or ("latest" if ns.resume else None)
    try:
        if resume is not None:
            checkpoint.resolve_checkpoint(args.run_dir if resume == "latest" else resume)
        train.train(args, resume=resume, overwrite=ns.overwrite)
        if dist.is_initialized():
            dist.barrier()  # gloo aborts a rank that tears down while another still talks
        if args.final_eval and int(os.environ.get("RANK", "0")) == 0:
            _final_evaluation(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ---- consolidate -------------------------------------------------------------------------


def _add_consolidate(sub) -> None:
    p = sub.add_parser(
        "consolidate",
        help="a (DCP) checkpoint -> one safetensors file",
        description=checkpoint.consolidate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=_consolidate)
    p.add_argument("checkpoint", help="a step directory, checkpoints/ or a run directory")
    p.add_argument("out", help="directory to write the single-file checkpoint into")


def _consolidate(ns: argparse.Namespace) -> int:
    path = checkpoint.consolidate(ns.checkpoint, ns.out)
    print(f"wrote {path}")
    return 0


# ---- quantize ----------------------------------------------------------------------------


def _add_quantize(sub) -> None:
    p = _subparser(
        sub, "quantize", "int8 / 4-bit value tables for serving (a new run)", quantize, _quantize
    )
    p.add_argument("run", metavar="RUN", help="a run directory or one of its checkpoints")
    p.add_argument(
        "--bits",
        type=int,
        required=True,
        choices=(8, 4),
        help="8: int8, a scale per row; 4: two columns a byte, a scale per group",
    )
    p.add_argument(
        "--group",
        type=int,
        default=None,
        help="columns per scale (default: the whole row for 8 bits, 32 for 4 bits)",
    )
    _add_derived_run(p, "RUN-int<bits>", "where to load and quantize: cpu | cuda[:N]")


def _add_derived_run(p, default_out: str, device_help: str) -> None:
    """The options of a command that writes a new run made from RUN (quantize, finetune)."""
    p.add_argument("--out", default=None, help=f"new run directory (default: {default_out})")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out (without: an error)"
    )
    p.add_argument("--device", default="cpu", help=device_help)


def _quantize(ns: argparse.Namespace) -> int:
    r = quantize.quantize_run(
        ns.run, ns.bits, ns.group, ns.out, ns.overwrite, ns.device, progress=sys.stderr.isatty()
    )
    print(
        f"value table: {r.bytes_before:,} bytes -> {r.bytes_after:,} bytes "
        f"(int{r.bits}, group {r.group}; {r.bytes_before / r.bytes_after:.2f}x smaller)"
    )
    print(f"wrote {r.checkpoint} (from {r.source})")
    return 0


# ---- finetune ----------------------------------------------------------------------------


def _add_finetune(sub) -> None:
    p = _subparser(
        sub, "finetune", "teach a run new text: sparse-memory, full or LoRA (a new run)",
        finetune, _finetune,
    )  # fmt: skip
    d = finetune.FinetuneArgs()
    p.add_argument("run", metavar="RUN", help="a run directory or one of its checkpoints")
    p.add_argument("--data", required=True, help="UTF-8 text, one document per line")
    p.add_argument("--method", default=d.method, choices=finetune.METHODS)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--lr", type=float, default=None,
        help="constant learning rate (default: the run's optim.value_lr for sparse-memory, "
        "optim.lr otherwise)",
    )  # fmt: skip
    p.add_argument(
        "--top-t", type=int, default=d.top_t, help="sparse-memory: rows updated per step"
    )
    p.add_argument(
        "--per-document", action="store_true",
        help="sparse-memory: --top-t rows per document of the batch (their union), not per batch",
    )  # fmt: skip
    p.add_argument("--rank", type=int, default=d.rank, help="lora: adapter rank")
    p.add_argument("--alpha", type=float, default=d.alpha, help="lora: scale alpha/rank")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's")
    p.add_argument(
        "--background", default=None,
        help="sparse-memory: background text file (default: the run's training split)",
    )  # fmt: skip
    p.add_argument("--background-batches", type=int, default=d.background_batches)
    p.add_argument("--seed", type=int, default=d.seed)
    _add_derived_run(p, "RUN-ft-<method>", "cpu | cuda[:N]")


def _finetune(ns: argparse.Namespace) -> int:
    args = finetune.FinetuneArgs(
        method=ns.method, steps=ns.steps, lr=ns.lr, top_t=ns.top_t, rank=ns.rank,
        alpha=ns.alpha, batch_size=ns.batch_size, background_batches=ns.background_batches,
        seed=ns.seed, per_document=ns.per_document,
    )  # fmt: skip
    r = finetune.finetune(ns.run, ns.data, args, ns.background, ns.out, ns.overwrite, ns.device)
    losses = r.record["losses"]
    print(
        f"{args.method}: {args.steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        + (
            f", {sum(r.record['rows_updated']) / len(losses):.0f} rows updated per step"
            if r.record["rows_updated"]
            else ""
        )
    )
    print(f"wrote {r.checkpoint} (from {r.source})")
    return 0


# ---- eval --------------------------------------------------------------------------------


def _add_eval(sub) -> None:
    p = _subparser(
        sub, "eval", "perplexity, QA, knowledge bits, memory usage of a run", evaluation, _eval
    )
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or one of its checkpoints")
    p.add_argument(
        "--qa",
        action="append",
        default=[],
        metavar="FILE.jsonl",
        help='extra QA set: one {"question", "answers": [...], "context"?} per line (repeatable)',
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--max-qa", type=int, default=None, help="first N records of each set")
    p.add_argument(
        "--max-val-tokens",
        type=int,
        default=evaluation.MAX_VAL_TOKENS,
        help="perplexity tokens (0: all)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=evaluation.MAX_NEW_TOKENS,
        help="greedy answer length",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--no-builtin-qa", action="store_true", help="skip the dataset's own held-out QA"
    )
    p.add_argument("--json", action="store_true", help="print the JSON instead of a table")
    _offload_arg(p, "the same numbers")


def _offload_arg(p: argparse.ArgumentParser, why: str) -> None:
    p.add_argument(
        "--offload",
        action="store_true",
        help=f"keep the value tables in host memory ({why}; see memlayers.offload): "
        "memory-mapped, the rows each lookup reads gathered to the device (a sync a "
        "lookup; any table size)",
    )
    p.add_argument(
        "--zero-copy",
        action="store_true",
        help="with --offload (implied): the tables read into RAM and page-locked, the GPU "
        "reading the rows in place, no sync (compiles and CUDA-graphs; the table must "
        "fit in RAM)",
    )


def _offload(ns: argparse.Namespace) -> bool | str:
    """The ``offload`` argument of --offload / --zero-copy."""
    return "zero-copy" if ns.zero_copy else ns.offload


def _eval(ns: argparse.Namespace) -> int:
    r = evaluation.evaluate(
        ns.run,
        qa=ns.qa,
        device=ns.device,
        max_qa=ns.max_qa,
        max_val_tokens=ns.max_val_tokens or None,
        max_new_tokens=ns.max_new_tokens,
        batch_size=ns.batch_size,
        builtin_qa=not ns.no_builtin_qa,
        progress=sys.stderr.isatty(),
        offload=_offload(ns),
    )
    print(json.dumps(r, indent=2) if ns.json else evaluation.format_results(r))
    if not ns.json:
        print(f"wrote {r['results_path']}")
    return 0


# ---- generate ----------------------------------------------------------------------------


def _add_generate(sub) -> None:
    p = _subparser(sub, "generate", "continue a prompt with a trained run", generate, _generate)
    p.add_argument("run", metavar="RUN_DIR", help="a run directory or one of its checkpoints")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("-n", type=int, default=1, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--quantized",
        type=int,
        choices=(8, 4),
        default=None,
        metavar="BITS",
        help="quantize a float run's value tables on the fly (8 | 4; see memlayers quantize)",
    )
    p.add_argument("--group", type=int, default=None, help="columns per scale with --quantized")
    _offload_arg(p, "for a table that does not fit there")
    p.add_argument(
        "--compile",
        action="store_true",
        help="static KV cache, decode step through torch.compile and, on a GPU, a CUDA graph "
        "(same tokens; see memlayers.decoding)",
    )


def _generate(ns: argparse.Namespace) -> int:
    texts = generate.generate(
        ns.run, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_p, ns.n, ns.seed, ns.device,
        quantized=ns.quantized, group=ns.group, offload=_offload(ns), compile=ns.compile,
    )  # fmt: skip
    for t in texts:
        print(ns.prompt + t)
    return 0


# ---- compare -----------------------------------------------------------------------------


def _add_compare(sub) -> None:
    p = _subparser(
        sub, "compare", "train variants on the same data; table and plot", compare, _compare
    )
    p.add_argument(
        "items",
        nargs="+",
        metavar="PRESET[:k=v…] | CONFIG.yaml | key=value",
        help="variants (model presets), then shared YAML files (a study file's compare: "
        "section adds its variants) and dotted overrides",
    )
    p.add_argument(
        "--out", default=None, help="output directory (default: a study's out, or runs/compare)"
    )
    p.add_argument(
        "--reuse", action="store_true", help="keep variants already trained with the same config"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="train this many variants at once, each in its own process logging to "
        "OUT/<variant>.log (on one GPU they share it; default 1: one after another, here)",
    )
    p.add_argument(
        "--rates",
        default=None,
        metavar="LR,LR,…",
        help="run each variant at each of these learning rates (optim.lr) and add a table "
        "of each model at its best (overrides a study's compare.rates)",
    )
    p.add_argument(
        "--seeds",
        default=None,
        metavar="S,S,…",
        help="run each variant at each of these seeds (initialization; the data stays) and "
        "add a table of the means (overrides a study's compare.seeds)",
    )
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)  # run_jobs'


def _is_yaml(item: str) -> bool:
    """A positional item naming a config file (its path may hold '=': compare's folders)."""
    return item.endswith((".yaml", ".yml"))


def split_items(items: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(variants, yaml files, overrides) from ``memlayers compare``'s positional items."""
    variants, yamls, overrides = [], [], []
    for it in items:
        if _is_yaml(it):
            yamls.append(it)
        elif "=" in it.split(":", 1)[0]:
            overrides.append(it)
        else:
            variants.append(it)
    return variants, yamls, overrides


def _compare(ns: argparse.Namespace) -> int:
    variants, yamls, overrides = split_items(ns.items)
    command = shlex.join(
        ["memlayers", "compare", *ns.items]
        + (["--out", ns.out] if ns.out is not None else [])
        + (["--reuse"] if ns.reuse else [])
        + ([f"--jobs={ns.jobs}"] if ns.jobs != 1 else [])
        + ([f"--rates={ns.rates}"] if ns.rates is not None else [])
        + ([f"--seeds={ns.seeds}"] if ns.seeds is not None else [])
    )
    for v in variants:
        compare.parse_variant(v)
    out, max_qa, named = ns.out, None, bool(variants)
    rates = None if ns.rates is None else compare.check_rates(ns.rates, "--rates")
    seeds = None if ns.seeds is None else compare.check_seeds(ns.seeds, "--seeds")
    for y in yamls:  # a study file brings its variants, unless the command line names some
        study = compare.read_study(y)
        if study:
            variants += [] if named else study["variants"]
            out = out or study["out"]
            max_qa = study["max_qa"] or max_qa
            rates = rates or study["rates"]
            seeds = seeds or study["seeds"]
    if ns.no_table:  # a run_jobs process: its one variant, already at its rate and seed
        rates = seeds = None
    compare.compare(variants, yamls, overrides, out or "runs/compare", ns.reuse, command, max_qa,
                    jobs=ns.jobs, table=not ns.no_table, rates=rates, seeds=seeds)  # fmt: skip
    return 0


# ---- export ------------------------------------------------------------------------------

EXPORT_DOC = """A run as a Hugging Face transformers model directory (memlayers.export, hf extra).

    memlayers export runs/tiny-memory-plus hf/tiny-memory-plus [--overwrite]

Dense and Memory+ runs; load with memlayers.hf.load_pretrained_with_memory (memory
blocks) or transformers.AutoModelForCausalLM (dense only), and AutoTokenizer.
"""


def _add_export(sub) -> None:
    help_text = "write a run as a transformers model directory (Llama + Memory+)"
    p = _subparser(sub, "export", help_text, EXPORT_DOC, _export)
    p.add_argument("run", metavar="RUN", help="a run directory or one of its checkpoints")
    p.add_argument("out", metavar="OUT", help="the model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (whole)")


def _export(ns: argparse.Namespace) -> int:
    from memlayers import export, hf

    out = export.export_run(ns.run, ns.out, ns.overwrite)
    # AutoModelForCausalLM would load a memory model as the plain Llama: memory weights
    # dropped, those blocks' MLPs fresh (the config's memlayers entry marks one)
    with_memory = hf.CONFIG_KEY in json.loads((out / "config.json").read_text())
    if with_memory:
        how = "memlayers.hf.load_pretrained_with_memory (not AutoModelForCausalLM: memory blocks)"
    else:
        how = "transformers.AutoModelForCausalLM"
    print(f"wrote {out} (load: {how})")
    return 0


# ---- lm-eval -----------------------------------------------------------------------------

LM_EVAL_DOC = """Standard benchmarks with lm-evaluation-harness (pip install 'memlayers[eval]').

    memlayers lm-eval runs/x --tasks arc_easy,hellaswag --batch-size 16
    memlayers lm-eval runs/x --tasks my_task --include-path my_tasks/ --limit 100
    memlayers lm-eval smollm2-memory --hf --tasks arc_easy --output arc.json
    memlayers lm-eval smollm2-memory --hf --tokenizer HuggingFaceTB/SmolLM2-135M --tasks ...

RUN is a run directory or checkpoint; with --hf, a Hugging Face model directory saved
after memlayers.hf.add_memory, with its tokenizer beside it (tokenizer.save_pretrained)
or named by --tokenizer. Library: memlayers.lm_eval_adapter (model types "memlayers" and
"memlayers-hf" for lm_eval.simple_evaluate).
"""


def _add_lm_eval(sub) -> None:
    help_text = "standard benchmarks through lm-evaluation-harness (the eval extra)"
    p = _subparser(sub, "lm-eval", help_text, LM_EVAL_DOC, _lm_eval)
    p.add_argument("run", metavar="RUN", help="a run directory or checkpoint (--hf: a model dir)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--hf", action="store_true", help="RUN is a retrofitted HF model directory")
    p.add_argument(
        "--tokenizer", default=None,
        help="--hf: a tokenizer directory or hub name (default: the one saved in RUN)",
    )  # fmt: skip
    p.add_argument("--include-path", default=None, help="a folder of task YAML files of yours")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (<1: fraction)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--output", default=None, help="write the results dict here (JSON)")


def _lm_eval(ns: argparse.Namespace) -> int:
    try:  # the eval extra (and hf, for --hf) may be missing: one line that names it
        from memlayers import lm_eval_adapter

        results = lm_eval_adapter.evaluate_tasks(
            ns.run, [t for t in ns.tasks.split(",") if t], ns.hf, ns.include_path,
            ns.num_fewshot, ns.limit, ns.batch_size, ns.device, tokenizer=ns.tokenizer,
        )  # fmt: skip
    except ImportError as e:
        if ns.debug:
            raise
        return _error(e)
    from lm_eval.utils import make_table

    print(make_table(results))
    if ns.output:
        from memlayers.files import write_atomic

        Path(ns.output).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(ns.output, json.dumps(results, indent=2, default=str))
        print(f"wrote {ns.output}")
    return 0


# ---- data --------------------------------------------------------------------------------


def _add_data(sub) -> None:
    p = _subparser(sub, "data", "fetch and build the pretraining corpus", corpus, _data)
    data_sub = p.add_subparsers(dest="data_cmd", required=True)
    left_out = [s for s in corpus.SOURCES if s not in corpus.DEFAULT_SOURCES]
    sources_help = (
        f"comma list of source names (default: 'default', DEFAULT_SOURCES: "
        f"{len(corpus.DEFAULT_SOURCES)} of the {len(corpus.SOURCES)} sources, all but "
        f"{' and '.join(left_out)}; names: memlayers data list)"
    )
    for cmd, what in (
        ("list", "the pinned sources and what is cached"),
        ("fetch", "download, verify and clean sources"),
        ("build", "deduplicate, train a tokenizer, write token shards"),
    ):
        q = data_sub.add_parser(cmd, help=what)
        q.add_argument("--cache", default=None, help="cache dir ($MEMLAYERS_CACHE)")
        if cmd != "list":
            q.add_argument("--sources", default="default", help=sources_help)
        if cmd == "build":
            q.add_argument("--tokenizer", default="bpe-8192", help="bpe-<vocab> or a path")
            q.add_argument("--val-frac", type=float, default=0.01)


def _data(ns: argparse.Namespace) -> int:
    if ns.data_cmd == "list":
        for line in corpus.describe_sources(ns.cache):
            print(line)
        return 0
    if ns.data_cmd == "fetch":
        m = corpus.fetch(ns.sources, ns.cache)
        for name in corpus.parse_sources(ns.sources):
            e = m["sources"][name]
            print(f"{name}: {e['documents']} documents, {e['chars'] / 1e6:.1f}M chars")
    else:
        shards = corpus.build(ns.sources, ns.tokenizer, ns.cache, ns.val_frac)
        print(
            f"{shards.path}: {shards.meta['n_train']:,} train / "
            f"{shards.meta['n_val']:,} val tokens, vocab {shards.meta['vocab_size']}"
        )
    return 0


# ---- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memlayers",
        description="Memory-layer language models: train, eval, generate, compare, data.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (before COMMAND)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_train, _add_consolidate, _add_quantize, _add_finetune, _add_eval, _add_generate,
        _add_compare, _add_export, _add_lm_eval, _add_data,
    ):  # fmt: skip
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except USER_ERRORS as e:
        if ns.debug:
            raise
        return _error(e)
