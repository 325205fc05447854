"""The memory layer: MemoryConfig, MemoryValues and ProductKeyMemory (Memory+).

docs/method.md §1–§2. A token's query picks the top-k of ``n_keys**2`` product keys in each of
``heads`` heads; the softmax of the k scores weights the selected rows of one value
table; the ``heads · k`` rows form one bag, summed by :func:`memlayers.ops.embedding_bag`.
Memory+ gates the result with ``silu(x W1)`` and projects it back with ``W2``.

Against a memory that reads few of its rows (docs/usage.md) two options, off by default:
``query_batch_norm`` standardises the queries over the batch, ``balance_loss`` adds a
load-balancing loss on the half-key choices to the training loss. The model's
``forward(tokens, targets=...)`` adds it (:func:`with_aux_losses`); a loop that computes
its own loss adds :meth:`ProductKeyMemory.take_aux_loss` (``Transformer.take_aux_loss``)
itself, and a training forward warns once when the previous one's was never taken.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from memlayers.merged_grad import MergedValueGrad, read_copy_lookup
from memlayers.ops.embedding_bag import IMPLS, embedding_bag
from memlayers.ops.offloaded import HostTable, offload_mode, open_table, table_tensor_names
from memlayers.ops.product_keys import PRECISIONS
from memlayers.ops.quantized import (
    QuantizedRows,
    embedding_bag_quantized,
    empty_quantized,
    quantize_rows,
)
from memlayers.ops.read_copy import GRAD_READS, VALUE_READS, ReadCopy
from memlayers.router import ProductKeyRouter, balance_loss, load_old_router_names
from memlayers.usage import MemoryUsage, RowCounts

# model.memory.value_dtype: the value table's dtype.
VALUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


def _positive_number(name: str, value, allow_none: bool = False, allow_zero: bool = False) -> None:
    """A finite number > 0 (an int or a float, not a bool; >= 0 if ``allow_zero``), or
    None if ``allow_none``."""
    if value is None and allow_none:
        return
    number = not isinstance(value, bool) and isinstance(value, int | float)
    if not (number and (value >= 0 if allow_zero else value > 0) and value < math.inf):
        raise ValueError(
            f"{name} must be a finite number {'>=' if allow_zero else '>'} 0"
            f"{' or None' if allow_none else ''}, got {name}={value!r}"
        )


@dataclass
class MemoryConfig:
    """Knobs of one memory layer. Defaults are Memory+ at a CPU-friendly size.

    The paper's default (docs/method.md §3) is ``n_keys=1024, heads=4, topk=32``,
    ``k_dim = dim/2``, ``v_dim = dim``: 1,048,576 value rows.
    """

    n_keys: int = 256  # half keys per head; the value table has n_keys**2 rows
    heads: int = 4
    topk: int = 32  # per head: a bag holds heads * topk rows
    k_dim: int | None = None  # None: half the model dim (Memory+ rule)
    v_dim: int | None = None  # None: the model dim
    swilu: bool = True  # Memory+ output gating (y ⊙ silu(x W1)) W2
    qk_norm: bool = True  # normalise queries and keys (Memory+)
    # share_values and merge_grads are read where the tables are made (share_values by
    # Transformer, merge_grads also by memlayers.hf.add_memory); a layer given a table
    # uses it as it was built (MemoryValues(..., merge_grads=...)).
    share_values: bool = True  # models: one value pool for all memory layers
    # With share_values and sparse value gradients: one backward over every layer's
    # lookups at the end of the pass (memlayers/merged_grad.py); off, one per lookup.
    merge_grads: bool = True
    impl: str = "auto"  # embedding-bag implementation: auto | torch | triton
    query_bias: bool = False  # bias in the query projection
    input_dropout: float = 0.0  # on the layer input, before the query projection
    query_dropout: float = 0.0  # on the queries, before the key search
    value_dropout: float = 0.0  # on the looked-up values, before the output gating
    norm_eps: float = 1e-6  # epsilon of the qk normalisation (and of query_batch_norm)
    # Standardise the queries over the batch per head and feature (running statistics in
    # eval mode; ProductKeyRouter says how): keeps the reads spread through the unigram
    # phase of training (docs/usage.md, studies 1b and 2).
    query_batch_norm: bool = False
    query_batch_norm_momentum: float = 0.1  # BatchNorm's: running = (1 - m) running + m batch
    # Weight of the load-balancing loss on the half-key choices (router.balance_loss),
    # added to the training loss's gradient by the model's forward(tokens, targets=...);
    # a loop computing its own loss adds take_aux_loss() (ProductKeyMemory, Transformer)
    # itself; 0: off (docs/usage.md, study 2).
    balance_loss: float = 0.0
    # The dtype of the value tables made from this config (a layer's own, the model's):
    # fp32 | bf16. bf16 halves the bytes of the table and of the rows its lookups and its
    # optimizer step move; the row-wise optimizers store it stochastically rounded
    # (memlayers/ops/row_adam.py), so small updates are not lost. A table passed to a
    # layer keeps its dtype; with bf16 here it must be bf16 (ProductKeyMemory checks).
    value_dtype: str = "fp32"
    # The search's half-key scores: fp32 (exact) | bf16 (rounded before ranking: half the
    # bytes written and ranked; near-ties may swap, the chosen rows' scores are the fp32
    # sums of the rounded halves; memlayers.ops.product_key_topk, recall in
    # benchmarks/results/memory_layer_*). An option, not a default: not yet quality-tested.
    search_precision: str = "fp32"
    # What the lookups of the tables made from this config read: "table" (their rows) |
    # "int8" (an int8 copy with a bf16 scale a row, D + 2 bytes a row, kept beside the
    # table and refreshed after each optimizer step: memlayers/ops/read_copy.py). The
    # table, its optimizer and its gradient stay as they are; the lookups' sums and their
    # score gradient are of the dequantized rows. Read where the tables are made, as
    # share_values; a table passed to a layer must have been made with it.
    value_read: str = "table"
    # What the value-gradient walk of a shared table (merged gradients: Memory+) reads of
    # the lookups' output gradient: "float" | "int8" (packed as int8 rows, a bf16 scale a
    # row: half the bytes of the walk's reads; memlayers/merged_grad.py). The score
    # gradients still take the float output gradient. Needs merge_grads (a table shared
    # by several layers) and a row-sparse value optimizer. Read where the tables are made.
    grad_read: str = "float"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def n_rows(self) -> int:
        """Rows of the value table (``n_keys**2``)."""
        return self.n_keys**2

    @property
    def table_dtype(self) -> torch.dtype:
        """The value table's torch dtype (``value_dtype``)."""
        return VALUE_DTYPES[self.value_dtype]

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field and its value for invalid settings."""
        for name in ("n_keys", "heads", "topk"):
            _positive_int(name, getattr(self, name))
        for name in ("k_dim", "v_dim"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.k_dim is not None and self.k_dim % 2:
            raise ValueError(
                f"k_dim must be even (it splits into two half keys), got k_dim={self.k_dim}"
            )
        if self.topk > self.n_keys:
            raise ValueError(f"topk must be <= n_keys, got topk={self.topk} > n_keys={self.n_keys}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got impl={self.impl!r}")
        for name in ("input_dropout", "query_dropout", "value_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {name}={p!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got norm_eps={self.norm_eps!r}")
        if not isinstance(self.query_batch_norm, bool):
            raise ValueError(
                f"query_batch_norm must be true or false, got {self.query_batch_norm!r}"
            )
        m = self.query_batch_norm_momentum
        if isinstance(m, bool) or not isinstance(m, int | float) or not 0.0 < m <= 1.0:
            raise ValueError(f"query_batch_norm_momentum must be in (0, 1], got {m!r}")
        w = self.balance_loss
        if isinstance(w, bool) or not isinstance(w, int | float) or not (0.0 <= w < math.inf):
            raise ValueError(f"balance_loss must be a finite weight >= 0, got balance_loss={w!r}")
        if self.search_precision not in PRECISIONS:
            raise ValueError(
                f"search_precision must be one of {PRECISIONS}, got "
                f"search_precision={self.search_precision!r}"
            )
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(
                f"value_dtype must be one of {tuple(VALUE_DTYPES)}, got "
                f"value_dtype={self.value_dtype!r}"
            )
        if self.value_read not in VALUE_READS:
            raise ValueError(
                f"value_read must be one of {VALUE_READS}, got value_read={self.value_read!r}"
            )
        if self.grad_read not in GRAD_READS:
            raise ValueError(
                f"grad_read must be one of {GRAD_READS}, got grad_read={self.grad_read!r}"
            )

    def resolved_dims(self, dim: int) -> tuple[int, int]:
        """``(k_dim, v_dim)`` for a model of width ``dim``, validated."""
        _positive_int("dim", dim)
        k_dim = self.k_dim if self.k_dim is not None else dim // 2
        if k_dim < 2 or k_dim % 2:
            raise ValueError(
                f"k_dim must be even and >= 2, got k_dim={k_dim} (dim={dim}, "
                f"config k_dim={self.k_dim})"
            )
        return k_dim, self.v_dim if self.v_dim is not None else dim


def merges_grads(config: MemoryConfig, n_layers: int, key: str, where: str) -> bool:
    """Whether the table ``n_layers`` memory layers share, made from ``config``, merges
    their gradients: ``merge_grads`` and two or more layers (the rule of the models and of
    :func:`memlayers.hf.add_memory`). ``grad_read`` other than float needs it, and is
    refused without it, naming the setting (``key``: its prefix) and ``where`` (the
    layers)."""
    merge = config.merge_grads and n_layers > 1
    if config.grad_read != "float" and not merge:
        raise ValueError(
            f"{key}grad_read={config.grad_read!r} is read by the merged walk of a table "
            f"shared by two or more memory layers, but {where} with {key}merge_grads="
            f"{config.merge_grads}: use grad_read='float'"
        )
    return merge


class MemoryValues(nn.Module):
    """The value table ``[n_rows, v_dim]``, passed explicitly to every layer sharing it.

    ``sparse_grad=True`` makes lookups return a row-sparse (COO) gradient holding only the
    rows read, for :class:`memlayers.value_optim.SparseValueAdam`; leave it off for dense
    optimizers and FSDP.

    After training, :meth:`quantize_` packs the table for serving (int8 or 4-bit rows with
    bf16 scales, :mod:`memlayers.ops.quantized`): the ``weight`` parameter gives way to the
    buffers ``qdata`` and ``qscales`` (what ``state_dict`` then holds), lookups dequantize
    the rows they read, forward only, and training is refused.

    For serving a table too large for the device, :meth:`offload_` keeps it (float or
    quantized) in host memory or memory-mapped from a file (:mod:`memlayers.ops.offloaded`):
    it stops being a parameter or buffer (``model.to(device)`` leaves it on the host,
    ``state_dict`` no longer holds it) and each lookup gathers the rows it reads to the
    device of its indices; forward only, training is refused.

    ``read="int8"`` (``MemoryConfig.value_read``): lookups read an int8 copy of the table
    (one bf16 scale a row), kept beside it and packed again from it after it changes
    (:mod:`memlayers.ops.read_copy`): half the bytes of a bf16 table's rows for the
    forward and the score gradient. Derived state, never saved; quantizing or offloading
    the table drops it.

    ``grad_read="int8"`` (``MemoryConfig.grad_read``, with ``merge_grads``): the merged
    walk reads the lookups' output gradients packed as int8 rows (half the bytes of bf16).
    """

    def __init__(
        self,
        n_rows: int,
        v_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        sparse_grad: bool = False,
        merge_grads: bool = False,
        read: str = "table",
        grad_read: str = "float",
    ) -> None:
        super().__init__()
        _positive_int("n_rows", n_rows)
        _positive_int("v_dim", v_dim)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got dtype={dtype}")
        if read not in VALUE_READS:
            raise ValueError(f"read must be one of {VALUE_READS}, got read={read!r}")
        # The int8 copy the lookups read (read="int8"), packed at the first lookup.
        self.read_copy = ReadCopy() if read == "int8" else None
        self.n_rows, self.v_dim, self.sparse_grad = n_rows, v_dim, sparse_grad
        # Several layers reading this table (Memory+): with sparse_grad, one backward over
        # all their lookups at the end of the pass (memlayers/merged_grad.py).
        if grad_read != "float" and not merge_grads:
            raise ValueError(
                f"grad_read={grad_read!r} packs the output gradient a shared table's merged "
                f"walk reads: it needs merge_grads=True (a table shared by several memory "
                f"layers with MemoryConfig merge_grads), got merge_grads={merge_grads}"
            )
        self.merged = MergedValueGrad(grad_read) if merge_grads else None
        self.weight = nn.Parameter(torch.empty(n_rows, v_dim, dtype=dtype, device=device))
        # Set from outside by memlayers.parallel: then ``weight`` holds only this rank's
        # columns and lookups go through the shard's gather → lookup → redistribute.
        self.shard = None
        self.bits: int | None = None  # set by quantize_
        self.group: int | None = None
        self.offloaded: HostTable | None = None  # set by offload_
        self.init_weights()

    def __getattr__(self, name: str):
        if name in ("weight", "qdata", "qscales") and self.__dict__.get("offloaded") is not None:
            raise AttributeError(
                f"this value table is offloaded to host memory (for serving): it has no "
                f"{name} on the device to train or export; load the run without offloading"
            )
        if name == "weight" and self.__dict__.get("bits") is not None:
            raise AttributeError(
                f"this value table is quantized ({self.bits}-bit, for serving): it has no "
                f"float weight to train or export; train the float run it came from"
            )
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        # A move or a cast (model.to, .float(), to_empty) may land the new table where the
        # old one was: the read copy's stamp could not tell. Forget it.
        if self.read_copy is not None:
            self.read_copy.invalidate()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        if self.read_copy is not None:
            self.read_copy.invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def read(self) -> str:
        """What the lookups read: ``"table"`` or ``"int8"`` (the read copy)."""
        return "table" if self.read_copy is None else "int8"

    @property
    def grad_read(self) -> str:
        """What the merged walk reads of the output gradient: ``"float"`` or ``"int8"``."""
        return "float" if self.merged is None else self.merged.grad_read

    @property
    def quantized(self) -> QuantizedRows | None:
        """The packed table after :meth:`quantize_`, else None."""
        if self.bits is None:
            return None
        if self.offloaded is not None:
            return QuantizedRows(*self.offloaded.tensors, self.bits, self.group, self.v_dim)
        return QuantizedRows(self.qdata, self.qscales, self.bits, self.group, self.v_dim)

    @property
    def dtype(self) -> torch.dtype | None:
        """The float table's dtype; None when quantized."""
        if self.bits is not None:
            return None
        return self.offloaded.dtype if self.offloaded is not None else self.weight.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the table as stored (float weight, or packed data + scales)."""
        if self.offloaded is not None:
            return self.offloaded.nbytes
        q = self.quantized
        return q.nbytes if q is not None else self.weight.nbytes

    def _check_whole(self, becoming: str) -> None:
        """Serving formats hold the whole table: a column shard cannot become one."""
        if self.shard is not None:
            raise ValueError(
                f"a column-sharded value table cannot be {becoming}: consolidate the "
                f"checkpoint into one process first (memlayers consolidate)"
            )

    @torch.no_grad()
    def quantize_(self, bits: int, group: int | None = None, progress: bool = False) -> None:
        """Replace the float table by its quantized rows (:func:`memlayers.ops.quantized.
        quantize_rows`; ``group``: columns per scale, None for the format's default), for
        serving: irreversible, forward only. On the meta device it only lays out the
        buffers (a model rebuilt for a quantized checkpoint, which the load then fills)."""
        if self.bits is not None:
            raise ValueError(f"the value table is quantized already ({self.bits}-bit)")
        self._check_whole("quantized")
        self.read_copy = None  # serving reads the packed table itself
        if self.offloaded is not None:  # quantized where it lives, on the host
            mode, device = self.offloaded.mode, self.offloaded.device
            q = quantize_rows(self.offloaded.tensors[0], bits, group, progress)
            # The float table is replaced only once the packed one is in place (a failed
            # page-locking leaves the module as it was).
            self.offloaded = HostTable(
                (q.data, q.scales), q.bits, q.group, self.v_dim, mode=mode, device=device
            )
            self.bits, self.group = q.bits, q.group
            return
        w = self.weight.detach()
        if w.is_meta:
            q = empty_quantized(self.n_rows, self.v_dim, bits, group, device="meta")
        else:
            q = quantize_rows(w, bits, group, progress)
        del self.weight
        self.register_buffer("qdata", q.data)
        self.register_buffer("qscales", q.scales)
        self.bits, self.group = q.bits, q.group

    @torch.no_grad()
    def offload_(
        self,
        file: str | Path | None = None,
        prefix: str = "",
        mode: str = "gather",
        device: torch.device | str | None = None,
    ) -> None:
        """Keep the table in host memory for serving (:mod:`memlayers.ops.offloaded`).

        Without ``file`` the table in the module (float, or quantized by :meth:`quantize_`)
        moves to host RAM. With ``file``, the safetensors file holding it as ``prefix +
        "weight"`` (``"qdata"`` and ``"qscales"`` when quantized: :meth:`quantize_` first,
        on the meta device that only lays out the buffers) is memory-mapped instead, and
        the module's own table is dropped unread (a meta-device build never allocates it);
        its shape and dtype must match. Irreversible; lookups are then forward only.

        ``mode="gather"``: each lookup gathers the rows it reads to its device (a sync a
        lookup; any table size). ``mode="zero-copy"``: the table is page-locked in host RAM
        and lookups from ``device`` (default: where the table is now; the CPU for a meta
        build) read its rows in place over the bus: no sync, compiled and captured in CUDA
        graphs like an on-device table; the table must fit in host RAM."""
        if self.offloaded is not None:
            raise ValueError(f"the value table is offloaded already ({self.offloaded.file})")
        self._check_whole("offloaded")
        self.read_copy = None  # serving reads the offloaded table itself
        mode = offload_mode(mode)
        names = table_tensor_names(self.bits)
        mine = tuple(getattr(self, n) for n in names)
        if device is None:
            device = "cpu" if mine[0].is_meta else mine[0].device
        if file is None:
            if mine[0].is_meta:
                raise ValueError(
                    "a meta-device value table has no values to offload: pass the file "
                    "holding them (offload_(file, prefix))"
                )
            # gather: in RAM, not pinned (lookups copy through a pinned staging buffer of
            # the rows read, so the whole table need not be page-locked).
            host = HostTable(
                tuple(t.detach().cpu() for t in mine), self.bits, self.group, self.v_dim,
                mode=mode, device=device,
            )  # fmt: skip
        else:
            dtype = self.weight.dtype if self.bits is None else None
            host = open_table(
                file, prefix, self.n_rows, self.v_dim, dtype, self.bits, self.group, mode, device
            )
        del mine
        for n in names:
            delattr(self, n)
        self.offloaded = host

    def lookup(
        self,
        indices: torch.Tensor,
        weights: torch.Tensor,
        impl: str = "auto",
        check_indices: bool = True,
    ):
        """``[B, v_dim]`` weighted sums of the rows ``indices [B, K]`` (see
        :func:`memlayers.ops.embedding_bag`), through the shard when sharded, dequantized
        on the fly when quantized, gathered from the host when offloaded.
        ``check_indices=False``: the indices are known to be in range (a layer's own
        search made them): the device-side range check of the plain and quantized
        lookups is skipped."""
        if self.offloaded is not None:
            if self.training:
                raise ValueError(
                    "the value table is offloaded to host memory: it serves lookups in eval "
                    "mode only (model.eval()); train a table that lives on the device"
                )
            if self.offloaded.mode == "zero-copy":  # fixed shapes, no sync: compiles
                return self.offloaded.lookup(indices, weights, impl, check_indices)
            return _offloaded_lookup(self.offloaded, indices, weights, impl)
        if self.bits is not None:
            if self.training:
                raise ValueError(
                    f"the value table is quantized ({self.bits}-bit): it serves lookups in "
                    f"eval mode only (model.eval()); train the float table, then quantize it"
                )
            return embedding_bag_quantized(
                self.quantized, indices, weights, impl=impl, check_indices=check_indices
            )
        if (
            not self.sparse_grad
            and self.grad_read != "float"
            and torch.is_grad_enabled()
            and self.weight.requires_grad
        ):
            # Only row-sparse gradients take the merged walk: refused, not ignored.
            raise ValueError(
                f"grad_read={self.grad_read!r} is read by the merged walk of row-sparse value "
                f"gradients, but this table has sparse_grad=False: set values.sparse_grad = "
                f"True (a SparseValueAdam/SparseValueSGD steps it; the trainer does so for "
                f"optim.value_optimizer=sparse_adam*) or use grad_read='float'"
            )
        if self.shard is not None:
            return self.shard.lookup(
                self.weight, indices, weights, impl, self.sparse_grad, self.merged, self.read_copy
            )
        if self.read_copy is not None:
            return _read_copy_lookup(self, indices, weights, impl, check_indices)
        if self.sparse_grad:
            return _sparse_lookup(self, indices, weights, impl)
        return embedding_bag(self.weight, indices, weights, impl=impl, check_indices=check_indices)

    def init_weights(self) -> None:
        """Normal with std ``v_dim**-0.5``: rows of norm near 1 (docs/method.md §3 says what
        a bag's sum then is: near ``sqrt(heads / topk)`` at init).

        Drawn row-chunk by row-chunk over the *full* width, keeping this table's columns,
        so a seed gives the same table whether it is sharded (memlayers.parallel) or not.
        A quantized table comes from a trained one, not from a draw: it is zeroed (zero
        scales, a zero table) so that a meta-device build leaves no buffer unset.
        """
        if self.offloaded is not None:  # a trained table (maybe a read-only file): kept
            return
        if self.bits is not None:
            self.qdata.fill_(0 if self.bits == 8 else 0x88)  # 0x88: two zero nibbles
            self.qscales.zero_()
            return
        start = self.shard.start if self.shard is not None else 0
        normal_columns_(self.weight, self.v_dim**-0.5, self.v_dim, start)

    def extra_repr(self) -> str:
        fmt = f"int{self.bits}, group={self.group}" if self.bits is not None else None
        s = f"n_rows={self.n_rows}, v_dim={self.v_dim}, {fmt or f'dtype={self.dtype}'}"
        if self.read_copy is not None:
            s += ", read=int8"
        if self.grad_read != "float":
            s += f", grad_read={self.grad_read}"
        if self.offloaded is not None:
            s += f", offloaded={self.offloaded.file or 'host'}"
            if self.offloaded.mode != "gather":
                s += f", {self.offloaded.mode} from {self.offloaded.device}"
        return s


@torch.compiler.disable
def _offloaded_lookup(table: HostTable, indices, weights, impl: str) -> torch.Tensor:
    """An offloaded table's lookup, run eagerly: the rows gathered have a data-dependent
    count and cross to the host and back, which no compiled graph can hold."""
    return table.lookup(indices, weights, impl)


@torch.compiler.disable
def _read_copy_lookup(values: MemoryValues, indices, weights, impl: str, check_indices: bool):
    """A lookup of the table's int8 read copy, run eagerly: whether the copy is stale (the
    table's version counter) is a question for the host before each lookup."""
    read = values.read_copy.rows(values.weight, impl)
    if values.merged is not None and values.sparse_grad:
        return values.merged.lookup(values.weight, indices, weights, impl, read, check_indices)
    return read_copy_lookup(
        values.weight, read, indices, weights, impl, values.sparse_grad, check_indices
    )


@torch.compiler.disable
def _sparse_lookup(values: MemoryValues, indices, weights, impl: str) -> torch.Tensor:
    """A row-sparse lookup, run eagerly: one graph boundary under torch.compile, since its
    value gradient has a data-dependent size (the number of distinct rows read), which
    AOTAutograd cannot put in a compiled backward. The rest of the layer (query, qk-norm,
    search, softmax, gating) still compiles, around this one call."""
    if values.merged is not None:
        return values.merged.lookup(values.weight, indices, weights, impl)
    return embedding_bag(values.weight, indices, weights, impl=impl, sparse_grad=True)


@torch.no_grad()
def normal_columns_(
    weight: torch.Tensor, std: float, full_dim: int, start: int = 0, chunk_rows: int = 1 << 16
) -> None:
    """Fill ``weight [N, w]`` with columns ``[start, start + w)`` of a normal ``[N, full_dim]``
    table drawn in chunks of ``chunk_rows`` rows (the same RNG calls for any ``w``)."""
    n, width = weight.shape
    for s in range(0, n, chunk_rows):
        rows = weight[s : s + chunk_rows]
        if width == full_dim:
            rows.normal_(0.0, std)
        else:
            full = torch.empty(rows.shape[0], full_dim, dtype=weight.dtype, device=weight.device)
            rows.copy_(full.normal_(0.0, std)[:, start : start + width])


def _trunc_normal_(w: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


class ProductKeyMemory(nn.Module):
    """``(..., dim) -> (..., dim)``: query → qk-norm → product-key top-k → softmax →
    weighted sum of value rows → ``(y ⊙ silu(x W1)) W2`` (or ``y W_out`` without swilu).

    A ``values`` table passed in is shared, not owned: it is *not* registered as a
    submodule here, so the module that owns it (the model) registers it once and
    ``state_dict``/optimizers see one table. Without ``values`` the layer creates and
    owns its table (``self.values`` is then a submodule), in ``config.value_dtype``. A
    passed table is used as it was built: its dtype (``value_dtype="bf16"`` refuses one
    that is not bf16), ``sparse_grad`` and ``merge_grads`` are the table's:
    ``config.share_values`` and ``config.merge_grads`` are read where a model makes its
    tables (:class:`memlayers.model.Transformer`; ``merge_grads`` also
    :func:`memlayers.hf.add_memory`), not here.

    With ``config.balance_loss > 0`` a training forward leaves the weighted balance loss
    in ``aux_loss``; it trains the keys only once added to the loss: by the model's
    ``forward(tokens, targets=...)``, or by adding :meth:`take_aux_loss` to your own loss
    before ``backward``. A training forward that finds the previous one's loss not taken
    warns, once per layer (eager forwards only: a compiled one does not look).
    """

    def __init__(
        self,
        dim: int,
        config: MemoryConfig,
        values: MemoryValues | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config.validate()
        k_dim, v_dim = config.resolved_dims(dim)
        self.dim, self.k_dim, self.v_dim, self.config = dim, k_dim, v_dim, config
        if values is None:
            if config.grad_read != "float":
                raise ValueError(
                    f"grad_read={config.grad_read!r} is for a value table shared by several "
                    f"memory layers (merged gradients), but this layer makes its own table: "
                    f"use share_values with two or more memory layers, or grad_read='float'"
                )
            self.owned_values = MemoryValues(
                config.n_rows, v_dim, dtype=config.table_dtype, device=device,
                read=config.value_read,
            )  # fmt: skip
        else:
            if not isinstance(values, MemoryValues):
                raise ValueError(f"values must be a MemoryValues, got {type(values).__name__}")
            if values.n_rows != config.n_rows or values.v_dim != v_dim:
                raise ValueError(
                    f"values is [{values.n_rows}, {values.v_dim}] but the config needs "
                    f"[n_keys**2={config.n_rows}, v_dim={v_dim}]"
                )
            # fp32, the default, is the dtype of the tables a layer or model makes; a table
            # made by hand (bf16, or the model's dtype: memlayers.hf) is taken as it is. An
            # explicit bf16 is a request the table must meet. A quantized table has no dtype.
            want = config.table_dtype
            if want != torch.float32 and values.dtype is not None and values.dtype != want:
                raise ValueError(
                    f"config value_dtype={config.value_dtype!r} ({want}) but the values "
                    f"table passed in is {values.dtype}: build it with "
                    f"MemoryValues(..., dtype={want})"
                )
            if config.value_read != "table" and values.read != config.value_read:
                raise ValueError(
                    f"config value_read={config.value_read!r} but the values table passed in "
                    f"reads {values.read!r}: build it with MemoryValues(..., "
                    f"read={config.value_read!r})"
                )
            if config.grad_read != "float" and values.grad_read != config.grad_read:
                raise ValueError(
                    f"config grad_read={config.grad_read!r} but the values table passed in "
                    f"walks {values.grad_read!r} output gradients: build it with "
                    f"MemoryValues(..., merge_grads=True, grad_read={config.grad_read!r})"
                )
            self.owned_values = None
            self._shared_values = (values,)  # a tuple: not registered as a submodule

        self.router = ProductKeyRouter(
            dim,
            k_dim,
            n_keys=config.n_keys,
            heads=config.heads,
            topk=config.topk,
            qk_norm=config.qk_norm,
            norm_eps=config.norm_eps,
            query_bias=config.query_bias,
            query_dropout=config.query_dropout,
            query_batch_norm=config.query_batch_norm,
            momentum=config.query_batch_norm_momentum,
            impl=config.impl,
            search_precision=config.search_precision,
            device=device,
        )
        self.register_load_state_dict_pre_hook(load_old_router_names)
        if config.swilu:
            self.w1 = nn.Linear(dim, v_dim, bias=False, device=device)
            self.w2 = nn.Linear(v_dim, dim, bias=False, device=device)
        else:
            self.out_proj = nn.Linear(v_dim, dim, bias=False, device=device)
        self.usage: MemoryUsage | RowCounts | None = None
        # The weighted balance loss of the last training forward (balance_loss > 0), which
        # the model adds to its loss (with_aux_losses) or a user's loop takes
        # (take_aux_loss); None otherwise, and once taken.
        self.aux_loss: torch.Tensor | None = None
        self._aux_warned = False  # the not-taken warning is given once per layer
        self.init_weights()

    @property
    def values(self) -> MemoryValues:
        return self.owned_values if self.owned_values is not None else self._shared_values[0]

    def init_weights(self) -> None:
        """Fill every parameter (the paper's rules); an owned value table too.

        Keys uniform in ``±1/sqrt(k_dim)``; projections truncated normal with std
        ``fan_in**-0.5``; biases zero; the qk-norm gain one; running query statistics
        (query_batch_norm) 0 and 1.
        """
        self.router.init_weights(self.dim**-0.5)
        if self.config.swilu:
            _trunc_normal_(self.w1.weight, self.dim**-0.5)
            _trunc_normal_(self.w2.weight, self.v_dim**-0.5)
        else:
            _trunc_normal_(self.out_proj.weight, self.v_dim**-0.5)
        if self.owned_values is not None:
            self.owned_values.init_weights()

    def track_usage(
        self, enabled: bool = True, *, training: bool = False
    ) -> MemoryUsage | RowCounts | None:
        """Start (or stop) collecting which rows are read; returns the collector: a
        :class:`MemoryUsage` of every lookup (counts and weights, checked: evaluation), or
        with ``training`` a :class:`RowCounts` of training-mode lookups only (device counts,
        no host sync or graph break: the trainer's, :class:`memlayers.usage.TrainingUsage`)."""
        if not enabled:
            self.usage = None
        elif training:
            self.usage = RowCounts(self.config.n_rows, self.router.keys.device)
        else:
            self.usage = MemoryUsage(self.config.n_rows)
        return self.usage

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and weights of every token's bag: ``[N, heads*topk]`` each (N = tokens)."""
        cfg = self.config
        h = x.reshape(-1, self.dim)  # [N, dim]
        h = F.dropout(h, cfg.input_dropout, self.training)
        q, keys = self.router.normed_query(h), self.router.normed_keys()  # [N, H, k_dim]
        if not torch.compiler.is_compiling():  # dynamo can't trace warnings.warn
            self._check_aux_taken()
        self.aux_loss = None
        if not (self.training and cfg.balance_loss > 0):
            return self.router.search(q, keys)  # [N, H*k] each
        # The balance loss counts the search's own half-key choices (no ranking of its own).
        indices, weights, top = self.router.search(q, keys, half_top=True)
        self.aux_loss = cfg.balance_loss * balance_loss(q, keys, cfg.topk, cfg.impl, top)
        return indices, weights

    def _check_aux_taken(self) -> None:
        """Warn (once) when a training forward with a balance loss finds the previous
        one's loss still here: nobody added it to a loss, so it trained nothing."""
        if self.aux_loss is None or self._aux_warned or not self.training:
            return
        self._aux_warned = True
        warnings.warn(
            f"ProductKeyMemory(balance_loss={self.config.balance_loss}): the balance loss "
            f"of the previous training forward was never taken, so it trains nothing. Add "
            f"layer.take_aux_loss() (model.take_aux_loss() for a Transformer) to the loss "
            f"before backward, or call the model with targets=... (which adds it)",
            stacklevel=2,
        )

    def take_aux_loss(self) -> torch.Tensor:
        """The weighted balance loss of the last training forward, handed over once: a
        0-d fp32 tensor to add to the loss before ``backward`` (``loss +
        layer.take_aux_loss()``: the value then includes it; :func:`with_aux_losses` adds
        the gradient only). 0 (no graph) when there is none: eval mode, ``balance_loss=0``,
        taken already. The model's ``forward(tokens, targets=...)`` takes it itself."""
        aux, self.aux_loss = self.aux_loss, None
        if aux is None:
            return torch.zeros((), device=self.router.keys.device)
        return aux

    def _empty_bags(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """No tokens: ``[0, heads*topk]`` rows and weights (the router's reshapes to
        ``[N, -1]`` need N > 0), in the dtype the search's weights would have. For a
        column-sharded table, whose lookup's collectives every rank of the group must
        join, forward and backward: the weights hang off the input and the router's
        weights as a rank's with tokens do (:func:`no_tokens_output`), so every rank runs
        the score gradient's all-reduce and the router gets its (zero) gradients."""
        n = self.config.heads * self.config.topk
        device = x.device.type
        q_dtype = self.router.query.weight.dtype  # the query's, autocast's when it is on
        if torch.is_autocast_enabled(device):
            q_dtype = torch.get_autocast_dtype(device)
        # product_key_topk's scores and the router's softmax: fp32 at least.
        dtype = torch.promote_types(torch.promote_types(q_dtype, self.router.keys.dtype),
                                    torch.float32)  # fmt: skip
        indices = torch.zeros(0, n, dtype=torch.int64, device=x.device)
        weights = torch.zeros(0, n, dtype=dtype, device=x.device)
        return indices, no_tokens_output(weights, [x, *self.router.parameters()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input [..., dim={self.dim}], got {tuple(x.shape)}")
        values = self.values
        n = x.numel() // self.dim  # tokens
        if n == 0 and values.shard is None:  # no tokens, nothing to look up
            own = (p for name, p in self.named_parameters() if not name.startswith("owned_values"))
            return no_tokens_output(x, own)  # the table: data parallel syncs it apart
        cfg = self.config
        if n == 0:
            # A sharded table: this rank still joins the lookup's collectives (the other
            # ranks' gathers wait for its bag count), with B = 0 bags.
            indices, weights = self._empty_bags(x)
        else:
            indices, weights = self.lookup(x)  # [N, H*k]
            # The trainer's RowCounts count training steps, not its validation passes.
            if self.usage is not None and (self.training or isinstance(self.usage, MemoryUsage)):
                self.usage.update(indices, weights)
        # The search's rows are in [0, n_keys**2) = the table: no range check to pay.
        y = values.lookup(indices, weights, impl=cfg.impl, check_indices=False)  # [N, v_dim]
        if not torch.is_autocast_enabled(y.device.type):
            # A bf16 table in an fp32 model (value_dtype): the layer goes on in the input's
            # dtype. Under autocast the bf16 rows go on as they are (so is their gradient).
            y = y.to(x.dtype)
        y = F.dropout(y, cfg.value_dropout, self.training)
        h = x.reshape(n, self.dim)  # n, not -1: n may be 0 (a sharded table's empty rank)
        if cfg.swilu:
            out = self.w2(y * F.silu(self.w1(h)))  # [N, dim]
        else:
            out = self.out_proj(y)
        return out.view(*x.shape[:-1], self.dim)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"dim={self.dim}, n_keys={c.n_keys}, heads={c.heads}, topk={c.topk}, "
            f"k_dim={self.k_dim}, v_dim={self.v_dim}, swilu={c.swilu}, qk_norm={c.qk_norm}, "
            f"shared_values={self.owned_values is None}"
            + (", query_batch_norm=True" if c.query_batch_norm else "")
            + (f", balance_loss={c.balance_loss}" if c.balance_loss else "")
        )


def no_tokens_output(x: torch.Tensor, params: Iterable[torch.Tensor]) -> torch.Tensor:
    """A layer's output for ``x`` with no tokens: zeros like ``x`` that hang off each of
    ``params`` with weight 0, so a backward gives every one of them a (zero) gradient, as
    a batch with tokens does. Data-parallel ranks then reduce the same parameters in the
    same order (FSDP's reduce-scatter per block), even where one rank's batch is empty;
    without it that rank's gradients are missing and the collectives mismatch. It hangs
    off ``x`` too (``x * 0`` of no elements), so the layers before get theirs."""
    if not torch.is_grad_enabled():
        return x.new_zeros(x.shape)
    out = x * 0  # x holds no element: no inf or NaN to spread
    zero = [p.flatten()[:0].sum().float() for p in params if p.requires_grad]
    return out + torch.stack(zero).sum().to(out.dtype) if zero else out


def with_aux_losses(loss: torch.Tensor, layers: Iterable[ProductKeyMemory]) -> torch.Tensor:
    """``loss`` plus the layers' auxiliary losses of their last training forward
    (``aux_loss``, the weighted :func:`memlayers.router.balance_loss`) *in its gradient
    only* (what ``Transformer.forward(tokens, targets=...)`` returns; a loop of one's own
    may use it too, or add :meth:`ProductKeyMemory.take_aux_loss` for value and
    gradient): the value returned is ``loss``'s, bit for bit (``a - a.detach()`` is 0),
    so the logged training loss stays the language-model loss, comparable across runs,
    while a backward through it (scaled by gradient accumulation or a loss scaler like
    the rest) also lowers the auxiliary losses. The layers' ``aux_loss`` are reset to None. A no-op
    when no layer has one (eval mode, weight 0)."""
    layers = list(layers)
    aux = [layer.aux_loss for layer in layers if layer.aux_loss is not None]
    for layer in layers:  # taken: a later forward that skips the layers can't reuse them
        layer.aux_loss = None
    if not aux:
        return loss
    total = torch.stack(aux).sum()
    return loss + (total - total.detach()).to(loss.dtype)
