"""One backward for all the lookups into a shared value table (Memory+: 3 layers, 1 table).

Each lookup's own backward would give a row-sparse gradient, and autograd adds the three by
concatenating them (copies of a growing ``[ΣU, D]``), after which the optimizer must sum
the repeated rows: on an H100 at the 134m trainer's shape (fp32 1,048,576 × 768, 8192
tokens) three lookups cost 13.9 ms forward + backward and the row sum 3.7 ms more, where
one lookup over all three layers' bags costs 6.5 ms (benchmarks/results/
shared_table_h100_20261128.md).

So a :class:`MergedValueGrad` holds back the table's gradient: each lookup's backward
computes only its score gradient (which the layer below needs at once) and hands over
its ``(indices, weights, grad_out)``; when the backward pass ends (an autograd engine
callback, queued by the first of them) one walk over all of them gives the table's
row-sparse gradient — coalesced, each row once — added to ``weight.grad`` as
AccumulateGrad would. A lookup whose output takes no part in the loss is never called
back and adds nothing, as it should.

The gradient goes to the table's leaf as autograd knows it (its AccumulateGrad node's
variable), not to the tensor the lookup saved: under non-reentrant activation
checkpointing that is a recomputed alias, and a gradient set on it never reached the
parameter. Hooks on the table see the merged gradient too: its tensor hooks run on it
before it is added and its post-accumulate hooks after, at the end of the pass. Autograd
itself also runs the tensor hooks once per lookup during the pass, with ``None`` (the
lookup hands it no gradient there): a hook that cannot take ``None`` needs
``MemoryConfig(merge_grads=False)``; the first lookup into a table with hooks warns.
"""

from __future__ import annotations

import warnings

import torch

from memlayers.ops.embedding_bag import (
    check_embedding_bag_inputs,
    embedding_bag,
    embedding_bag_grads,
)
from memlayers.ops.quantized import QuantizedRows, embedding_bag_quantized
from memlayers.ops.read_copy import (
    GRAD_READS,
    check_read_copy,
    pack_rows,
    score_grad_read,
    value_grad_packed,
)

_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")


def _hooks(t: torch.Tensor, kind: str) -> tuple:
    """``t``'s tensor hooks (``_backward_hooks``) or post-accumulate hooks, in order."""
    return tuple((getattr(t, kind, None) or {}).values())


class MergedValueGrad:
    """The pending lookups of one table, per backward pass.

    Each backward pass (an autograd graph task) gets its own list and its own end-of-pass
    callback, so a pass that fails before its end (an exception in a hook, out of memory,
    an interrupt: the engine then drops its callbacks) leaves nothing behind that a later
    pass would wait on; its list is dropped with the next pass. A lookup whose table takes
    no gradient in this pass (``torch.autograd.grad`` for other inputs, ``backward(inputs=)``
    without the table) hands nothing over, as its AccumulateGrad node would not run.

    ``grad_read="int8"`` (``MemoryConfig.grad_read``): the walk reads the lookups' output
    gradients packed as int8 rows, a bf16 scale a row (:func:`memlayers.ops.read_copy.
    pack_rows`), half the bytes of bf16 rows; each lookup's score gradient still takes
    its float output gradient. A pass that asks for the table's gradient itself
    (``torch.autograd.grad(loss, [table, ...])``) gets each lookup's own float walk, as
    with ``merge_grads=False``.
    """

    def __init__(self, grad_read: str = "float") -> None:
        if grad_read not in GRAD_READS:
            raise ValueError(f"grad_read must be one of {GRAD_READS}, got grad_read={grad_read!r}")
        self.grad_read = grad_read
        self.task = -1  # the graph task the list below belongs to
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.warned = False  # the one warning about hooks on the table (lookup)

    def lookup(
        self,
        weight: torch.Tensor,
        indices: torch.Tensor,
        weights: torch.Tensor,
        impl: str,
        read: QuantizedRows | None = None,
        check_indices: bool = True,
    ) -> torch.Tensor:
        """``[B, D]`` weighted sums, as :func:`memlayers.ops.embedding_bag` with
        ``sparse_grad=True``, the table's gradient deferred to the end of the backward.
        ``read``: the table's int8 read copy, which the sums and the score gradient read
        instead of its rows (:func:`read_copy_lookup`); ``check_indices``: as the lookup's."""
        if not (torch.is_grad_enabled() and weight.requires_grad):
            if read is not None:
                return read_copy_lookup(weight, read, indices, weights, impl, True, check_indices)
            return embedding_bag(weight, indices, weights, impl=impl, check_indices=check_indices)
        if read is not None:
            check_embedding_bag_inputs(weight, indices, weights)
            check_read_copy(read, weight)
        if not self.warned and any(_hooks(weight, kind) for kind in _HOOKS):
            self.warned = True
            warnings.warn(
                "a value table with merged gradients (MemoryConfig.merge_grads=True) has "
                "gradient hooks: they get the merged gradient at the end of the backward, "
                "and autograd also calls its tensor hooks with None during it; use "
                "merge_grads=False for hooks that need every lookup's gradient",
                stacklevel=3,
            )
        return _TableLookup.apply(weight, indices, weights, self, impl, read, True, check_indices)

    def add(self, weight, indices, weights, grad_out, impl) -> bool:
        """Hand over one lookup's ``(indices, weights, grad_out)`` from its backward.
        False when this pass asks for the table's gradient itself
        (``torch.autograd.grad(loss, [table, ...])``: returned, not accumulated), which
        the lookup's backward then returns as a lookup of its own would."""
        node = torch.autograd.graph.get_gradient_edge(weight).node
        try:
            if not torch._C._will_engine_execute_node(node):
                return True  # this pass does not accumulate into the table: nothing to do
        except RuntimeError:  # torch refuses to say for a leaf asked for by autograd.grad
            return False
        task = torch._C._current_graph_task_id()
        if task != self.task:  # the first in this pass: run the merged walk at its end
            self.task, self.pending = task, []
            items = self.pending
            leaf = node.variable  # the parameter itself (``weight`` may be an alias of it)
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: self.flush(leaf, items, impl)
            )
        self.pending.append((indices, weights, grad_out))
        return True

    def flush(self, weight: torch.Tensor, items: list, impl: str) -> None:
        """The table's gradient over one pass's lookups, added to ``weight.grad`` (the
        leaf's), with the leaf's tensor hooks before and its post-accumulate hooks after."""
        if items is self.pending:
            self.task, self.pending = -1, []
        if not items:
            return
        idx = torch.cat([i for i, _, _ in items])  # [ΣB, K]: the bags of every lookup
        w = torch.cat([x for _, x, _ in items])
        g = torch.cat([x for _, _, x in items])  # [ΣB, D]
        items.clear()
        with torch.no_grad():
            if self.grad_read == "int8":
                grad = value_grad_packed(weight.detach(), idx, w.detach(), pack_rows(g, impl), impl)
            else:
                grad, _ = embedding_bag_grads(
                    weight.detach(), idx, w.detach(), g, need_values=True, need_weights=False,
                    impl=impl, sparse_grad=True,
                )  # fmt: skip
        for hook in _hooks(weight, "_backward_hooks"):
            changed = hook(grad)
            grad = grad if changed is None else changed
        with torch.no_grad():
            weight.grad = grad if weight.grad is None else weight.grad + grad
        for hook in _hooks(weight, "_post_accumulate_grad_hooks"):
            hook(weight)


