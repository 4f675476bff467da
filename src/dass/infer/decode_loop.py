"""A lean greedy decoding loop for Hugging Face causal LMs (gpt-fast style): static KV cache,
eager prefill, and one compiled 1-token decoding step, with no host synchronisation between
the steps.

Why it exists: HF ``generate()`` with a static cache and ``compile_config`` does compile each
decoding step into one CUDA graph, but around that graph every step also runs the logits
processors, the stopping criteria and a host read of ``unfinished_sequences`` (a device to
host copy, so the host waits for the GPU every step and the next step's launch is late). On
an H100 the dense 7B model at batch 1 reached about half of the memory roofline that way. A
user who wants speed runs a loop like this one instead; dense and 2:4 models are compared in
it (``dass generate --modes fast``, ``benchmarks/gpu_generate.py --loop fast``).

What one call does (:meth:`FastGreedy.generate`):

1. the batch size's :class:`~transformers.StaticCache` is reset (created on first use and
   kept: the compiled step's CUDA graph reads the cache's tensors at fixed addresses, so a
   new cache per call would make cudagraph trees record a new graph each call);
2. prefill, eager: one forward of the whole prompt with ``logits_to_keep=1`` (what
   ``generate()`` does), the first token = argmax of the last logits;
3. ``new_tokens - 1`` decoding steps, each one call of the compiled step
   ``model(input_ids=tok[:, None], position_ids=pos, cache=..., use_cache=True)
   .logits[:, -1].argmax(-1)``; its token is copied into a preallocated device tensor
   ``out[:, i]`` and into the next step's input ``tok`` (a [B] device tensor); the position
   is a 1-element device tensor incremented in place between steps. Nothing in the loop
   reads a device value on the host (no ``.item()``, no stopping checks): the host only
   queues work and runs ahead of the GPU.

The result equals ``generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
[:, prompt_len:]`` with a static cache: a fixed number of tokens, and, as
``min_new_tokens`` makes ``generate()`` do, the end-of-sequence tokens of the model's
``generation_config`` are never chosen (their logits are set to -inf inside the step, one
tiny in-graph write; ``ban_eos=False`` turns that off). Other logits processors a real
model's ``generation_config`` may ask for (a repetition penalty, say) are not applied: this
loop is plain argmax.

How position and cache are passed: transformers 5.x's static cache layers count the tokens
written themselves (``cumulative_length``, a device tensor updated in place, whose address
is static), so no ``cache_position`` is needed there; models whose ``forward`` still takes
``cache_position`` (transformers 4.x) are given ``pos`` as that too. ``position_ids`` (the
rotary positions) are ``pos`` broadcast over the batch. The attention mask is omitted: with
a static cache the model builds the causal mask over the cache's full length from the
cache's own offset, which is what ``generate()``'s all-ones mask gives for unpadded prompts
(the tests check the tokens against ``generate()``).

Compilation: only the decoding step is compiled, ``torch.compile(step, fullgraph=True,
dynamic=False)`` with inductor and ``mode="reduce-overhead"`` (CUDA graphs through
cudagraph trees) on CUDA, ``aot_eager`` elsewhere (the CPU tests: same kernels as eager, so
tokens are promised bit for bit). One compiled callable serves every batch size: Dynamo
compiles it once per batch size (its guards are the shapes and the cache object), and the
graph is reused by every later call at that batch size. Accelerated 2:4 modules are custom
operators while compiling (:mod:`dass.infer.ops`); :meth:`FastGreedy.prepare` makes their
per-token-count decisions before the first compile at a batch size, outside the compiled
region (:func:`dass.infer.ops.prepare_compile`). The prefill stays eager, so it is not
compiled per prompt length, and its 2:4 modules take their ordinary eager path.

On CUDA graph trees: the step's output (the next token) lives in the graph's memory pool
and is overwritten by the next replay, so it is copied into ``out`` before the next call;
the inputs ``tok`` and ``pos`` are not static addresses, so cudagraph trees copy them into
the graph's own input buffers at each replay (two tiny copies). The loop does not call
``torch.compiler.cudagraph_mark_step_begin()``: once called anywhere in a process, cudagraph
trees start a new generation only at such marks (``get_curr_generation`` in
``torch/_inductor/cudagraph_trees.py``), which would change how ``generate()``'s own compiled
loop behaves later in the same process. Without it, each call of a ``torch.compile``'d
function bumps Dynamo's generation counter on entry (torch 2.13's ``OptimizeContext``), so
each step starts a new generation and replays the root graph; the previous step's output
is then invalid, which is why it was copied out first.
"""

from __future__ import annotations

import inspect
import types
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["FastGreedy", "fast_greedy", "default_backend", "cache_kwarg", "raise_recompile_limit"]


