"""Offloaded value tables: the table in host memory, the rows a lookup reads on the device.

A Memory+ value table is most of the model (1.07B of the 373m preset's 1.44B parameters)
while a token reads ``heads · topk`` (128) of its rows, so for serving it need not sit on
the accelerator. A :class:`HostTable` keeps the table on the CPU, in RAM or memory-mapped
from a file (then it may be larger than RAM: the OS pages in the rows lookups touch), and
a lookup (:meth:`HostTable.lookup`, forward only) runs:

1. ``rows, inverse = unique(indices)`` on the device: the U distinct rows read, sorted,
   and every index's position among them;
2. ``rows`` to the host (the one sync: U depends on the data), ``index_select`` of those
   rows from the host table into a pinned staging buffer, one non-blocking copy of the
   compact ``[U, D]`` table to the device;
3. the usual lookup on it with ``inverse`` as indices (:func:`memlayers.ops.
   embedding_bag`, or :func:`memlayers.ops.embedding_bag_quantized` for packed rows).

Step 3 sums the same rows in the same order as a lookup of the whole table on the device,
so the result is the same bit for bit (tests/test_offload.py).

**Zero-copy** (``mode="zero-copy"``): the table is page-locked in host RAM (registered
with CUDA in place, or copied out of a memory-mapped file first) and lookups from the GPU
read its rows *in place*, over the bus: under unified virtual addressing a registered
host address is valid on the device, so the usual lookup kernels run on a CUDA tensor
that aliases the host table (:func:`device_alias`). No ``unique``, no sync, no staging:
the lookup has fixed shapes, compiles with the rest of the model and is captured in a
CUDA graph (:mod:`memlayers.decoding`), and it reads only the rows' bytes (a token's 128
rows, ~200 KB at D = 768 in bf16). The cost: the whole table must fit in page-locked host
RAM (a file larger than RAM needs ``"gather"``). On the CPU the rows are read in place
too (no gather; a file stays mapped). The same rows in the same order: the same sums bit
for bit.

**A device cache of hot rows** (:meth:`HostTable.cache_rows_`, optional): copies of chosen
rows (the most read, :func:`hottest_rows`) stay on the device with a ``[N]`` int32 map
from row to slot (4 bytes a row of the table: 4 MB for the 373m preset's 1M rows); a
lookup then takes the rows it finds there from the cache and gathers only the others from
the host. Still one sync (which rows miss is data), but fewer bytes through the host's
memory and over the bus; the compact table holds the same rows, so the result is still
the same bit for bit. Its hits and reads are counted on the device (:meth:`HostTable.
cache_stats` reads them back). A quantized table
(:mod:`memlayers.ops.quantized`) is offloaded as its packed rows and scales, gathered the
same way. With the device the CPU, step 2 is one ``index_select`` and no copy.

**The file** is a safetensors file (the checkpoint's own ``model.safetensors``, or one
written by :func:`save_table`): an 8-byte little-endian header length ``n``, ``n`` bytes of
JSON ``{name: {"dtype": "F32" | "BF16" | "I8" | "U8" | ..., "shape": [...],
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the tensors' bytes
(row-major, little-endian; offsets count from the end of the header). :func:`map_tensors`
reads the header and maps the file read-only and shared (``mmap.ACCESS_READ``): the
tensors are views of the page cache, never copies, and a mapping larger than RAM is not
charged against memory (a private writable mapping would be, and could be refused). They
must therefore never be written, which a host table never does.
"""

from __future__ import annotations

import copy
import json
import math
import mmap
import os
import sys
import warnings
import weakref
from pathlib import Path

import torch
from safetensors.torch import save_file

from memlayers.ops.embedding_bag import check_bags, embedding_bag
from memlayers.ops.quantized import (
    QuantizedRows,
    check_index_range,
    check_quantized,
    embedding_bag_quantized,
)

# safetensors' dtype names (those a value table can have, and the rest of a checkpoint).
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


# How an offloaded table serves lookups (module docstring): gather the rows read through
# the host (any size, a sync per lookup), or read them in place from page-locked RAM.
OFFLOAD_MODES = ("gather", "zero-copy")


def offload_mode(mode: bool | str) -> str:
    """``mode`` checked: one of :data:`OFFLOAD_MODES` (``True``: ``"gather"``, the
    original ``offload=True``)."""
    if mode is True:
        return "gather"
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload mode must be one of {OFFLOAD_MODES}, got {mode!r}")
    return mode