def read_copy_lookup(
    weight: torch.Tensor,
    read: QuantizedRows,
    indices: torch.Tensor,
    weights: torch.Tensor,
    impl: str = "auto",
    sparse_grad: bool = False,
    check_indices: bool = True,
) -> torch.Tensor:
    """``[B, D]`` weighted sums of the rows of ``weight [N, D]`` as its int8 read copy
    ``read`` holds them (:mod:`memlayers.ops.read_copy`), in ``weight``'s dtype: fp32
    sums of the dequantized rows. The gradients are those of the sums as computed: the
    score gradient from the copy's rows, the value gradient (row-sparse with
    ``sparse_grad``) the lookup's as if it had read ``weight``'s rows (straight through).
    Inputs checked as :func:`memlayers.ops.embedding_bag` checks them."""
    check_embedding_bag_inputs(weight, indices, weights)
    check_read_copy(read, weight)
    if torch.is_grad_enabled() and (weight.requires_grad or weights.requires_grad):
        return _TableLookup.apply(weight, indices, weights, None, impl, read, sparse_grad,
                                  check_indices)  # fmt: skip
    return embedding_bag_quantized(
        read, indices, weights, impl=impl, out_dtype=weight.dtype, check_indices=check_indices
    )


class _TableLookup(torch.autograd.Function):
    """A lookup whose table gradient is deferred to ``merged``'s walk at the end of the
    pass (None: returned at once), or which reads the table's int8 copy ``read``
    (None: its rows), or both."""

    @staticmethod
    def forward(ctx, weight, indices, weights, merged, impl, read, sparse_grad, check=True):
        ctx.save_for_backward(weight, indices, weights)
        ctx.merged, ctx.impl, ctx.read, ctx.sparse_grad = merged, impl, read, sparse_grad
        if read is None:
            return embedding_bag(weight, indices, weights, impl=impl, check_indices=check)
        return embedding_bag_quantized(
            read, indices, weights, impl=impl, out_dtype=weight.dtype, check_indices=check
        )

    @staticmethod
    def backward(ctx, grad_out):
        weight, indices, weights = ctx.saved_tensors
        merged, read = ctx.merged, ctx.read
        need_dw = ctx.needs_input_grad[2]
        direct = ctx.needs_input_grad[0] and (
            merged is None
            or not merged.add(weight, indices, weights, grad_out.contiguous(), ctx.impl)
        )
        grad = dw = None
        if direct or (need_dw and read is None):
            grad, dw = embedding_bag_grads(
                weight, indices, weights, grad_out, need_values=direct,
                need_weights=need_dw and read is None, impl=ctx.impl, sparse_grad=ctx.sparse_grad,
            )  # fmt: skip
        if need_dw and read is not None:
            dw = score_grad_read(read, indices, grad_out, ctx.impl).to(weights.dtype)
        return grad, None, dw, None, None, None, None, None
