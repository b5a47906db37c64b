"""Greedy generation: sequential (W = 1) through ``verify``/``commit``."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..errors import HetcompError


@dataclasses.dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int]
    text: str
    steps: int
    accepted_per_step: float
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes from prefill; decode speed counts the tokens the steps made.
        made = len(self.ids) - 1
        return made / self.decode_s if self.decode_s > 0 and made > 0 else 0.0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


def generate(art, prompt_ids, max_new_tokens: int = 64, stop_at_eos: bool = True):
    """Greedy decoding: one ``verify`` (W = 1) and ``commit`` per token."""
    if max_new_tokens < 1:
        raise HetcompError("--max-new-tokens must be at least 1")
    prompt_ids = [int(i) for i in prompt_ids]
    vocab = art.config.vocab_size
    if any(i < 0 or i >= vocab for i in prompt_ids):
        raise HetcompError(f"prompt ids must lie in [0, {vocab})")
    if len(prompt_ids) + max_new_tokens > art.config.max_context:
        raise HetcompError(
            f"prompt ({len(prompt_ids)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds "
            f"the context of {art.config.max_context} tokens")
    eos = art.tokenizer.eos_token_id if stop_at_eos else None
    sess = art.new_session()
    t0 = time.perf_counter()
    nxt, _ = sess.prefill(prompt_ids)
    t1 = time.perf_counter()
    ids = [nxt]
    steps = 0
    one = np.ones((1, 1), "int32")
    zero = np.zeros(1, "int32")
    while len(ids) < max_new_tokens and ids[-1] != eos:
        out_ids, _, _ = sess.verify([ids[-1]], [sess.length], one)
        sess.commit(zero)
        ids.append(int(out_ids[0]))
        steps += 1
    t2 = time.perf_counter()
    return GenerationResult(
        prompt_ids=prompt_ids, ids=ids, text=art.tokenizer.decode(ids), steps=steps,
        accepted_per_step=1.0, prefill_s=t1 - t0, decode_s=t2 - t1)
