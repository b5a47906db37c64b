"""Greedy generation: sequential (W = 1) through ``verify``/``commit``."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .. import _tvm
from ..errors import HetcompError
from ..speculative.tree import accept_path


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


def generate(art, prompt_ids, max_new_tokens: int = 64, stop_at_eos: bool = True,
             width: int = 1, step_times: list | None = None):
    """Greedy decoding; with ``width > 1``, Medusa tree speculation verified losslessly.

    Each step verifies the tree of ``width`` nodes rooted at the token the base model already
    chose, accepts the longest path whose tokens equal the base model's greedy choices,
    commits it, and emits those tokens plus the base model's choice after the path, so the
    output is token for token that of sequential greedy decoding.
    """
    if max_new_tokens < 1:
        raise HetcompError("--max-new-tokens must be at least 1")
    prompt_ids = [int(i) for i in prompt_ids]
    vocab = art.config.vocab_size
    if any(i < 0 or i >= vocab for i in prompt_ids):
        raise HetcompError(f"prompt ids must lie in [0, {vocab})")
    if len(prompt_ids) + max_new_tokens + width > art.config.max_context:
        raise HetcompError(
            f"prompt ({len(prompt_ids)} tokens) plus --max-new-tokens ({max_new_tokens}) exceeds "
            f"the context of {art.config.max_context} tokens")
    tree = None
    if width > 1:
        if width not in art.trees:
            raise HetcompError(f"width {width} is not available in this artifact "
                               f"(widths: {', '.join(map(str, art.widths))}; compile with --heads)")
        tree = art.trees[width]
    eos = art.tokenizer.eos_token_id if stop_at_eos else None
    sess = art.new_session()
    t0 = time.perf_counter()
    nxt, hidden = sess.prefill(prompt_ids)
    t1 = time.perf_counter()
    ids = [nxt]
    steps = 0
    if tree is None:
        mask, heads, ranks, depths = np.ones((1, 1), "int32"), None, None, np.zeros(1, "int32")
    else:
        mask, depths = tree.mask(), tree.depths
        heads, ranks = tree.heads[1:], np.asarray(tree.ranks[1:])
        topk = int(ranks.max()) + 1
    while len(ids) < max_new_tokens and ids[-1] != eos:
        ts = time.perf_counter()
        tokens = np.empty(len(depths), "int64")
        tokens[0] = ids[-1]
        if tree is not None:
            cands = art.medusa_candidates(hidden, topk)
            tokens[1:] = cands[heads, ranks]
        greedy, hid, _ = sess.verify(tokens, depths + sess.length, mask)
        path = [0] if tree is None else accept_path(tree, tokens, greedy)
        sess.commit(path)
        ids.extend(int(t) for t in tokens[path[1:]])
        ids.append(int(greedy[path[-1]]))
        if tree is not None:
            hidden = _tvm.tensor(hid.numpy()[path[-1]: path[-1] + 1], art.device)
        steps += 1
        if step_times is not None:
            step_times.append(time.perf_counter() - ts)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos) + 1]
    ids = ids[:max_new_tokens]
    t2 = time.perf_counter()
    return GenerationResult(
        prompt_ids=prompt_ids, ids=ids, text=art.tokenizer.decode(ids), steps=steps,
        accepted_per_step=(len(ids) - 1) / steps if steps else 1.0,
        prefill_s=t1 - t0, decode_s=t2 - t1)
