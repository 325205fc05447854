"""Test setup: Triton kernels run in the interpreter when there is no GPU.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any
test imports memlayers' Triton modules. On a CUDA machine the real kernels run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Import Triton now, with the variable set: its own @jit helpers (tl.zeros, tl.topk)
    # are decorated at import, and a test that unsets the variable (a monkeypatch) must
    # not be the first to import it, or kernels later run half-interpreted.
    import triton  # noqa: F401


def pytest_addoption(parser):
    parser.addoption(
        "--shard",
        default=None,
        metavar="I/N",
        help="run only every N-th collected test, starting at the I-th (1-based): the GPU "
        "suite split over calls that each fit a time limit (.ci/gpu --shard 1/3, 2/3, 3/3)",
    )


def parse_shard(value: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``1 <= I <= N``; a clear error otherwise."""
    try:
        i, n = (int(part) for part in value.split("/"))
    except ValueError:
        raise ValueError(f"--shard must be I/N with integers, got --shard={value!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"--shard I/N needs 1 <= I <= N, got --shard={value!r}")
    return i, n


def pytest_collection_modifyitems(config, items):
    value = config.getoption("--shard")
    if value is None:
        return
    i, n = parse_shard(value)
    # Round robin over the collection order: a file's slow tests spread over the shards.
    keep = [item for k, item in enumerate(items) if k % n == i - 1]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