def default_backend(device: torch.device) -> str:
    """``inductor`` on CUDA (with mode ``reduce-overhead``), ``aot_eager`` elsewhere (the
    traced graph run with eager's kernels: checks tracing without a C++ compiler)."""
    return "inductor" if device.type == "cuda" else "aot_eager"


def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _eos_ids(model: nn.Module) -> list[int]:
    """The end-of-sequence token ids ``generate()`` would ban under ``min_new_tokens``."""
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return []
    ids = [eos] if isinstance(eos, int) else [int(e) for e in eos]
    return sorted({i for i in ids if 0 <= i < model.config.vocab_size})


def cache_kwarg(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by (``cache`` in newer transformers,
    ``past_key_values`` before)."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def raise_recompile_limit(n: int = 64) -> None:
    """Room for one graph per batch size (and per model, dense then 2:4, between resets)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n))


class FastGreedy:
    """Greedy decoding of ``model`` in the fast loop (see the module's docstring).

    ``backend``: torch.compile backend of the step (default :func:`default_backend`; a
    callable backend is passed on as it is, e.g. a test's compile counter);
    ``"eager"`` or ``compile=False`` runs the same loop uncompiled. ``mode``: the compile
    mode (default ``"reduce-overhead"`` with inductor, none otherwise). ``max_len``: the
    static cache's length (prompt + new tokens must fit). ``nested_layers``: mark each
    decoder layer a ``torch.compiler.nested_compile_region`` (compile one layer, reuse it
    for the others); off by default, experimental (see :meth:`_mark_nested`). ``ban_eos``:
    never choose the end-of-sequence tokens (what ``generate(min_new_tokens=n)`` does).
    """

    def __init__(self, model: nn.Module, max_len: int, backend: str | Callable[..., Any] | None = None,
                 mode: str | None = None, compile: bool = True, nested_layers: bool = False, ban_eos: bool = True) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.max_len = int(max_len)
        self.backend = backend or default_backend(self.device)
        self.compile = compile and self.backend != "eager"
        self.mode = mode if mode is not None else ("reduce-overhead" if self.backend == "inductor" else None)
        params = _forward_params(model)
        self.cache_kw = cache_kwarg(model)
        self.cache_position = "cache_position" in params
        self.logits_to_keep = "logits_to_keep" in params
        self.nested_layers = nested_layers
        self.banned = _eos_ids(model) if ban_eos else []
        self.caches: dict[int, Any] = {}
        self.prepared: dict[int, Any] = {}
        self._steps: dict[bool, Callable[..., Any]] = {}

    # ------------------------------------------------------------------ description
    def name(self) -> str:
        """What runs, in words (the ``loop`` field of a measurement row)."""
        if not self.compile:
            return "fast loop (dass.infer.decode_loop): static cache, eager prefill, eager decode step, no host sync"
        extra = ", nested_compile_region per layer" if self.nested_layers else ""
        backend = getattr(self.backend, "__name__", self.backend)
        return (f"fast loop (dass.infer.decode_loop): static cache, eager prefill, decode step "
                f"torch.compile({backend}, mode={self.mode}, fullgraph=True, dynamic=False{extra}), no host sync")

    # ------------------------------------------------------------------ pieces
    def prepare(self, batch: int) -> dict[str, object]:
        """Before the first compiled step at ``batch``: the accelerated modules' decisions at
        ``batch`` tokens (and their kernels built), outside any compiled region."""
        if batch not in self.prepared:
            from dass.infer.ops import prepare_compile

            raise_recompile_limit()
            self.prepared[batch] = prepare_compile(self.model, [batch])
        return self.prepared[batch]

    def cache(self, batch: int) -> Any:
        """The batch size's static cache, reset (kept across calls, see the module docstring)."""
        c = self.caches.get(batch)
        if c is None:
            from transformers import StaticCache

            c = self.caches[batch] = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        else:
            c.reset()
        return c

    def _kwargs(self, cache: Any, pos: torch.Tensor) -> dict[str, Any]:
        kw: dict[str, Any] = {self.cache_kw: cache, "use_cache": True}
        if self.cache_position:
            kw["cache_position"] = pos
        return kw

    def _ban(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [B, V] with the banned (end-of-sequence) tokens at -inf, in place."""
        for t in self.banned:
            logits[:, t] = float("-inf")
        return logits

    def _logits(self, tok: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        B = tok.shape[0]
        return self._ban(self.model(input_ids=tok[:, None], position_ids=pos[None, :].expand(B, 1),
                                    **self._kwargs(cache, pos)).logits[:, -1])

    def _decode(self, tok: torch.Tensor, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        """One decoding step: the next greedy token of each sequence ([B] int64)."""
        return self._logits(tok, pos, cache).argmax(-1)

    def _decode_scores(self, tok: torch.Tensor, pos: torch.Tensor, cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The step of a checking run: the token and the step's last logits (fp32)."""
        logits = self._logits(tok, pos, cache)
        return logits.argmax(-1), logits.float()

    def step_fn(self, scores: bool = False) -> Callable[..., Any]:
        """The (compiled) decoding step; built once, reused for every batch size and call
        (``scores``: the variant that also returns the logits, its own compiled function)."""
        fn = self._steps.get(scores)
        if fn is None:
            fn = self._decode_scores if scores else self._decode
            if self.compile:
                if self.nested_layers:
                    self._mark_nested()
                opts: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=self.backend)
                if self.mode is not None:
                    opts["mode"] = self.mode
                fn = torch.compile(fn, **opts)
            self._steps[scores] = fn
        return fn

    def _mark_nested(self) -> None:
        """Experimental: wrap each decoder layer's forward (on the instance, transformers
        unchanged) in ``torch.compiler.nested_compile_region`` so Dynamo traces one layer and
        reuses it for the others (compile time). Raises where this torch lacks it.

        Checked on the CPU (torch 2.13, aot_eager and inductor): the same tokens, and on a
        dense Llama one traced layer called by every layer. On an accelerated model the
        same torch inlines the regions instead, silently (the cause was not pinned down),
        so there it saves nothing; not tried with CUDA graphs."""
        from dass.arch import decoder_layers

        region = getattr(torch.compiler, "nested_compile_region", None)
        if region is None:
            raise RuntimeError(f"torch {torch.__version__} has no torch.compiler.nested_compile_region")
        for layer in decoder_layers(self.model)[1]:
            if "_dass_nested" not in vars(layer):
                # the function, not the bound method (the region's marker is set on it),
                # bound to this instance only: the class is not changed
                layer.forward = types.MethodType(region(type(layer).forward), layer)
                layer._dass_nested = True

    def reset(self) -> None:
        """Forget the compiled step and the caches (the model's modules changed in place:
        dense, then accelerated) and undo :meth:`_mark_nested` (so a later ``generate()``
        compile of the same model is not affected). Dynamo's own caches are cleared by the
        caller (:func:`dass.infer.generate.reset_compiled`)."""
        self._steps.clear()
        self.caches.clear()
        self.prepared.clear()
        if self.nested_layers:
            from dass.arch import decoder_layers

            for layer in decoder_layers(self.model)[1]:
                if vars(layer).pop("_dass_nested", None):
                    vars(layer).pop("forward", None)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new_tokens: int, scores: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Greedy token ids ``[B, new_tokens]`` after the prompt ``ids`` ``[B, P]`` (unpadded:
        every sequence has the whole prompt). Returns without waiting for the GPU. With
        ``scores`` also each step's logits, fp32 ``[new_tokens, B, vocab]`` (what
        ``generate(output_scores=True)`` gives for greedy decoding; for checks, not timing)."""
        B, P = ids.shape
        if new_tokens < 1:
            raise ValueError("new_tokens must be at least 1")
        if P + new_tokens > self.max_len:
            raise ValueError(f"prompt {P} + {new_tokens} new tokens exceed the static cache ({self.max_len})")
        if self.compile:
            self.prepare(B)
        cache = self.cache(B)
        dev = ids.device
        out = torch.empty(B, new_tokens, dtype=torch.long, device=dev)
        sc = (torch.empty(new_tokens, B, self.model.config.vocab_size, dtype=torch.float32, device=dev)
              if scores else None)
        kw = self._kwargs(cache, torch.arange(P, device=dev))
        if self.logits_to_keep:
            kw["logits_to_keep"] = 1
        last = self._ban(self.model(input_ids=ids, position_ids=torch.arange(P, device=dev)[None, :].expand(B, P),
                                    **kw).logits[:, -1])
        out[:, 0] = last.argmax(-1)
        if sc is not None:
            sc[0] = last.float()
        if new_tokens > 1:
            step = self.step_fn(scores)
            # contiguous, aligned inputs of one fixed layout (a column of ``out`` would be a
            # strided view at a new offset each step: Inductor copies misaligned inputs)
            tok = out[:, 0].clone()
            pos = torch.full((1,), P, dtype=torch.long, device=dev)
            for i in range(1, new_tokens):
                if sc is None:
                    nxt = step(tok, pos, cache)
                else:
                    nxt, sc[i] = step(tok, pos, cache)
                out[:, i] = nxt
                tok.copy_(nxt)
                pos += 1
        return out if sc is None else (out, sc)

def fast_greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int, **kw: Any) -> torch.Tensor:
    """One-off :class:`FastGreedy` call (a new compiled step each time: for repeated calls
    keep a :class:`FastGreedy`)."""
    return FastGreedy(model, max_len=ids.shape[1] + new_tokens, **kw).generate(ids, new_tokens)
