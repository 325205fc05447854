"""``memlayers data {list,fetch,build}``: parses the arguments and calls the library
(:mod:`memlayers.data.corpus`); the CLI adds it with :func:`add_subparser`."""

from __future__ import annotations

import argparse
import sys

from memlayers.data.corpus.archives import FetchError
from memlayers.data.corpus.shards import build, describe_sources, fetch, parse_sources


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``data {list,fetch,build}`` to an argparse subparsers object; the parsed
    namespace's ``func`` runs the command and returns an exit code."""
    p = subparsers.add_parser("data", help="fetch and build the pretraining corpus")
    _configure(p)
    return p


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_cmd", required=True)
    for cmd, what in (
        ("list", "the pinned sources and what is cached"),
        ("fetch", "download, verify and clean sources"),
        ("build", "deduplicate, train a tokenizer, write token shards"),
    ):
        q = sub.add_parser(cmd, help=what)
        q.add_argument("--cache", default=None, help="cache dir ($MEMLAYERS_CACHE)")
        if cmd != "list":
            q.add_argument("--sources", default="default", help="comma list (default: all)")
        if cmd == "build":
            q.add_argument("--tokenizer", default="bpe-8192", help="bpe-<vocab> or a path")
            q.add_argument("--val-frac", type=float, default=0.01)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data_cmd == "list":
        for line in describe_sources(args.cache):
            print(line)
        return 0
    try:
        if args.data_cmd == "fetch":
            m = fetch(args.sources, args.cache)
            for name in parse_sources(args.sources):
                e = m["sources"][name]
                print(f"{name}: {e['documents']} documents, {e['chars'] / 1e6:.1f}M chars")
        else:
            shards = build(args.sources, args.tokenizer, args.cache, args.val_frac)
            print(
                f"{shards.path}: {shards.meta['n_train']:,} train / "
                f"{shards.meta['n_val']:,} val tokens, vocab {shards.meta['vocab_size']}"
            )
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m memlayers.data.corpus fetch|build|list`` (same as ``memlayers data``)."""
    parser = argparse.ArgumentParser(prog="memlayers data")
    _configure(parser)
    args = parser.parse_args(argv)
    return args.func(args)
