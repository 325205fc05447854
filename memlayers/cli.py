"""The ``memlayers`` command: one subcommand per entry-point module.

    memlayers train                                   # the main job: tiny Memory+ on bios
    memlayers train [CONFIG.yaml ...] [key=value ...] [--resume] [--print-config]
    memlayers eval runs/tiny-memory-plus [--qa FILE.jsonl]
    memlayers generate runs/tiny-memory-plus --prompt "Which city was ... born in?"
    memlayers compare tiny-dense tiny-memory+
    memlayers data {list,fetch,build}
    memlayers COMMAND --help

Each subcommand module exposes ``add_arguments(parser)`` (which sets ``func``) and keeps
its own docstring of examples; adding one is one line in :data:`COMMANDS`. ``data`` comes
with its own sub-commands (:func:`memlayers.data.corpus.add_subparser`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("memlayers.train", "train or resume a model (CPU, one GPU or torchrun)"),
    "consolidate": ("memlayers.consolidate", "a (DCP) checkpoint -> one safetensors file"),
    "eval": ("memlayers.eval", "perplexity, QA, knowledge bits, memory usage of a run"),
    "generate": ("memlayers.generate", "continue a prompt with a trained run"),
    "compare": ("memlayers.compare", "train variants on the same data; table and plot"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memlayers",
        description="Memory-layer language models: train, eval, generate, compare, data.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
    from memlayers.data.corpus import add_subparser

    add_subparser(sub)
    return parser


def module_main(command: str, argv: list[str] | None = None) -> None:
    """``python -m memlayers.<module>``: the subcommand ``command`` without the prefix."""
    sys.exit(main([command, *(sys.argv[1:] if argv is None else argv)]))


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
