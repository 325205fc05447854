"""A Memory+ layer learns a lookup task on the CPU in seconds.

    python examples/quickstart.py

Each of 4,096 random inputs must map to its own random target: pure memorisation, which
the layer's 65,536 value rows (4.2M parameters, 128 read per token) absorb. Prints the
loss as it falls and the memory usage statistics at the end.
"""

import time

import torch

from memlayers import MemoryConfig, MemoryValues, ProductKeyMemory, SparseValueAdam

torch.manual_seed(0)
dim, n_items, steps, batch = 64, 4096, 300, 256
inputs = torch.randn(n_items, dim)
targets = torch.randn(n_items, dim)

cfg = MemoryConfig(n_keys=256, heads=4, topk=32)  # 65,536 rows, bags of 128
values = MemoryValues(cfg.n_rows, dim, sparse_grad=True)  # row-sparse gradients
layer = ProductKeyMemory(dim, cfg, values=values)
dense = [p for n, p in layer.named_parameters()]  # the shared table isn't registered here
opt = torch.optim.AdamW(dense, lr=3e-3)
value_opt = SparseValueAdam(values.parameters(), lr=3e-2)  # 30x the paper's 1e-3
print(layer)
print(
    f"value table: {values.weight.numel():,} parameters; each token reads "
    f"{cfg.heads * cfg.topk} rows of {dim}"
)

t0 = time.time()
for step in range(steps + 1):
    idx = torch.randint(0, n_items, (batch,))
    loss = (layer(inputs[idx]) - targets[idx]).square().mean()
    opt.zero_grad()
    value_opt.zero_grad()
    loss.backward()
    opt.step()
    value_opt.step()
    if step % 50 == 0:
        print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - t0:.1f}s)")

usage = layer.track_usage()
with torch.no_grad():
    layer(inputs)
    final = (layer(inputs) - targets).square().mean().item()
print(f"final loss on all {n_items} items: {final:.4f} (the targets' variance is 1.0)")
print("memory usage:", {k: round(v, 3) for k, v in usage.report().items()})
