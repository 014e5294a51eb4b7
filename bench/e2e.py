"""End-to-end rows: a whole Llama-family model on lowbit (lowbit.models) against plain torch fp32
and llama.cpp, on the same GGUF file, the same prompt and the same thread count, in one run.

  model      a GGUF file with the shapes of SmolLM2-135M-Instruct (30 layers, dim 576, 9 / 3 heads,
             head dim 64, FFN 1536, vocab 49152, RoPE theta 1e5, tied Q8_0 embedding, Q4_1
             elsewhere), random weights written by lowbit.models.synthetic into
             DIR/smollm2-135m-shape-q4_1.gguf (rebuilt when missing or older than synthetic.py).
             ``--gguf FILE`` (or LOWBIT_BENCH_GGUF=FILE) runs another file instead.
  workload   one prompt of 512 random token ids (fixed seed), prefill, then 128 greedy decode
             steps that never stop early (positions 512 .. 639 for every implementation).
  timing     perf_counter around the prefill (prompt pass + first argmax) and around the decode
             loop (128 x (forward of one token + argmax)); a short warm-up run per implementation
             (full prefill, a few decode steps); then R rounds round-robin over the implementations
             (R = the run's rounds: 3 with --quick, 5 otherwise, fewer when a round would overrun
             the suite's time budget, never fewer than 3); each reports its median over rounds.
  impls      lowbit W4A8    lowbit.models.load_gguf(activations="int8"); Llama.generate(prompt,
                            129, stop_tokens=[]): GenerationResult's prefill / decode seconds
                            (129 new tokens = the prefill's token + 128 decode steps)
             lowbit W4A16   the same with activations="float"
             torch fp32     lowbit.ref.llama.ReferenceLlama (dtype float32: every tensor
                            dequantized to fp32, plain torch ops, its [B, H, S, D] KV cache):
                            forward(ids, start_pos, cache) timed here
             llama.cpp      llama-cpp-python (if importable): Llama(n_ctx=1024, n_batch=n_ubatch=512,
                            n_threads=n_threads_batch=T); prefill = eval(prompt); decode = 128 x
                            eval([argmax of the last logits]) (logits of the last token only)
  overhead   lowbit W4A8's decode with every native kernel replaced by a no-op returning success
             (lowbit looks kernels up in lowbit._native._C at call time; see NoopKernels): what is
             left is Python, torch glue ops (embedding rows, KV-cache writes, RoPE angles, argmax)
             and allocation. Its outputs are garbage; the sampled ids stay in range (argmax).

Ratios: implementation tok/s / baseline tok/s (> 1: faster). Every implementation's greedy tokens
are also compared with torch fp32's and llama.cpp's (length of the common prefix of the 129 tokens),
a sanity check, not an accuracy figure: lowbit W4A16 does torch fp32's arithmetic up to fp32
rounding and should match it throughout; int8 activations (lowbit W4A8, llama.cpp: Q8 blocks, with
different rounding details and llama.cpp's fp16 KV cache) round differently, and 30 random layers
amplify that until the argmax differs from the first token (on a 2-layer file of the same shapes
all four agree: last-token logits correlate >= 0.997).
"""
from __future__ import annotations

import os
import statistics
import time
import traceback

import numpy as np
import torch

import lowbit
from lowbit import _native

from . import harness
from .harness import Config, OtherLoad, Target, log

PROMPT_LEN, NEW_TOKENS, WARMUP_DECODE, SEED = 512, 128, 4, 0
MIN_ROUNDS = 3                         # a median of fewer is a mean (llama.cpp's OpenMP threads stall for
                                       # seconds when this shared machine is busy: single rounds are outliers)
SHAPE = dict(arch="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
             rope_theta=100000.0, context_length=2048, tensor_type="q4_1", embedding_type="q8_0", tied=True, seed=0)
SYNTH_NAME = "smollm2-135m-shape-q4_1.gguf"
BUDGET_S = {True: 45.0, False: 75.0}   # timed rounds (quick / full): past MIN_ROUNDS, no round that would overrun this

