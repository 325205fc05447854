"""Offloaded value tables (memlayers/ops/offloaded.py, memlayers/offload.py): the table in
host memory or memory-mapped from a file, the rows read gathered to the lookup's device.
Every result is compared exactly with the same model's on-device lookup: the compact table
holds the same rows, summed in the same order."""

import copy
from pathlib import Path

import pytest
import torch
from test_eval import TINY_BIOS  # a ~30k-parameter Memory+ run on 30 bios people
from test_generate import V, model_of  # a 3-layer model, two memory layers, one table

from memlayers.checkpoint import CheckpointError, load_model_from_checkpoint
from memlayers.cli import main as cli_main
from memlayers.config import load_config
from memlayers.generate import generate
from memlayers.memory import MemoryConfig, MemoryValues, ProductKeyMemory
from memlayers.offload import cache_hot_rows_, offload_tables_, set_offload_mode_
from memlayers.ops.offloaded import HostTable, hottest_rows, map_tensors, save_table
from memlayers.quantize import quantize_run, quantize_tables_, table_format
from memlayers.run import load_run
from memlayers.train import train

FORMATS = {"float": None, "int8": 8, "int4": 4}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _layer(dtype=torch.float32, bits=None, device="cpu"):
    torch.manual_seed(0)
    values = MemoryValues(64, 24, dtype=dtype, device=device).eval()
    cfg = MemoryConfig(n_keys=8, heads=2, topk=4, v_dim=24)
    layer = ProductKeyMemory(16, cfg, values, device=device).eval()
    if bits is not None:
        values.quantize_(bits)
    return layer, values


def _table(values: MemoryValues) -> tuple[torch.Tensor, ...]:
    q = values.quantized
    return (values.weight.detach(),) if q is None else (q.data, q.scales)


def file_backed(t: torch.Tensor, path: Path) -> bool:
    """Whether ``t``'s memory lies in a mapping of the file ``path`` (Linux)."""
    ptr, name = t.data_ptr(), str(Path(path).resolve())
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == name:
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            if lo <= ptr < hi:
                return True
    return False


needs_proc_maps = pytest.mark.skipif(
    not Path("/proc/self/maps").is_file(), reason="file-backed check reads /proc/self/maps (Linux)"
)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("bits", list(FORMATS.values()), ids=list(FORMATS))
def test_layer_output_equals_on_device(dtype, bits):
    layer, values = _layer(dtype, bits)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        ref = layer(x)
    values.offload_()
    assert values.offloaded is not None and not list(values.buffers())
    assert not list(values.parameters()) and values.state_dict() == {}
    with torch.no_grad():
        assert torch.equal(layer(x), ref)
    assert "offloaded=host" in repr(values)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("bits", list(FORMATS.values()), ids=list(FORMATS))
def test_host_table_lookup_many_duplicates(bits, impl):
    # Bags that read few distinct rows many times: U << B*K, inverse indices repeat.
    # Triton runs on the GPU where there is one (the interpreter's CPU tensors otherwise).
    dev = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    _, values = _layer(bits=bits, device=dev)
    g = torch.Generator().manual_seed(1)
    idx = (torch.randint(0, 6, (9, 8), generator=g) * 7).to(dev)  # 6 distinct rows of 64
    w = torch.randn(9, 8, generator=g).to(dev)
    ref = values.lookup(idx, w, impl=impl)
    values.offload_()
    assert torch.equal(values.lookup(idx, w, impl=impl), ref)


@pytest.mark.parametrize("bits", list(FORMATS.values()), ids=list(FORMATS))
def test_model_forward_and_greedy_generate_equal_on_device(bits):
    model = model_of("memory+").eval()
    if bits is not None:
        quantize_tables_(model, bits)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(prompt)
    tokens = model.generate(prompt, 20)
    (table,) = offload_tables_(model)
    assert table is model.memory_values and table.offloaded is not None
    model.to("cpu")  # moving the model leaves an offloaded table where it is
    with torch.no_grad():
        assert torch.equal(model(prompt), logits)
    assert torch.equal(model.generate(prompt, 20), tokens)


