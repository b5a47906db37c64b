"""transformers' own GGUF loader on the packaged SmolLM2: an independent tokenizer and LLaMA
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
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: test-only, heavy
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = default_gguf_path()
    folder, name = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    return tok, model.eval()
