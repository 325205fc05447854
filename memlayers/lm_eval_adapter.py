"""Standard benchmarks through lm-evaluation-harness (``lm-eval``): two model types.

    memlayers lm-eval runs/x --tasks arc_easy,hellaswag --batch-size 16
    memlayers lm-eval runs/x --tasks my_task --include-path my_tasks/ --limit 100
    memlayers lm-eval smollm2-memory --hf --tasks arc_easy   # saved after add_memory
    memlayers lm-eval smollm2-memory --hf --tokenizer HuggingFaceTB/SmolLM2-135M --tasks ...

From Python, importing this module registers both types with the harness:

    import lm_eval, memlayers.lm_eval_adapter
    lm_eval.simple_evaluate(model="memlayers", model_args={"run": "runs/x"}, tasks=[...])
    lm_eval.simple_evaluate(model="memlayers-hf", model_args={"pretrained": "smollm2-memory"})
    lm_eval.simple_evaluate(model="memlayers-hf",
                            model_args={"pretrained": "smollm2-memory", "tokenizer": "tok/"})

- ``memlayers``: a run directory or one of its checkpoints (:func:`memlayers.run.load_run`,
  quantized runs included), scored by this module. Every context starts after an EOS, as
  training documents do in the packed stream (and as ``memlayers generate`` prompts).
- ``memlayers-hf``: a Hugging Face model saved after :func:`memlayers.hf.add_memory`,
  loaded with :func:`memlayers.hf.load_pretrained_with_memory` and scored by the harness's
  own ``HFLM``. The harness's plain ``hf`` type would drop the memory weights it does not
  know (with a warning) and evaluate the model without its memory. Its tokenizer is the
  one saved beside the model (``tokenizer.save_pretrained(dir)``) or, with ``tokenizer``
  (``--tokenizer``), another directory or hub name; a directory with neither is refused
  before anything loads (:func:`check_hf_tokenizer`).

The harness's own CLI (``lm_eval --model ...``) knows only its built-in types; use
``memlayers lm-eval`` or import this module first. Only this module imports ``lm_eval``
(the ``eval`` extra), and ``memlayers-hf`` imports transformers only when it is used.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "memlayers.lm_eval_adapter needs lm-evaluation-harness: pip install 'memlayers[eval]'"
    ) from e
from tqdm import tqdm

from memlayers.model import KVCache, restricted_vocab
from memlayers.run import load_run

DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default for generate_until tasks


def _batch_size(batch_size) -> int:
    """The harness passes ``--batch_size`` as given: an int, a digit string, ``"auto"``."""
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, str) and batch_size.isdigit():
        batch_size = int(batch_size)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return batch_size


@register_model("memlayers")
class MemlayersLM(TemplateLM):
    """A memlayers run as an lm-eval model: batched log-likelihoods, greedy generation.

    ``run``: a run directory or checkpoint; ``device``: auto | cpu | cuda[:i];
    ``batch_size``: sequences per forward pass (log-likelihoods); ``max_gen_toks``: the
    default generation length when a task sets none. ``max_batch_size`` is accepted (the
    harness always passes it) and unused: there is no automatic batch size.
    """

    def __init__(
        self,
        run: str | None = None,
        device: str | None = "auto",
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    ) -> None:
        super().__init__()
        if run is None:
            raise ValueError("the memlayers model needs a run: model_args='run=RUN_DIR'")
        self.batch_size = _batch_size(batch_size)
        if int(max_gen_toks) < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {max_gen_toks!r}")
        self.max_gen_toks = int(max_gen_toks)
        self.trained = load_run(run, device or "auto")
        if self.trained.tokenizer is None:
            raise ValueError(f"{self.trained.run_dir}: the run has no tokenizer, so no text")
        self.model = self.trained.model  # in eval mode
        self.tok = self.trained.tokenizer
        self._device = next(self.model.parameters()).device
        self._warned_generation = False  # generate_until cut a max_gen_toks (warned once)

    # --- what TemplateLM needs ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"memlayers-{self.tok.kind}-{self.tok.vocab_size}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        """Token ids of ``string``, after an EOS unless ``add_special_tokens`` is False (the
        harness asks for that where it adds the prefix itself: empty contexts, rolling)."""
        try:
            ids = self.tok.encode(string)
        except KeyError as e:  # the closed vocabulary of synthetic data (bios)
            raise ValueError(f"cannot encode {string[:80]!r}: {e.args[0]}") from None
        return ids if add_special_tokens is False else [self.eot_token_id, *ids]

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def get_model_info(self) -> dict:
        """Written into the harness's results (``results["config"]``)."""
        return {
            "memlayers_run": str(self.trained.run_dir),
            "memlayers_checkpoint": str(self.trained.checkpoint),
            "memlayers_step": self.trained.step,
            "memlayers_tokens_trained": self.trained.tokens_trained,
        }

    # --- scoring --------------------------------------------------------------------

    def _rows(self, requests) -> list[tuple[list[int], list[int]]]:
        """``(inputs, targets)`` per request: the last ``max_length + 1`` tokens of context +
        continuation (truncated from the left, as the harness's HF model does), the inputs
        all but the last, the targets the continuation."""
        rows = []
        for key, context, continuation in requests:
            if not continuation:
                raise ValueError(f"empty continuation to score (request {key!r})")
            if len(continuation) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens does not fit "
                    f"max_seq_len={self.max_length} (request {key!r})"
                )
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole[:-1], continuation))
        return rows

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kw):
        """``(sum of log p(continuation | context), continuation is the greedy one)`` per
        ``((context, continuation) | None, context_ids, continuation_ids)``.

        Longest first, ``batch_size`` rows per forward, right-padded: attention is causal
        and every block acts per position, so padding after a row's last token leaves its
        logits unchanged. Log-softmax in fp32 over the continuation positions only (a
        ``(B, T, vocab)`` fp32 copy would be 4 GB at 16 x 2048 x 32k).
        """
        rows = self._rows(requests)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="memlayers loglikelihood", disable=disable_tqdm):
            batch = order[start : start + self.batch_size]
            T = len(rows[batch[0]][0])
            x = torch.full((len(batch), T), self.eot_token_id, dtype=torch.long)  # (b, T)
            for r, i in enumerate(batch):
                x[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = self.model(x.to(self._device))  # (b, T, vocab)
            for r, i in enumerate(batch):
                inputs, targets = rows[i]
                n = len(targets)
                logp = logits[r, len(inputs) - n : len(inputs)].float().log_softmax(-1)  # (n, V)
                t = torch.tensor(targets, device=logp.device)  # (n,)
                ll = logp.gather(-1, t[:, None]).sum().item()
                greedy = bool((logp.argmax(-1) == t).all())
                results[i] = (ll, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], (ll, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string after an EOS, in windows of ``max_length``
        (each token predicted once, with as much context as fits), windows of all strings
        batched together."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(string, add_special_tokens=False)
            for w in get_rolling_token_windows(ids, self.eot_token_id, self.max_length, 1):
                windows.append((None, *make_disjoint_window(w)))
                owner.append(k)
        totals = [0.0] * len(requests)
        scores = self._loglikelihood_tokens(windows, disable_tqdm)
        for k, (ll, _) in zip(owner, scores, strict=True):
            totals[k] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation -----------------------------------------------------------------

    @torch.no_grad()
    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        """Greedy continuation of ``ids`` with a KV cache, up to EOS, ``max_new`` tokens or
        the first stop string (cut off, with what follows it). Over the tokenizer's ids
        alone: a pretrained model's padded embedding rows never win
        (:func:`memlayers.model.restricted_vocab`, as eval's greedy answers)."""
        vocab = min(self.tok.vocab_size, self.model.config.vocab_size)
        with restricted_vocab(self.model, vocab) as model:
            return self._greedy_tokens(model, ids, max_new, until)

    def _greedy_tokens(self, model, ids: list[int], max_new: int, until: list[str]) -> str:
        cache = KVCache(len(model.layers), len(ids) + max_new)
        logits = model(torch.tensor([ids], device=self._device), cache)[0, -1]  # (V,)
        new: list[int] = []
        text = ""
        for _ in range(max_new):
            nxt = int(logits.argmax())
            if nxt == self.eot_token_id:
                break
            new.append(nxt)
            text = self.tok_decode(new)
            if any(s in text for s in until):
                break
            # a generated id: in range (the prompt's ids were checked)
            logits = model(torch.tensor([[nxt]], device=self._device), cache, check_ids=False)
            logits = logits[0, -1]
        for s in until:
            text = text.split(s, 1)[0]
        return text

    def _generation_window(self, ids: list[int], want: int) -> tuple[list[int], int]:
        """``(context ids kept, tokens to generate)`` within ``max_length``: the context's
        last ``max_length - want`` tokens, but never fewer than half the window (or all of
        a shorter context); the generation is cut to what is left, with a warning (once per
        model). Cutting the context instead left the harness's default ``max_gen_toks=256``
        on a model of ``max_seq_len`` <= 257 one token of it: the answer to no question."""
        keep = max(1, min(len(ids), max(self.max_length - want, self.max_length // 2)))
        max_new = min(want, self.max_length - keep)
        if max_new < want and not self._warned_generation:
            self._warned_generation = True
            warnings.warn(
                f"max_gen_toks={want} does not fit max_seq_len={self.max_length} beside the "
                f"context: generating at most {max_new} tokens after the context's last "
                f"{keep} of {len(ids)} (the context keeps at least half the window; this "
                f"warning is given once)",
                stacklevel=3,
            )
        return ids[len(ids) - keep :], max_new

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy only (``do_sample`` or a temperature > 0 is refused); one request at a
        time. The context keeps its last ``max_seq_len - max_gen_toks`` tokens, at least
        half the window: a longer ``max_gen_toks`` is cut, with a warning
        (:meth:`_generation_window`)."""
        out = []
        for req in tqdm(requests, desc="memlayers generate", disable=disable_tqdm):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                raise ValueError(
                    f"the memlayers model generates greedily; the task asks for sampling "
                    f"(do_sample={kwargs.get('do_sample')}, "
                    f"temperature={kwargs.get('temperature')})"
                )
            ids, max_new = self._generation_window(
                self.tok_encode(context), int(kwargs.get("max_gen_toks", self.max_gen_toks))
            )
            text = self._greedy(ids, max_new, until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out


# What AutoTokenizer loads a tokenizer from, one of them in a model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def check_hf_tokenizer(pretrained: str | Path, tokenizer: str | None = None) -> None:
    """Refuse a model directory ``pretrained`` holding none of :data:`TOKENIZER_FILES`
    when no ``tokenizer`` is given: ``save_pretrained`` of a model writes none, and
    ``HFLM`` would then fail on an unrelated message (a missing sentencepiece)."""
    if tokenizer is not None or any((Path(pretrained) / f).is_file() for f in TOKENIZER_FILES):
        return
    raise ValueError(
        f"{pretrained} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it there "
        f"(tokenizer.save_pretrained({str(pretrained)!r})) or name one with --tokenizer DIR "
        f"(model_args tokenizer=DIR)"
    )


def evaluate_tasks(
    target: str,
    tasks: list[str],
    hf: bool = False,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    bootstrap_iters: int = 100_000,
    tokenizer: str | None = None,
) -> dict:
    """``lm_eval.simple_evaluate`` of a run (or, with ``hf``, a retrofitted Hugging Face
    model directory) on ``tasks``: the harness's results dict. ``include_path``: a folder
    of task YAML files of one's own, added to the harness's tasks. ``tokenizer`` (``hf``
    only): a tokenizer directory or hub name, for a model directory saved without one."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if not Path(target).exists():
        raise ValueError(f"no such {'model directory' if hf else 'run directory'}: {target}")
    if tokenizer is not None and not hf:
        raise ValueError(
            f"--tokenizer {tokenizer} is for --hf model directories: a run uses its own"
        )
    if hf:
        check_hf_tokenizer(target, tokenizer)
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"--include-path {include_path} is not a directory")
    # Indexing the harness's ~13k built-in tasks takes 5 s: skip it when the folder holds
    # every task asked for.
    manager = (
        TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    )
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}"
            + ("" if include_path else " (a task of your own: --include-path DIR)")
        )
    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model_args = {"pretrained": target} if hf else {"run": target}
    if tokenizer is not None:
        model_args["tokenizer"] = tokenizer
    return lm_eval.simple_evaluate(
        model="memlayers-hf" if hf else "memlayers",
        model_args=model_args,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device=dev,
        task_manager=manager,
        bootstrap_iters=bootstrap_iters,
        log_samples=False,
    )


def _hf_model_class():
    """``memlayers-hf``: the harness's ``HFLM`` over :func:`load_pretrained_with_memory`.
    Built on first use, so importing this module imports neither transformers nor the
    harness's HF model (1.5 s here)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ImportError(
            f"the memlayers-hf model needs transformers and accelerate ({e}): "
            f"pip install 'memlayers[hf,eval]'"
        ) from e

    from memlayers.hf import load_pretrained_with_memory

    class MemlayersHFLM(HFLM):
        """``pretrained``: a directory saved after :func:`memlayers.hf.add_memory`;
        ``tokenizer``: a tokenizer directory (default: ``pretrained``); ``dtype``:
        float32 | bfloat16 | float16 | auto; other arguments go to ``HFLM``."""

        def __init__(
            self,
            pretrained: str,
            tokenizer: str | None = None,
            device: str | None = None,
            dtype: str = "auto",
            **kwargs,
        ) -> None:
            if not Path(pretrained).is_dir():
                raise ValueError(f"no such model directory: {pretrained}")
            check_hf_tokenizer(pretrained, tokenizer)
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
            model = load_pretrained_with_memory(pretrained, torch_dtype=torch_dtype).to(dev)
            super().__init__(pretrained=model.eval(), tokenizer=tokenizer or pretrained, **kwargs)

    return MemlayersHFLM


def __getattr__(name: str):  # PEP 562: the registry's placeholder below resolves here
    if name == "MemlayersHFLM":
        cls = _hf_model_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "memlayers-hf" not in model_registry:
    model_registry.register("memlayers-hf", target=f"{__name__}:MemlayersHFLM")