@pytest.mark.parametrize("bits", list(FORMATS.values()), ids=list(FORMATS))
def test_device_cache_of_hot_rows_gives_the_same_sums(bits):
    _, values = _layer(bits=bits)
    idx, w = _bags()
    ref = values.lookup(idx, w)
    values.offload_()
    table = values.offloaded
    assert table.cache_stats() is None
    read = torch.unique(idx)
    table.cache_rows_(read[::2], "cpu")  # half the rows read: hits and misses
    assert torch.equal(values.lookup(idx, w), ref)
    stats = table.cache_stats()
    assert stats["rows"] == len(read[::2]) and stats["reads"] == len(read)
    assert stats["hits"] == len(read[::2])
    table.cache_stats(reset=True)
    table.cache_rows_(torch.arange(64), "cpu")  # all: nothing from the host
    assert torch.equal(values.lookup(idx, w), ref)
    assert table.cache_stats()["hit_rate"] == 1.0
    table.cache_rows_(torch.tensor([3]), "cpu")  # one: nearly all from the host
    assert torch.equal(values.lookup(idx, w), ref)
    with pytest.raises(ValueError, match="index 64 is out of range for a table of 64 rows"):
        values.lookup(torch.tensor([[0, 64]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="index 70 is out of range"):
        table.cache_rows_(torch.tensor([1, 70]), "cpu")
    table.cache_rows_(torch.tensor([], dtype=torch.long), "cpu")  # drops the cache
    assert table.cache_stats() is None and torch.equal(values.lookup(idx, w), ref)


@pytest.mark.parametrize(
    "mode", [None, "gather", "zero-copy"], ids=["on-device", "gather", "zero-copy"]
)
@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
@pytest.mark.parametrize("bad", [64, -1], ids=["past-the-end", "negative"])
def test_every_quantized_lookup_refuses_an_index_outside_the_table(bits, mode, bad):
    # Plain indexing of the packed rows read row 63 for -1 (the PyTorch lookup on the
    # CPU: on the device and zero-copy); each way of serving the table names the index.
    _, values = _layer(bits=bits)
    if mode is not None:
        values.offload_(mode=mode)
    with pytest.raises(ValueError, match=f"index {bad} is out of range for a table of 64 rows"):
        values.lookup(torch.tensor([[0, bad]]), torch.ones(1, 2))


def test_staging_buffers_never_outgrow_the_table():
    # They grow by doubling and stay for the table's life (pinned, on a GPU): a lookup of
    # 0.61 N rows after one of 0.6 N took 1.2 N rows, more than the table itself.
    table = HostTable((torch.zeros(1000, 8),))
    sizes = []
    for u in (100, 150, 600, 610, 1000, 700):
        views = table._buffers(u, pin=False)
        assert views[0].shape == (u, 8)
        sizes.append(table._staging[0].shape[0])
    assert sizes == [100, 200, 600, 1000, 1000, 1000]
    assert table._staging[0].nbytes <= table.nbytes


def test_set_offload_mode_serves_the_same_host_tensors_another_way():
    model = model_of("memory+").eval()
    quantize_tables_(model, 4)
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = model.generate(prompt, 12)
    with pytest.raises(ValueError, match="no offloaded value table"):
        set_offload_mode_(model, "zero-copy")
    (values,) = offload_tables_(model)
    gathered = values.offloaded
    assert set_offload_mode_(model, "zero-copy") == [values]
    host = values.offloaded
    assert host.mode == "zero-copy" and (host.bits, host.group) == (4, gathered.group)
    assert all(a is b for a, b in zip(host.tensors, gathered.tensors, strict=True))
    assert torch.equal(model.generate(prompt, 12), tokens)
    with pytest.raises(ValueError, match="offload mode must be one of"):
        set_offload_mode_(model, "pinned")


def test_hottest_rows():
    counts = torch.tensor([0, 5, 2, 5, 0, 1])
    assert hottest_rows(counts, 3).tolist() == [1, 3, 2]  # ties by row id
    assert hottest_rows(counts, 10).tolist() == [1, 3, 2, 5]  # never read: left out
    assert hottest_rows(counts, 0).tolist() == []
    with pytest.raises(ValueError, match="must be >= 0"):
        hottest_rows(counts, -1)


def test_cache_hot_rows_of_a_model_keeps_its_tokens():
    model = model_of("memory+").eval()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    tokens = model.generate(prompt, 20)
    with pytest.raises(ValueError, match="no offloaded value table"):
        cache_hot_rows_(model, prompt, 8, "cpu")
    offload_tables_(model)
    (info,) = cache_hot_rows_(model, prompt, 8, "cpu")  # counted on the prompt
    assert info["rows"] == 8 and info["read"] >= 8
    assert torch.equal(model.generate(prompt, 20), tokens)
    assert 0 < model.memory_values.offloaded.cache_stats()["hit_rate"] < 1
    assert all(layer.usage is None for layer in model.memory_layers())  # counting stopped


def _bags(n_rows=64, b=9, k=8, device="cpu"):
    g = torch.Generator().manual_seed(2)
    return (torch.randint(0, n_rows, (b, k), generator=g).to(device),
            torch.randn(b, k, generator=g).to(device))  # fmt: skip


def test_memory_mapped_file_round_trip(tmp_path):
    path = tmp_path / "table.safetensors"
    idx, w = _bags()
    for bits in FORMATS.values():
        _, values = _layer(torch.bfloat16, bits)
        ref = values.lookup(idx, w)
        save_table(path, _table(values), values.bits, values.group)
        # Another table (other values) takes the file's: the same sums, rows read from disk.
        torch.manual_seed(5)
        fresh = MemoryValues(64, 24, dtype=torch.bfloat16).eval()
        if bits is not None:
            fresh.quantize_(bits)
        assert not torch.equal(fresh.lookup(idx, w), ref)
        fresh.offload_(path)
        assert fresh.offloaded.file == path
        assert torch.equal(fresh.lookup(idx, w), ref)
        if Path("/proc/self/maps").is_file():
            assert all(file_backed(t, path) for t in fresh.offloaded.tensors)


@pytest.mark.parametrize("bits", list(FORMATS.values()), ids=list(FORMATS))
def test_zero_copy_reads_the_rows_in_place(bits, tmp_path, monkeypatch):
    # mode="zero-copy": lookups read the host table itself (no unique, no gather), the
    # same sums, a file's mapping too; quantizing an offloaded table keeps its mode.
    layer, values = _layer(torch.bfloat16, bits)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        ref = layer(x)
    path = tmp_path / "table.safetensors"
    save_table(path, _table(values), values.bits, values.group)
    values.offload_(mode="zero-copy")
    host = values.offloaded
    assert host.mode == "zero-copy" and host.device == torch.device("cpu")
    assert all(r is t for r, t in zip(host.resident, host.tensors, strict=True))
    monkeypatch.setattr(HostTable, "gather", lambda *a: pytest.fail("a zero-copy lookup gathered"))
    with torch.no_grad():
        assert torch.equal(layer(x), ref)
    assert "zero-copy from cpu" in repr(values)
    with pytest.raises(ValueError, match="nothing to gather"):
        host.cache_rows_(torch.arange(3), "cpu")
    _, mapped = _layer(torch.bfloat16, bits)
    mapped.offload_(path, mode="zero-copy")
    if Path("/proc/self/maps").is_file():  # on the CPU the file's mapping is read in place
        assert all(file_backed(t, path) for t in mapped.offloaded.tensors)
    idx, w = _bags()
    assert torch.equal(mapped.lookup(idx, w), values.lookup(idx, w))
    if bits is None:
        _, q = _layer(torch.bfloat16, 8)
        values.quantize_(8)
        assert values.offloaded.mode == "zero-copy"
        assert torch.equal(values.lookup(idx, w), q.lookup(idx, w))
    with pytest.raises(ValueError, match="offload mode must be one of .*'pinned'"):
        _layer()[1].offload_(mode="pinned")
    # A deep copy (of a model, say) shares the read-only table, not a copy of it.
    twin = copy.deepcopy(mapped)
    assert all(a is b for a, b in zip(twin.offloaded.resident, mapped.offloaded.resident,
                                      strict=True))  # fmt: skip
    assert torch.equal(twin.lookup(idx, w), mapped.lookup(idx, w))


@needs_proc_maps
def test_map_tensors_are_views_of_the_file_not_copies(tmp_path):
    path = tmp_path / "big.safetensors"
    w = torch.arange(1 << 16, dtype=torch.float32).view(256, 256)
    save_table(path, (w,))
    tensors, meta = map_tensors(path)
    t = tensors["weight"]
    assert torch.equal(t, w) and meta == {}
    assert file_backed(t, path)
    assert not file_backed(w, path)  # the check can say no


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("offload") / "run"
    train(load_config([], [*TINY_BIOS, f"run_dir={run}"]))
    return run


@needs_proc_maps
def test_load_run_offloaded_maps_the_checkpoint(run_dir):
    ref = load_run(run_dir, "cpu").model
    trained = load_run(run_dir, "cpu", offload=True)
    model, ckpt = trained.model, trained.checkpoint
    table = model.memory_values.offloaded
    assert table.file == ckpt / "model.safetensors"
    assert file_backed(table.tensors[0], table.file)
    assert torch.equal(table.tensors[0], ref.memory_values.weight)
    assert "memory_values.weight" not in model.state_dict()
    # Every other weight loaded: the state dicts agree except for the table.
    want = {k: v for k, v in ref.state_dict().items() if k != "memory_values.weight"}
    got = model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert table_format(model)["format"] == "float32"


def test_generate_offloaded_equals_on_device(run_dir, capsys):
    prompt = "Which city was"
    ref = generate(str(run_dir), prompt, 12, device="cpu")
    assert generate(str(run_dir), prompt, 12, device="cpu", offload=True) == ref
    # Quantized on the fly (on the host), and a quantized run (its packed rows mapped).
    q = generate(str(run_dir), prompt, 12, device="cpu", quantized=4)
    assert generate(str(run_dir), prompt, 12, device="cpu", quantized=4, offload=True) == q
    int8 = quantize_run(run_dir, 8, progress=False)
    q8 = generate(str(int8.out), prompt, 12, device="cpu")
    assert generate(str(int8.out), prompt, 12, device="cpu", offload=True) == q8
    argv = ["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12"]
    assert cli_main([*argv, "--device", "cpu", "--offload"]) == 0
    assert capsys.readouterr().out == prompt + ref[0] + "\n"
    # Zero-copy: the file read into RAM, the rows read in place.
    assert generate(str(run_dir), prompt, 12, device="cpu", offload="zero-copy") == ref
    assert cli_main([*argv, "--device", "cpu", "--zero-copy"]) == 0
    assert capsys.readouterr().out == prompt + ref[0] + "\n"
    # The flag before the run directory (it takes no value).
    assert cli_main(["generate", "--offload", *argv[1:], "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + ref[0] + "\n"
    zc = load_run(run_dir, "cpu", offload="zero-copy").model.memory_values.offloaded
    assert zc.mode == "zero-copy" and zc.file.name == "model.safetensors"


def test_generate_zero_copy_quantized_never_page_locks_the_float_table(run_dir, monkeypatch):
    # --zero-copy --quantized: the float table is read from the file's mapping (gather)
    # to quantize it; only the packed table becomes zero-copy (on a GPU, page-locked).
    prompt = "Which city was"
    want = generate(str(run_dir), prompt, 12, device="cpu", quantized=4, offload=True)
    made = []
    init = HostTable.__init__

    def spy(self, tensors, bits=None, group=None, dim=None, file=None, mode="gather",
            device=None):  # fmt: skip
        made.append((mode, bits))
        init(self, tensors, bits, group, dim, file, mode, device)

    monkeypatch.setattr(HostTable, "__init__", spy)
    got = generate(str(run_dir), prompt, 12, device="cpu", quantized=4, offload="zero-copy")
    assert got == want
    assert ("zero-copy", None) not in made and made[-1] == ("zero-copy", 4)


def test_eval_offloaded_equals_on_device(run_dir, capsys):
    from memlayers.eval import evaluate

    kw = dict(device="cpu", max_qa=20, progress=False, write=False)
    ref = evaluate(run_dir, **kw)
    got = evaluate(run_dir, offload=True, **kw)
    assert got["value_table"] == {**ref["value_table"], "offloaded": True,
                                  "offload_mode": "gather"}  # fmt: skip
    for section in ("perplexity", "qa", "knowledge", "usage"):
        assert got[section] == ref[section], section
    argv = ["eval", str(run_dir), "--device", "cpu", "--max-qa", "5", "--offload"]
    assert cli_main(argv) == 0
    assert "float32: 8,192 bytes, offloaded to host memory" in capsys.readouterr().out


def test_training_and_backward_are_refused():
    layer, values = _layer()
    values.offload_()
    x = torch.randn(2, 16)
    values.train()
    with pytest.raises(ValueError, match="offloaded to host memory: it serves lookups in eval"):
        layer(x)
    values.eval()
    with pytest.raises(ValueError, match="serves lookups only \\(no backward through it\\)"):
        layer(x)  # grad enabled: the router's weights want a gradient
    with pytest.raises(AttributeError, match="offloaded to host memory .*no weight on the dev"):
        _ = values.weight  # what an optimizer or an export reads
    with pytest.raises(ValueError, match="offloaded already"):
        values.offload_()
    with pytest.raises(ValueError, match="index 64 is out of range for a table of 64 rows"):
        values.lookup(torch.tensor([[0, 64]]), torch.ones(1, 2))


def test_bad_files_are_named(tmp_path):
    _, values = _layer()
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match=f"value table file not found: {missing}"):
        values.offload_(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="is not a safetensors file"):
        values.offload_(junk)
    path = tmp_path / "t.safetensors"
    save_table(path, (torch.zeros(32, 24),))
    with pytest.raises(ValueError, match=r"weight is \[32, 24\] torch.float32, the table needs"):
        values.offload_(path)
    save_table(path, (torch.zeros(64, 24, dtype=torch.bfloat16),))
    with pytest.raises(ValueError, match=r"weight is \[64, 24\] torch.bfloat16.*float32"):
        values.offload_(path)
    with pytest.raises(ValueError, match="has no tensor 'memory_values.weight'"):
        values.offload_(path, prefix="memory_values.")
    _, q = _layer(bits=4)
    with pytest.raises(ValueError, match="has no tensor 'qdata'"):
        q.offload_(path)
    assert values.offloaded is None and values.weight.shape == (64, 24)  # left as it was
    with torch.device("meta"):
        meta = MemoryValues(64, 24)
    with pytest.raises(ValueError, match="meta-device value table has no values"):
        meta.offload_()
    with pytest.raises(ValueError, match="host table lives on the CPU"):
        HostTable((torch.zeros(4, 2, device="meta"),))


def test_a_dense_run_has_nothing_to_offload():
    with pytest.raises(ValueError, match="no memory value table to offload"):
        offload_tables_(model_of("dense"))


def test_dcp_checkpoints_are_refused(tmp_path):
    from memlayers.offload import model_offloaded_from_checkpoint

    with pytest.raises(CheckpointError, match="DCP checkpoint: .*consolidate"):
        model_offloaded_from_checkpoint(tmp_path, {"layout": "dcp"}, "cpu")


def test_an_offloaded_model_is_not_saved(tmp_path):
    # Its state_dict lacks the table: a checkpoint of it would load as a broken run.
    from memlayers.checkpoint import save_checkpoint, save_distributed_checkpoint

    model = model_of("memory+")
    offload_tables_(model)
    for save in (save_checkpoint, save_distributed_checkpoint):
        with pytest.raises(CheckpointError, match="offloaded to host memory"):
            save(tmp_path / "ckpt", 1, model)
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


def _check_table_leaves_the_device(mode: str) -> None:
    """A 2 MB table offloaded with ``mode`` frees its device memory, and a lookup from it
    puts no table back there."""
    big = MemoryValues(1 << 14, 64, dtype=torch.bfloat16, device="cuda").eval()
    idx, w = _bags(1 << 14, b=64, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    big.offload_(mode=mode)
    freed = before - torch.cuda.memory_allocated()
    assert freed >= big.offloaded.nbytes, (freed, big.offloaded.nbytes)
    with torch.no_grad():
        out = big.lookup(idx, w)
    assert out.shape == (64, 64)
    # What the lookup leaves on the device: its output and, gathering, the bags' rows
    # (at most 64 x 16 of the table's 16,384), never the table.
    grown = torch.cuda.memory_allocated() - (before - freed)
    assert grown < big.offloaded.nbytes // 4, (grown, big.offloaded.nbytes)


def _gpu_layer_saved(bits, tmp_path):
    """A bf16 layer on the GPU, an input, its output, and its table saved to a file."""
    layer, values = _layer(torch.bfloat16, bits, device="cuda")
    x = torch.randn(64, 16, device="cuda")
    with torch.no_grad():
        ref = layer(x)
    path = tmp_path / "table.safetensors"
    save_table(path, _table(values), values.bits, values.group)
    return layer, values, x, ref, path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU test)")
@pytest.mark.parametrize("bits", list(FORMATS.values()), ids=list(FORMATS))
def test_gpu_table_stays_on_the_host(bits, tmp_path):
    layer, values, x, ref, path = _gpu_layer_saved(bits, tmp_path)
    values.offload_()
    assert all(t.device.type == "cpu" for t in values.offloaded.tensors)
    with torch.no_grad():
        for _ in range(3):  # the staging buffers are reused: each copy waits for the last
            assert torch.equal(layer(x), ref)
    assert all(b.is_pinned() for b in values.offloaded._staging)
    _check_table_leaves_the_device("gather")
    # The same from a memory-mapped file, and a whole model's greedy tokens.
    idx, w = _bags(device="cuda")
    want = values.lookup(idx, w)
    _, mapped = _layer(torch.bfloat16, bits, device="cuda")
    mapped.offload_(path)
    assert torch.equal(mapped.lookup(idx, w), want)
    model = model_of("memory+").to("cuda").eval()
    prompt = torch.randint(0, V, (2, 5), device="cuda")
    tokens = model.generate(prompt, 20)
    offload_tables_(model)
    assert model.memory_values.offloaded.tensors[0].device.type == "cpu"
    assert torch.equal(model.generate(prompt, 20), tokens)
    cache_hot_rows_(model, prompt, 16, "cuda")  # with a device cache of hot rows
    assert model.memory_values.offloaded._cached[0].device.type == "cuda"
    assert torch.equal(model.generate(prompt, 20), tokens)
    assert model.memory_values.offloaded.cache_stats()["hits"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU test)")
@pytest.mark.parametrize("bits", list(FORMATS.values()), ids=list(FORMATS))
def test_gpu_zero_copy_table_is_read_in_place(bits, tmp_path):
    # The host table page-locked and aliased on the device: lookups read it over the bus,
    # the same sums as on the device; no table on the device; indices from elsewhere refused.
    layer, values, x, ref, path = _gpu_layer_saved(bits, tmp_path)
    values.offload_(mode="zero-copy")
    host = values.offloaded
    assert host.device == torch.device("cuda", torch.cuda.current_device())
    assert all(t.device.type == "cpu" for t in host.tensors)
    assert all(r.is_cuda and r.data_ptr() == t.data_ptr()
               for r, t in zip(host.resident, host.tensors, strict=True))  # fmt: skip
    with torch.no_grad():
        assert torch.equal(layer(x), ref)
    _check_table_leaves_the_device("zero-copy")
    host.tensors[0][0].zero_()  # the device reads the host's memory: it sees the write
    torch.cuda.synchronize()
    assert not host.resident[0][0].any()
    idx, w = _bags()
    with pytest.raises(ValueError, match="read from cuda:0, got indices on cpu"):
        values.lookup(idx, w)
    _, mapped = _layer(torch.bfloat16, bits, device="cuda")
    mapped.offload_(path, mode="zero-copy")  # out of the file, then page-locked
    _, on_device = _layer(torch.bfloat16, bits, device="cuda")
    idx, w = _bags(device="cuda")
    assert torch.equal(mapped.lookup(idx, w), on_device.lookup(idx, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (a GPU test)")
def test_gpu_generate_offloaded_run(run_dir):
    prompt = "Which city was"
    ref = generate(str(run_dir), prompt, 12, device="cuda")
    assert generate(str(run_dir), prompt, 12, device="cuda", offload=True) == ref
    q = generate(str(run_dir), prompt, 12, device="cuda", quantized=4, offload=True)
    for compile in (False, True):
        got = generate(str(run_dir), prompt, 12, device="cuda", offload="zero-copy",
                       compile=compile)  # fmt: skip
        assert got == ref
        # Quantized from the mapped file, then only the packed table page-locked.
        got = generate(str(run_dir), prompt, 12, device="cuda", quantized=4,
                       offload="zero-copy", compile=compile)  # fmt: skip
        assert got == q
    model = load_model_from_checkpoint(run_dir, "cuda")  # for its table
    trained = load_run(run_dir, "cuda", offload=True)
    assert trained.model.memory_values.offloaded.tensors[0].device.type == "cpu"
    assert next(trained.model.parameters()).device.type == "cuda"
    assert torch.equal(
        trained.model.memory_values.offloaded.tensors[0], model.memory_values.weight.cpu()
    )
