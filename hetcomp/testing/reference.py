"""transformers' own GGUF loader on the packaged models: an independent tokenizer and model
implementation for tests (needs the test extra: transformers, accelerate, torch)."""

from __future__ import annotations

import os

from ..frontend import default_gguf_path

# Chat prompts the real-model tests compare greedy ids on.
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Give me two tips for sleeping better.",
    "Write a haiku about autumn leaves.",
]


def transformers_smollm2():
    """``(tokenizer, model)`` read by transformers from the packaged GGUF, float32, eval."""
    return transformers_gguf(default_gguf_path())


def transformers_gguf(path: str):
    """``(tokenizer, model)`` read by transformers' own GGUF loader (which dequantizes the file
    through ``gguf`` too) from the GGUF ``path``, float32, eval."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: test-only, heavy
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    return tok, model.eval()
