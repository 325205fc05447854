"""Turn a checkpoint of any layout (e.g. DCP from a multi-GPU run) into one safetensors file.

    memlayers consolidate runs/big/checkpoints/step_001000 runs/big-single
    memlayers consolidate runs/big runs/big-single      # the run's latest checkpoint

The result (``OUT/step_XXXXXX/model.safetensors`` + ``meta.json``, ``OUT/latest``) loads
in one process with ``memlayers.load_model_from_checkpoint`` for evaluation and
generation. It holds weights and the trainer state, not the optimizer state.
"""

from __future__ import annotations

import argparse
import sys

from memlayers.checkpoint import CheckpointError, consolidate_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a step directory, checkpoints/ or a run directory")
    parser.add_argument("out", help="directory to write the single-file checkpoint into")
    parser.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    try:
        path = consolidate_checkpoint(ns.checkpoint, ns.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0
