"""python -m lowbit.generate --gguf FILE --prompt "..." [--max-new-tokens N] [--threads T] [--chat]

Loads a Llama-family GGUF file on lowbit's kernels, streams the continuation of the prompt (or,
with --chat, the reply to it as a user message through the file's chat template) and prints
prefill and decode speeds at the end.
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.generate", description=__doc__.split("\n\n")[1])
    p.add_argument("--gguf", required=True, help="the model file (Q4_0 / Q4_1 / Q8_0 / F32 / F16 / BF16 tensors)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="kernel and torch threads (default: torch's)")
    p.add_argument("--chat", action="store_true", help="apply the file's chat template to the prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--activations", choices=("float", "int8"), default="float",
                   help="int8: quantize activations per block of 32 (W4A8 / W8A8 kernels)")
    p.add_argument("--scheme", choices=("w8a16", "w8a8", "w4a16", "w4a8"), default=None,
                   help="quantize the file's float matmul weights")
    p.add_argument("--kv-cache", choices=("float32", "float16", "int8"), default="float16",
                   help="KV cache dtype (default float16, as llama.cpp)")
    args = p.parse_args(argv)

    import lowbit
    from lowbit.models import load_gguf

    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
        lowbit.set_num_threads(args.threads)
    try:
        model = load_gguf(args.gguf, scheme=args.scheme, activations=args.activations)
        tok = model.tokenizer
        if args.chat:
            if not getattr(tok, "chat_template", None):
                raise ValueError(f"--chat: {args.gguf} has no chat template (tokenizer.chat_template)")
            ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                          tokenize=True)
            if not isinstance(ids, list):  # newer transformers return a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
        stops = [model.config.eos_token_id] if model.config.eos_token_id >= 0 else []
        for name in ("eos_token_id",):  # the chat turn's end (e.g. <|im_end|>) may differ from the file's eos
            t = getattr(tok, name, None)
            if isinstance(t, int) and t not in stops:
                stops.append(t)
    except (ValueError, ImportError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    new: list = []
    shown = ""

    def stream(_seq: int, token: int) -> None:
        nonlocal shown
        new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    if not args.chat:
        sys.stdout.write(args.prompt)
    res = model.generate([ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, stop_tokens=stops, stream=stream,
                         cache_dtype=getattr(torch, args.kv_cache))
    sys.stdout.write("\n")
    print(f"prefill: {res.prefill_tokens} tokens, {res.prefill_tok_s:.1f} tok/s | decode: {res.decode_tokens} tokens, "
          f"{res.decode_tok_s:.1f} tok/s | threads {lowbit.get_num_threads()}, {lowbit.cpu_isa()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