class _HostBytes:
    """A host tensor's bytes as ``__cuda_array_interface__``, page-locked in place
    (``cudaHostRegister``) for as long as this object lives unless they were already
    (pinned memory, or registered by another alias): ``torch.as_tensor(self)`` is then a
    CUDA tensor over the same memory, which holds this object."""

    def __init__(self, host: torch.Tensor, device: torch.device) -> None:
        self.host = host  # kept alive by this object; unregistered when it is collected
        ptr, size = host.data_ptr(), host.nbytes
        if not host.is_pinned():  # (registering page-locked memory again is an error)
            cudart = torch.cuda.cudart()
            with torch.cuda.device(device):
                err = cudart.cudaHostRegister(ptr, size, 0)
            if int(err) != 0:
                raise RuntimeError(
                    f"cannot page-lock the {size:,}-byte value table in host RAM for "
                    f"zero-copy lookups (cudaHostRegister: {cudart.cudaGetErrorString(err)}); "
                    f"offload it with mode='gather' instead"
                )
            weakref.finalize(self, cudart.cudaHostUnregister, ptr)
        self.__cuda_array_interface__ = {
            "shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3,
            "strides": None,
        }  # fmt: skip


def device_alias(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CUDA tensor on ``device`` over the memory of the contiguous CPU tensor ``host``
    (page-locked in place while the alias lives, if it was not already): reads of it
    cross the bus to host RAM; no copy is made. Unified virtual addressing (64-bit Linux
    and Windows, every card since Fermi) makes the host address valid on the device; the
    bytes are aliased as ``uint8`` (``__cuda_array_interface__`` has no bfloat16) and
    viewed back as ``host``'s dtype and shape."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device_alias makes a CUDA tensor, got device {device}")
    if not torch.cuda.is_available():
        raise ValueError(f"device_alias needs a CUDA device ({device}); none is available")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if host.device.type != "cpu":
        raise ValueError(f"device_alias aliases a CPU tensor, got one on {host.device}")
    if not host.is_contiguous():
        raise ValueError(f"device_alias needs a contiguous tensor, got strides {host.stride()}")
    if host.numel() == 0:
        return torch.empty(host.shape, dtype=host.dtype, device=device)
    alias = torch.as_tensor(_HostBytes(host, device))  # on the device CUDA reports: no copy
    if alias.device != device:
        raise RuntimeError(
            f"the page-locked table belongs to {alias.device}, not {device}: offload it "
            f"with that device current, or with mode='gather'"
        )
    return alias.view(host.dtype).view(host.shape)


class HostTable:
    """A value table ``[N, D]`` in host memory: ``(weight,)`` of a float table, or
    ``(data, scales)`` of a quantized one (``bits``, ``group``, ``dim`` as in
    :class:`memlayers.ops.quantized.QuantizedRows`), CPU tensors, possibly views of a
    memory-mapped ``file``. Lookups gather the rows they read to the indices' device
    (``mode="gather"``), or read them in place from ``device`` (``mode="zero-copy"``:
    the table copied out of its file, if any, and page-locked; :attr:`resident` are the
    tensors lookups from ``device`` read)."""

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        bits: int | None = None,
        group: int | None = None,
        dim: int | None = None,
        file: str | Path | None = None,
        mode: str = "gather",
        device: torch.device | str | None = None,
    ) -> None:
        self.tensors, self.bits, self.group, self.file = tuple(tensors), bits, group, file
        self.mode = offload_mode(mode)
        if bits is None:
            (w,) = self.tensors
            if w.dim() != 2 or not w.is_floating_point():
                raise ValueError(
                    f"a float host table must be [N, D] floating point, got "
                    f"{tuple(w.shape)} {w.dtype}"
                )
            self.dim = w.shape[1]
        else:
            self.dim = dim
            check_quantized(QuantizedRows(*self.tensors, bits, group, dim))
        for t in self.tensors:
            if t.device.type != "cpu":
                raise ValueError(f"a host table lives on the CPU, got a tensor on {t.device}")
        self.device = torch.device(device if device is not None else "cpu")
        self.resident: tuple[torch.Tensor, ...] = ()  # zero-copy: what lookups read
        if self.mode == "zero-copy":
            if self.device.type == "cpu":  # read in place, the file's mapping too
                self.resident = self.tensors
            elif self.device.type == "cuda":
                if not torch.cuda.is_available():
                    raise ValueError(
                        f"zero-copy lookups from {self.device} need a CUDA device; none is "
                        f"available"
                    )
                if self.device.index is None:  # what tensors report
                    self.device = torch.device("cuda", torch.cuda.current_device())
                if file is not None or not all(t.is_contiguous() for t in self.tensors):
                    # Out of the file's shared read-only mapping into anonymous RAM (the
                    # table is read once): what is page-locked must be memory the process
                    # owns. (A tensor memory-mapped some other way, e.g. torch.load(mmap=
                    # True), is registered as it is: offload such a table from its file.)
                    self.tensors = tuple(t.contiguous().clone() for t in self.tensors)
                self.resident = tuple(device_alias(t, self.device) for t in self.tensors)
            else:
                raise ValueError(
                    f"zero-copy lookups read the host table from a CUDA device or the CPU, "
                    f"got device {self.device}"
                )
        self._staging: tuple[torch.Tensor, ...] | None = None  # pinned, reused across lookups
        self._copied = None  # CUDA event: the last copy out of the staging buffers
        # The device cache of hot rows (cache_rows_): slot of every row ([N] int32, -1:
        # not cached), the cached rows' tensors [C, ...], hits and distinct rows read.
        self._slot: torch.Tensor | None = None
        self._cached: tuple[torch.Tensor, ...] = ()
        self._hits = self._reads = None

    def __deepcopy__(self, memo) -> HostTable:
        """A copy that shares the (read-only) table and its device aliases: a deep copy
        of the aliases would put the whole table on the device. Its staging buffers and
        device cache are its own (none yet)."""
        new = copy.copy(self)
        new._staging, new._copied = None, None
        new._slot, new._cached, new._hits, new._reads = None, (), None, None
        return new

    def with_mode(self, mode: str, device: torch.device | str | None = None) -> HostTable:
        """A table over the same host tensors, served in ``mode`` from ``device`` (default:
        this table's): zero-copy page-locks them in place, or copies them out of the file
        first, as at construction. E.g. a float table quantized from its file's mapping in
        gather mode (:meth:`memlayers.memory.MemoryValues.quantize_`), then made zero-copy:
        only the packed rows are page-locked, never the float table."""
        device = self.device if device is None else device
        return HostTable(self.tensors, self.bits, self.group, self.dim, self.file, mode, device)

    @property
    def n_rows(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def dtype(self) -> torch.dtype:
        """The float table's dtype (a quantized table's data dtype)."""
        return self.tensors[0].dtype

    def cache_rows_(self, rows: torch.Tensor, device: torch.device | str) -> None:
        """Keep copies of the table's ``rows [C]`` on ``device`` (replacing any earlier
        cache; an empty ``rows`` drops it): lookups from that device read them there and
        gather only the other rows from the host (module docstring)."""
        if self.mode == "zero-copy":
            raise ValueError(
                "a zero-copy host table reads every row in place: there is nothing to gather "
                "and no device cache to keep (offload with mode='gather' to cache hot rows)"
            )
        rows = torch.unique(rows.detach().to("cpu", torch.int64))  # [C] sorted, distinct
        self._check_rows(rows)
        self._slot, self._cached, self._hits, self._reads = None, (), None, None
        if rows.numel() == 0:
            return
        device = torch.device(device)
        slot = torch.full((self.n_rows,), -1, dtype=torch.int32, device=device)
        slot[rows.to(device)] = torch.arange(rows.numel(), dtype=torch.int32, device=device)
        self._cached = tuple(t.index_select(0, rows).to(device) for t in self.tensors)
        self._slot = slot
        self._hits = torch.zeros((), dtype=torch.int64, device=device)
        self._reads = torch.zeros((), dtype=torch.int64, device=device)

    def cache_stats(self, reset: bool = False) -> dict[str, float] | None:
        """``{"rows", "hits", "reads", "hit_rate"}`` of the device cache since it was
        filled or last reset (distinct rows per lookup; a host sync), or None without a
        cache. ``reset``: zero the counts (on the device, no sync) and return None."""
        if self._slot is None:
            return None
        if reset:
            self._hits.zero_()
            self._reads.zero_()
            return None
        hits, reads = int(self._hits), int(self._reads)
        return {"rows": self._cached[0].shape[0], "hits": hits, "reads": reads,
                "hit_rate": hits / reads if reads else 0.0}  # fmt: skip

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The host tensors' ``rows [U]`` (int64, on the lookup's device), on that device;
        those in the device cache (:meth:`cache_rows_`) taken from it."""
        if self._slot is not None and self._slot.device == rows.device:
            return self._gather_cached(rows)
        return self._gather_host(rows)

    def _gather_cached(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`gather` through the device cache: the compact ``[U, ...]`` tables hold
        the cached rows' copies where they hit and the host's rows where they miss."""
        u = rows.numel()
        if u == 0:
            return tuple(c.new_empty((0, *c.shape[1:])) for c in self._cached)
        slot = self._slot[rows.clamp(0, self.n_rows - 1)]  # [U] int32 (range checked below)
        hit = slot >= 0  # [U]
        self._hits += hit.sum()
        self._reads += u
        order = torch.argsort(hit.to(torch.int8), stable=True)  # [U]: misses first
        # The one sync, as without a cache: how many rows miss (and the range check).
        lo, hi = torch.aminmax(rows)  # any order: rows[0] / rows[-1] assumed sorted rows
        n_miss, lo, hi = torch.stack([u - hit.sum(), lo, hi]).tolist()
        if lo < 0 or hi >= self.n_rows:
            self._check_rows(torch.tensor([lo, hi]))
        miss_at, hit_at = order[:n_miss], order[n_miss:]  # positions in rows
        missed = self._gather_host(rows[miss_at]) if n_miss else None
        out = []
        for i, cached in enumerate(self._cached):
            t = cached.new_empty((u, *cached.shape[1:]))  # [U, ...]
            t[hit_at] = cached[slot[hit_at]]
            if missed is not None:
                t[miss_at] = missed[i]
            out.append(t)
        return tuple(out)

    def _gather_host(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`gather` from the host tensors alone."""
        device = rows.device
        if device.type == "cpu":
            self._check_rows(rows)
            return tuple(t.index_select(0, rows) for t in self.tensors)
        host_rows = rows.cpu()  # the one sync: U is known only now
        self._check_rows(host_rows)
        pin = device.type == "cuda"
        out = []
        for t, buf in zip(self.tensors, self._buffers(host_rows.numel(), pin), strict=True):
            torch.index_select(t, 0, host_rows, out=buf)  # [U, ...]
            out.append(buf.to(device, non_blocking=pin))
        if pin:
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(device))
        return tuple(out)

    def _check_rows(self, rows: torch.Tensor) -> None:
        check_index_range(rows, self.n_rows)  # (host rows: no sync)

    def _buffers(self, u: int, pin: bool) -> tuple[torch.Tensor, ...]:
        """Views ``[u, ...]`` of the staging buffers (pinned for CUDA: the copy is then
        asynchronous), grown by doubling but never past the table's rows (``u`` distinct
        rows of it never are): kept for the table's life, they must not page-lock more
        than the table; waits for the previous copy out of them."""
        if self._copied is not None:
            self._copied.synchronize()
        if self._staging is None or self._staging[0].shape[0] < u:
            old = self._staging[0].shape[0] if self._staging is not None else 0
            cap = max(u, min(self.n_rows, 2 * old))
            self._staging = tuple(
                torch.empty((cap, *t.shape[1:]), dtype=t.dtype, pin_memory=pin)
                for t in self.tensors
            )
        return tuple(b[:u] for b in self._staging)

    def lookup(
        self,
        indices: torch.Tensor,
        weights: torch.Tensor,
        impl: str = "auto",
        check_indices: bool = True,
    ) -> torch.Tensor:
        """``[B, D]`` weighted sums of the rows ``indices [B, K]`` (on any device; zero-copy:
        on :attr:`device`), as the on-device lookup of the whole table would give them;
        forward only. ``check_indices``: as in :func:`memlayers.ops.embedding_bag` (a
        zero-copy lookup only: a gather checks the rows it reads on the host anyway)."""
        check_bags(indices, weights)
        if indices.device != weights.device:
            raise ValueError(
                f"indices and weights must be on one device, got {indices.device} and "
                f"{weights.device}"
            )
        if torch.is_grad_enabled() and weights.requires_grad:
            raise ValueError(
                "an offloaded value table serves lookups only (no backward through it): the "
                "weights require a gradient. Run it under torch.no_grad(), or train the "
                "table on the device"
            )
        if self.mode == "zero-copy":
            if indices.device != self.device:
                raise ValueError(
                    f"this zero-copy host table is read from {self.device}, got indices on "
                    f"{indices.device}: offload it for that device"
                )
            return self._lookup(self.resident, indices, weights, impl, check_indices)
        rows, inverse = torch.unique(indices, sorted=True, return_inverse=True)  # [U], [B, K]
        return self._lookup(self.gather(rows), inverse, weights, impl, True)

    def _lookup(self, tensors, indices, weights, impl: str, check_indices: bool):
        """The usual lookup of ``tensors`` (the whole table, or the rows gathered)."""
        if self.bits is None:
            return embedding_bag(
                tensors[0], indices, weights, impl=impl, check_indices=check_indices
            )
        table = QuantizedRows(*tensors, self.bits, self.group, self.dim)
        return embedding_bag_quantized(
            table, indices, weights, impl=impl, check_indices=check_indices
        )


def hottest_rows(counts: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` rows read most often by ``counts [N]`` (e.g. a :class:`memlayers.usage.
    MemoryUsage`'s, summed over the layers sharing a table; ties by row id), rows never
    read left out: int64 ``[<= n]``, for :meth:`HostTable.cache_rows_`."""
    if counts.dim() != 1:
        raise ValueError(f"counts must be [N], got shape {tuple(counts.shape)}")
    if n < 0:
        raise ValueError(f"n (rows to cache) must be >= 0, got {n}")
    order = torch.argsort(counts, descending=True, stable=True)[:n]  # [n]
    return order[counts[order] > 0]


