"""Generation over lowbit.PagedKVCache: batched prefill (chunked-prefill attention over each
prompt), then one decode step per new token for all unfinished sequences; greedy or sampled."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..nn.kv_cache import PagedKVCache
from .replay import DecodeReplay

BLOCK_SIZE = 16


@dataclass
class GenerationResult:
    tokens: list                      # new token ids per prompt (a stop token is not included)
    finish_reasons: list              # "stop" (a stop token) or "length" (max_new_tokens)
    prefill_tokens: int
    decode_tokens: int
    prefill_seconds: float
    decode_seconds: float
    text: Optional[list] = field(default=None)  # decoded new tokens, when the prompts were text

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _prompts(model, prompts) -> tuple:
    """-> (list of token id lists, whether the input was text)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        tok = model.tokenizer
        return [tok(p, add_special_tokens=True)["input_ids"] for p in prompts], True
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate: prompts must be a non-empty list of token ids, a list of such lists, or text")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, torch.Tensor):
            p = p.tolist()
        if not isinstance(p, (list, tuple)) or not p or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                for t in p):
            raise ValueError(f"generate: prompt {i} must be a non-empty list of int token ids")
        bad = [t for t in p if not 0 <= t < model.config.vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} holds token id {bad[0]}, outside [0, {model.config.vocab_size})")
        out.append(list(p))
    return out, False


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax when temperature == 0, else softmax(logits / T)
    restricted to the top_k most likely tokens and the smallest set whose mass reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first one always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate(model, prompts, max_new_tokens: int = 128, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: Optional[int] = None, stop_tokens=None,
             stream: Optional[Callable] = None, cache_dtype: Optional[torch.dtype] = None,
             replay: bool = True) -> GenerationResult:
    """Generates up to max_new_tokens for each prompt (token ids, a batch of them, or text).

    temperature 0: greedy; else sampling with top_k (0: all) and top_p (1: all), reproducible
    with seed. stop_tokens: ids that end a sequence (default: the file's eos token; [] never
    stops). stream(seq_index, token_id) is called as each token is produced. cache_dtype
    torch.int8 keeps an INT8 KV cache (torch.float16: llama.cpp's default cache; None: float32).
    replay: run decode steps through lowbit.models.replay.DecodeReplay (bitwise the same
    results, much less Python per token); False runs every step eagerly. Timings: prefill = the batched prompt pass and its first
    sampled tokens; decode = every later step.
    """
    cfg = model.config
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0, got {top_k!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    if stream is not None and not callable(stream):
        raise TypeError("generate: stream must be a callable stream(seq_index, token_id)")
    ids, is_text = _prompts(model, prompts)
    stops = set([cfg.eos_token_id] if stop_tokens is None and cfg.eos_token_id >= 0 else (stop_tokens or []))
    longest = max(len(p) for p in ids) + max_new_tokens
    if longest > cfg.context_length:
        raise ValueError(f"generate: a prompt plus max_new_tokens needs {longest} positions, more than the model's "
                         f"context length {cfg.context_length}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    use_replay = bool(replay) and next(model.parameters()).device.type == "cpu"

    blocks = sum(-(-(len(p) + max_new_tokens) // BLOCK_SIZE) for p in ids)
    cache = PagedKVCache(cfg.n_layers, blocks, BLOCK_SIZE, cfg.n_kv_heads, cfg.head_dim, torch.float32,
                         cache_dtype=cache_dtype)
    n = len(ids)
    out = [[] for _ in range(n)]
    reasons = [None] * n

    def emit(seqs: list, next_ids: torch.Tensor) -> list:
        """Records each sequence's new token; returns the sequences that go on."""
        alive = []
        for s, t in zip(seqs, next_ids.tolist()):
            if t in stops:
                reasons[s] = "stop"
                continue
            out[s].append(t)
            if stream is not None:
                stream(s, t)
            if len(out[s]) == max_new_tokens:
                reasons[s] = "length"
            else:
                alive.append(s)
        return alive

    t0 = time.perf_counter()
    for s, p in enumerate(ids):
        cache.add(s)
    slots = torch.cat([cache.append(s, len(p)) for s, p in enumerate(ids)])
    lens = torch.tensor([len(p) for p in ids])
    qsl = torch.zeros(n + 1, dtype=torch.int32)
    qsl[1:] = lens.cumsum(0)
    positions = torch.cat([torch.arange(len(p)) for p in ids])
    logits = model.forward_paged(torch.tensor(sum(ids, [])), positions, cache, list(range(n)), qsl, slots)
    alive = emit(list(range(n)), sample(logits, temperature, top_k, top_p, gen))
    t1 = time.perf_counter()
    decoded, replay = 0, None
    max_blocks = max(-(-(len(p) + max_new_tokens) // BLOCK_SIZE) for p in ids)
    while alive:
        last = torch.tensor([out[s][-1] for s in alive])
        positions = torch.tensor([cache.seq_len(s) for s in alive])
        slots = torch.cat([cache.append(s, 1) for s in alive])
        if use_replay:
            if replay is None or replay.B != len(alive):  # (re)built when the batch shrinks
                replay = DecodeReplay(model, cache, len(alive), max_blocks)
            logits = replay.step(last, positions, slots, alive)
        else:
            logits = model.forward_paged(last, positions, cache, alive, None, slots)
        decoded += len(alive)
        alive = emit(alive, sample(logits, temperature, top_k, top_p, gen))
    t2 = time.perf_counter()
    text = [model.tokenizer.decode(o, skip_special_tokens=True) for o in out] if is_text else None
    return GenerationResult(out, reasons, int(lens.sum()), decoded, t1 - t0, t2 - t1, text)
