"""The tokenizer stored in a GGUF file, through transformers' GGUF support (which builds a
`tokenizers` fast tokenizer from the tokenizer.ggml.* metadata)."""
from __future__ import annotations

import os


def load_tokenizer(path: str, chat_template=None):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("the GGUF tokenizer needs transformers: pip install 'lowbit[hf]' "
                          "(or pass token ids instead of text)") from None
    try:
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    except Exception as e:  # transformers raises many kinds on a file it cannot convert
        raise ValueError(f"could not build a tokenizer from {path}: {type(e).__name__}: {e}") from None
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template
    return tok