W4A8, W4A16, TORCH, LLAMA_CPP = "lowbit W4A8", "lowbit W4A16", "torch fp32", "llama.cpp"
ROWS = {W4A8: "e2e lowbit W4A8", W4A16: "e2e lowbit W4A16"}  # --only matches these ("e2e" keeps all)
NOOP = "lowbit W4A8, no-op kernels"

# Checked by check_targets(result); the prefill target names the lowbit variant that was faster.
TARGET_SPECS = [("decode", W4A8, "End to end decode tok/s (128 tokens), lowbit W4A8 vs llama.cpp", 1.0),
                ("prefill", None, "End to end prefill tok/s (512 tokens), best lowbit ({}) vs llama.cpp", 1.0)]


def wanted(cfg: Config) -> list:
    """The lowbit implementations --only keeps (baselines always run with them)."""
    return [impl for impl, row in ROWS.items() if cfg.wants(row)]


# ---------------------------------------------------------------- the model file
def model_file(cfg: Config) -> tuple:
    """(path, description): --gguf / LOWBIT_BENCH_GGUF, else the synthetic SmolLM2-135M-shaped file
    in the output folder, (re)written when missing or older than lowbit.models.synthetic."""
    given = getattr(cfg, "gguf", None) or os.environ.get("LOWBIT_BENCH_GGUF")
    if given:
        if not os.path.isfile(given):
            raise FileNotFoundError(f"e2e: no such GGUF file: {given}")
        return os.path.abspath(given), os.path.basename(given)
    from lowbit.models import synthetic

    path = os.path.join(cfg.out, SYNTH_NAME)
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(synthetic.__file__):
        log(f"e2e: writing {path} (random weights, SmolLM2-135M shapes) ...")
        t = time.time()
        tmp = path + ".tmp"
        synthetic.write_synthetic_gguf(tmp, **SHAPE)
        os.replace(tmp, path)
        log(f"  {os.path.getsize(path) / 2**20:.0f} MiB in {time.time() - t:.1f} s")
    return path, "synthetic SmolLM2-135M shape (random weights): 30 layers, dim 576, 9/3 heads, FFN 1536, " \
                  "vocab 49152, tied Q8_0 embedding, Q4_1 elsewhere"


# ---------------------------------------------------------------- implementations
# Each runner: run(prompt, n_decode) -> (prefill_s, decode_s, tokens): tokens = the prefill's
# argmax then one per decode step (n_decode + 1 ids).
def lowbit_runner(path: str, activations: str):
    m = lowbit.models.load_gguf(path, activations=activations, progress=False)

    def run(prompt, n_decode):
        r = m.generate([prompt], n_decode + 1, stop_tokens=[])
        assert r.decode_tokens == n_decode, (r.decode_tokens, n_decode)
        return r.prefill_seconds, r.decode_seconds, r.tokens[0]
    return run, m


def torch_runner(path: str):
    from lowbit.ref.llama import ReferenceLlama

    ref = ReferenceLlama.from_gguf(path, dtype=torch.float32)

    def run(prompt, n_decode):
        ids = torch.tensor([prompt])
        cache = ref.new_cache(1, len(prompt) + n_decode)
        t0 = time.perf_counter()
        tok = int(ref(ids, 0, cache)[0, -1].argmax())
        t1 = time.perf_counter()
        out = [tok]
        for pos in range(len(prompt), len(prompt) + n_decode):
            tok = int(ref(torch.tensor([[tok]]), pos, cache)[0, -1].argmax())
            out.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out
    return run


