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


def assert_greedy_matches(art, model, ids: list[int], new_tokens: int) -> None:
    """``art``'s ``new_tokens`` greedy tokens after ``ids`` are ``model``'s (transformers):
    one forward over prompt + ours (teacher forcing) picks each of them as its argmax, which
    is what its greedy generate does step by step; and the first token's logits agree to a
    relative 1e-4."""
    import numpy as np
    import torch

    from ..runtime import generate

    ours = generate(art, ids, max_new_tokens=new_tokens, stop_at_eos=False).ids
    assert len(ours) == new_tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids + ours])).logits[0].numpy()
    t = len(ids)
    assert logits[t - 1:t - 1 + new_tokens].argmax(-1).tolist() == ours, ids
    _, _, first = art.new_session().verify(ids, np.arange(t), np.tril(np.ones((t, t))))
    theirs = logits[t - 1]
    assert np.abs(first.numpy()[-1] - theirs).max() / np.abs(theirs).max() < 1e-4