def map_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of the safetensors file ``path``: every tensor a read-only
    view of the file's memory mapping (module docstring), nothing read until used."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"value table file not found: {path}")
    if sys.byteorder != "little":
        raise ValueError("memory-mapped tables need a little-endian host (the file's order)")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{path} is not a safetensors file ({size} bytes, header {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file: bad header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file: its header is not an object")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        try:
            dtype = DTYPES.get(info["dtype"])
            shape, (begin, end) = [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
        if dtype is None:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {info['dtype']!r}")
        count = math.prod(shape)
        if not 0 <= begin <= end or end - begin != count * dtype.itemsize or 8 + n + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} ({shape} {info['dtype']}) has data_offsets "
                f"{[begin, end]} that do not fit it or the file ({size} bytes)"
            )
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():
            # "The given buffer is not writable": read-only by design (module docstring).
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + n + begin)
        tensors[name] = flat.view(shape)
    return tensors, metadata


def table_tensor_names(bits: int | None) -> tuple[str, ...]:
    """The names a table's tensors have in a file (after a prefix)."""
    return ("weight",) if bits is None else ("qdata", "qscales")


def open_table(
    path: str | Path,
    prefix: str,
    n_rows: int,
    dim: int,
    dtype: torch.dtype | None = None,
    bits: int | None = None,
    group: int | None = None,
    mode: str = "gather",
    device: torch.device | str | None = None,
) -> HostTable:
    """The table ``prefix + "weight"`` (or ``"qdata"``, ``"qscales"`` when ``bits``) of the
    safetensors file ``path``, memory-mapped, checked against the table it stands for:
    ``[n_rows, dim]`` of ``dtype`` (or that table quantized). Raises naming the value.
    ``mode``, ``device``: as in :class:`HostTable` (zero-copy reads the file whole)."""
    mode = offload_mode(mode)
    tensors, _ = map_tensors(path)
    names = [prefix + n for n in table_tensor_names(bits)]
    missing = [n for n in names if n not in tensors]
    if missing:
        have = sorted(k for k in tensors if k.endswith(("weight", "qdata", "qscales")))[:8]
        raise ValueError(f"{path} has no tensor {missing[0]!r} (value-table tensors: {have})")
    got = tuple(tensors[n] for n in names)
    if bits is None:
        (w,) = got
        if tuple(w.shape) != (n_rows, dim) or (dtype is not None and w.dtype != dtype):
            raise ValueError(
                f"{path}: {names[0]} is {list(w.shape)} {w.dtype}, the table needs "
                f"[{n_rows}, {dim}] {dtype}"
            )
        return HostTable(got, file=path, mode=mode, device=device)
    if got[0].shape[0] != n_rows:
        raise ValueError(f"{path}: {names[0]} has {got[0].shape[0]} rows, the table {n_rows}")
    try:
        return HostTable(got, bits, group, dim, file=path, mode=mode, device=device)
    except ValueError as e:
        raise ValueError(f"{path}: {prefix}qdata/qscales: {e}") from None


def save_table(
    path: str | Path, tensors: tuple[torch.Tensor, ...], bits: int | None = None, group=None
) -> None:
    """Write a table's tensors (``(weight,)``, or ``(data, scales)`` with ``bits``) to the
    safetensors file ``path``, named as :func:`open_table` reads them (no prefix)."""
    names = table_tensor_names(bits)
    if len(tensors) != len(names):
        raise ValueError(f"a {'float' if bits is None else 'quantized'} table is {names}")
    meta = {} if bits is None else {"bits": str(bits), "group": str(group)}
    named = {n: t.detach().cpu().contiguous() for n, t in zip(names, tensors, strict=True)}
    save_file(named, path, meta)