def llama_cpp_runner(path: str, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:  # logits of the batch's last token (the only one llama.cpp computes)
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def run(prompt, n_decode):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = last_argmax()
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(n_decode):
            llm.eval([tok])
            tok = last_argmax()
            out.append(tok)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out
    return run, llm


class NoopKernels:
    """Stands in for lowbit._native._C: every native kernel becomes a no-op returning OK (0) and
    counts its calls; the module's non-kernel entries (ISA queries, dunders) come from the real one."""
    KEEP = frozenset({"best_isa", "isa_levels", "select_isa", "selected_isa"})

    def __init__(self, real):
        self._real, self.calls = real, 0

    def _noop(self, *args, **kw):
        self.calls += 1
        return _native.OK

    def __getattr__(self, name):
        v = getattr(self._real, name)
        if name.startswith("_") or name in self.KEEP or not callable(v):
            return v
        return self._noop


def noop_runner(run):
    """run (a lowbit runner) with no-op native kernels; also returns the proxy (its call count)."""
    proxy = NoopKernels(_native._C)

    def run_noop(prompt, n_decode):
        real = _native._C
        _native._C = proxy
        try:
            return run(prompt, n_decode)
        finally:
            _native._C = real
    return run_noop, proxy


# ---------------------------------------------------------------- the suite
def _prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(cfg: Config):
    """Loads and times every implementation; None when --only keeps no e2e row."""
    subjects = wanted(cfg)
    if not subjects:
        return None
    t_start = time.time()
    path, desc = model_file(cfg)
    runners, notes, errors, proxy, vocab = {}, [], {}, None, None
    with harness.threads(cfg.threads):
        for impl in [W4A8, W4A16, TORCH, LLAMA_CPP]:
            if impl in ROWS and impl not in subjects:
                continue
            t = time.time()
            try:
                if impl in (W4A8, W4A16):
                    runners[impl], m = lowbit_runner(path, "int8" if impl == W4A8 else "float")
                    vocab = m.config.vocab_size
                    if impl == W4A8:
                        runners[NOOP], proxy = noop_runner(runners[impl])
                elif impl == TORCH:
                    runners[impl] = torch_runner(path)
                else:
                    try:
                        import llama_cpp  # noqa: F401
                    except ImportError as e:
                        notes.append(f"llama.cpp skipped: llama-cpp-python is not importable ({e})")
                        log("e2e: " + notes[-1])
                        continue
                    runners[impl], _ = llama_cpp_runner(path, cfg.threads)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
                errors[impl] = f"{type(e).__name__}: {e}"
                log(f"e2e: loading {impl} failed: {errors[impl]}\n{traceback.format_exc()}")
                continue
            log(f"e2e: loaded {impl} in {time.time() - t:.1f} s")

        if vocab is None:  # no lowbit model loaded: read the file's header
            from lowbit.models import read_gguf
            vocab = int(read_gguf(path)[1]["token_embd.weight"].shape[0])
        prompt = torch.randint(0, vocab, (PROMPT_LEN,), generator=torch.Generator().manual_seed(SEED)).tolist()

        def call(impl, n_decode):
            try:
                return runners[impl](prompt, n_decode)
            except Exception as e:  # noqa: BLE001
                errors[impl] = f"{type(e).__name__}: {e}"
                log(f"e2e: {impl} failed: {errors[impl]}\n{traceback.format_exc()}")
                del runners[impl]
                return None

        for impl in list(runners):  # warm-up: full prefill, a few decode steps
            t = time.time()
            call(impl, WARMUP_DECODE)
            log(f"e2e: warm-up {impl}: {time.time() - t:.1f} s")

        samples = {impl: [] for impl in runners}
        tokens = {}
        budget, rounds_done, t_rounds = BUDGET_S[cfg.quick], 0, time.time()
        with OtherLoad() as load:
            for r in range(cfg.rounds):
                t_round = time.time()
                for impl in list(runners):
                    if impl == NOOP and proxy is not None:
                        proxy.calls = 0
                    res = call(impl, NEW_TOKENS)
                    if res is None:
                        continue
                    pre_s, dec_s, toks = res
                    samples[impl].append({"prefill_s": pre_s, "decode_s": dec_s,
                                          "kernel_calls": proxy.calls if impl == NOOP else None})
                    tokens.setdefault(impl, toks)
                    log(f"e2e: round {r + 1}/{cfg.rounds} {impl:28s} prefill {PROMPT_LEN / pre_s:8.1f} tok/s  "
                        f"decode {NEW_TOKENS / dec_s:7.1f} tok/s ({1e3 * dec_s / NEW_TOKENS:.1f} ms/token)")
                rounds_done += 1
                spent, last = time.time() - t_rounds, time.time() - t_round
                if r + 1 < cfg.rounds and rounds_done >= MIN_ROUNDS and spent + last > budget:
                    notes.append(f"{rounds_done} of {cfg.rounds} rounds: one more would overrun the suite's "
                                 f"{budget:.0f} s time budget (a round took {last:.0f} s)")
                    log("e2e: " + notes[-1])
                    break
    del runners

    results = {}
    for impl, ss in samples.items():
        if not ss:
            continue
        pre = sorted(PROMPT_LEN / s["prefill_s"] for s in ss)
        dec = sorted(NEW_TOKENS / s["decode_s"] for s in ss)
        results[impl] = {
            "prefill_tok_s": statistics.median(pre), "decode_tok_s": statistics.median(dec),
            "prefill_tok_s_best": pre[-1], "decode_tok_s_best": dec[-1],
            "decode_ms_per_token": 1e3 / statistics.median(dec), "samples": ss, "tokens": tokens.get(impl),
        }
    for impl, r in results.items():
        r["ratios"] = {b: {k: r[k] / results[b][k] for k in ("prefill_tok_s", "decode_tok_s")}
                       for b in (LLAMA_CPP, TORCH) if b in results}
        r["ratios_of_best"] = {b: {k: r[k + "_best"] / results[b][k + "_best"] for k in ("prefill_tok_s", "decode_tok_s")}
                               for b in (LLAMA_CPP, TORCH) if b in results}
        r["same_tokens_prefix"] = {b: _prefix(r["tokens"], results[b]["tokens"])
                                   for b in (TORCH, LLAMA_CPP) if b in results and b != impl and impl != NOOP}

    overhead = None
    if NOOP in results and W4A8 in results:
        o, real = results.pop(NOOP), results[W4A8]
        calls = [s["kernel_calls"] for s in o["samples"]]
        overhead = {"noop_decode_ms_per_token": o["decode_ms_per_token"],
                    "decode_ms_per_token": real["decode_ms_per_token"],
                    "share": o["decode_ms_per_token"] / real["decode_ms_per_token"],
                    "noop_prefill_ms": 1e3 * PROMPT_LEN / o["prefill_tok_s"],
                    "prefill_ms": 1e3 * PROMPT_LEN / real["prefill_tok_s"],
                    "kernel_calls_per_run": statistics.median(calls) if calls else None,
                    "samples": o["samples"]}
        if not calls or not calls[0]:
            notes.append("the no-op run made no kernel calls through lowbit._native._C: the overhead figure "
                         "is not what it claims (a kernel is bound elsewhere)")
            log("e2e: WARNING: " + notes[-1])

    return {"file": path, "model": desc, "threads": cfg.threads, "prompt_tokens": PROMPT_LEN,
            "new_tokens": NEW_TOKENS, "prompt_seed": SEED, "rounds": rounds_done, "rounds_planned": cfg.rounds,
            "budget_s": budget, "other_load": load.share, "wall_s": time.time() - t_start, "results": results,
            "overhead": overhead, "errors": errors, "notes": notes,
            "baselines": {TORCH: "lowbit.ref.llama.ReferenceLlama, dtype float32 (weights dequantized to fp32; "
                                 "its prefill computes the logits of all 512 tokens)",
                          LLAMA_CPP: _llama_cpp_version()}}


def _llama_cpp_version() -> str:
    try:
        import llama_cpp
        return f"llama-cpp-python {llama_cpp.__version__} (its bundled llama.cpp, CPU backend)"
    except ImportError:
        return "not installed"


# ---------------------------------------------------------------- targets and report
def check_targets(res) -> list:
    """The e2e targets, checked as harness.check_targets does (status 'not run' without results)."""
    out = []
    for kind, impl, text, at_least in TARGET_SPECS:
        results = (res or {}).get("results", {})
        key = f"{kind}_tok_s"
        if impl is None:  # best lowbit variant of this run
            mine = [i for i in ROWS if i in results]
            impl = max(mine, key=lambda i: results[i][key]) if mine else None
            text = text.format(impl or "W4A8 / W4A16")
        row = f"e2e {kind} {impl or ''}".strip()
        r = results.get(impl) if impl else None
        group = {"rows": [], "other_load": res and res["other_load"], "results": {}}
        if r is not None and LLAMA_CPP in r["ratios"]:
            group["rows"].append({"row": row, "impl": impl, "ratios": {LLAMA_CPP: r["ratios"][LLAMA_CPP][key]},
                                  "ratios_of_min": {LLAMA_CPP: r["ratios_of_best"][LLAMA_CPP][key]}})
        out += harness.check_targets([Target(text, row, LLAMA_CPP, at_least)], [group])
    return out


def markdown(res) -> str:
    if res is None:
        return ""
    results = res["results"]
    order = [i for i in (W4A8, W4A16, TORCH, LLAMA_CPP) if i in results]

    def ratio(impl, base):
        r = results[impl]["ratios"].get(base)
        return "–" if r is None or impl == base else f"{r['prefill_tok_s']:.2f} / {r['decode_tok_s']:.2f}"

    def same(impl):
        p = results[impl]["same_tokens_prefix"]
        return ", ".join(f"{p[b]}/{NEW_TOKENS + 1} {b}" for b in (TORCH, LLAMA_CPP) if b in p) or "–"

    rows = [[i, f"{results[i]['prefill_tok_s']:.1f}", f"{results[i]['decode_tok_s']:.1f}",
             f"{results[i]['decode_ms_per_token']:.2f}", ratio(i, LLAMA_CPP), ratio(i, TORCH),
             f"{results[i]['prefill_tok_s_best'] / results[i]['prefill_tok_s']:.2f} / "
             f"{results[i]['decode_tok_s_best'] / results[i]['decode_tok_s']:.2f}", same(i)] for i in order]
    table = harness.md_table(["implementation", "prefill tok/s", "decode tok/s", "decode ms/token",
                              "× llama.cpp (prefill / decode)", "× torch fp32 (prefill / decode)",
                              "med/min (prefill / decode)", "greedy tokens equal to (prefix)"], rows)
    lines = [f"## End to end: {res['prompt_tokens']}-token prompt, {res['new_tokens']} greedy decode steps, "
             f"{res['threads']} thread(s)",
             f"Model: {res['model']} ({os.path.basename(res['file'])}). Median of {res['rounds']} round(s), "
             f"implementations interleaved; others' CPU share {harness.fmt_load(res['other_load'])}; "
             f"{res['wall_s']:.0f} s with loading. Ratios: tok/s / baseline tok/s (> 1: faster).",
             table]
    o = res["overhead"]
    if o:
        calls = f", {o['kernel_calls_per_run']:.0f} kernel calls per run" if o["kernel_calls_per_run"] else ""
        lines.append(f"Per-token overhead (lowbit W4A8 with every native kernel a no-op: Python, torch glue, "
                     f"allocation): **{o['noop_decode_ms_per_token']:.2f} ms/token** of "
                     f"{o['decode_ms_per_token']:.2f} ms/token decode ({o['share']:.0%}); prefill "
                     f"{o['noop_prefill_ms']:.0f} ms of {o['prefill_ms']:.0f} ms{calls}.")
    base = "; ".join(f"{k}: {v}" for k, v in res["baselines"].items())
    lines.append(f"Baselines: {base}. Greedy tokens: only W4A16 = torch fp32 is expected on a random 30-layer "
                 "model (int8 activations round differently and the layers amplify it; see bench/e2e.py).")
    extra = [f"{k} failed: {v}" for k, v in res["errors"].items()] + res["notes"]
    if extra:
        lines.append("Notes: " + "; ".join(extra) + ".")
    return "\n\n".join(lines)
