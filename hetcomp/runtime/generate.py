"""Greedy generation: sequential (W = 1) through ``verify``/``commit``."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from .. import _tvm
from ..errors import HetcompError
from ..speculative.tree import Tree, accept_path


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
             width: int = 1, step_times: list | None = None, lookup: int = 0,
             hidden_states: list | None = None):
    """Greedy decoding; with ``width > 1``, Medusa tree speculation verified losslessly.

    Each step verifies the tree of ``width`` nodes rooted at the token the base model already
    chose, accepts the longest path whose tokens equal the base model's greedy choices,
    commits it, and emits those tokens plus the base model's choice after the path, so the
    output is token for token that of sequential greedy decoding.

    ``lookup = L > 0`` also drafts up to L tokens by n-gram lookup in the context (the tokens
    that followed the latest earlier occurrence of the current suffix) as a chain under the
    root; the Medusa tree then shrinks to the best tree of ``width - chain length`` nodes, so
    every step still verifies exactly ``width`` nodes.

    ``hidden_states`` (a list) receives, for each emitted token, the final hidden state ``[E]``
    that chose it (calibration's training rows); with ``width > 1`` only the chosen roots.
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
    if width > 1 and width not in art.trees:
        raise HetcompError(f"width {width} is not available in this artifact "
                           f"(widths: {', '.join(map(str, art.widths))}; compile with --heads)")
    lookup = min(lookup, width - 1)
    eos = set(art.tokenizer.eos_token_ids) if stop_at_eos else set()
    sess = art.new_session()
    t0 = time.perf_counter()
    nxt, hidden = sess.prefill(prompt_ids)
    t1 = time.perf_counter()
    ids = [nxt]
    if hidden_states is not None:
        hidden_states.append(hidden.numpy()[0])
    steps = 0
    while len(ids) < max_new_tokens and ids[-1] not in eos:
        ts = time.perf_counter()
        chain = ngram_draft(prompt_ids + ids, lookup) if lookup else []
        shape = _step_shape(art, width, len(chain))
        tokens = np.empty(width, "int64")
        tokens[0] = ids[-1]
        if shape.medusa_nodes:
            cands = art.medusa_candidates(hidden, ids[-1], shape.topk)
            tokens[1: 1 + shape.medusa_nodes] = cands[shape.heads, shape.ranks]
        tokens[1 + shape.medusa_nodes:] = chain
        greedy, hid, _ = sess.verify(tokens, shape.depths + sess.length, shape.mask)
        path = accept_path(shape.tree, tokens, greedy) if width > 1 else [0]
        sess.commit(path)
        ids.extend(int(t) for t in tokens[path[1:]])
        ids.append(int(greedy[path[-1]]))
        if width > 1:
            hidden = _tvm.tensor(hid.numpy()[path[-1]: path[-1] + 1], art.device)
        if hidden_states is not None:
            hidden_states.append(hid.numpy()[path[-1]])
        steps += 1
        if step_times is not None:
            step_times.append(time.perf_counter() - ts)
    ends = [k for k, t in enumerate(ids) if t in eos]
    if ends:
        ids = ids[: ends[0] + 1]
    ids = ids[:max_new_tokens]
    t2 = time.perf_counter()
    return GenerationResult(
        prompt_ids=prompt_ids, ids=ids, text=art.tokenizer.decode(ids), steps=steps,
        accepted_per_step=(len(ids) - 1) / steps if steps else 1.0,
        prefill_s=t1 - t0, decode_s=t2 - t1)


def ngram_draft(context: list[int], length: int, max_ngram: int = 3) -> list[int]:
    """Up to ``length`` tokens that followed the latest earlier occurrence of the context's
    last n-gram (longest n first, n <= ``max_ngram``); empty when nothing matches."""
    seq = np.asarray(context)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        key = seq[-n:]
        # Candidate starts: positions where the first key token occurs, latest first.
        for start in np.flatnonzero(seq[: len(seq) - n] == key[0])[::-1]:
            if np.array_equal(seq[start: start + n], key):
                cont = seq[start + n: start + n + length]
                if len(cont):
                    return [int(t) for t in cont]
    return []


@dataclasses.dataclass(frozen=True)
class _StepShape:
    tree: Tree  # the combined tree (Medusa nodes, then the lookup chain)
    mask: np.ndarray
    depths: np.ndarray
    medusa_nodes: int
    heads: np.ndarray
    ranks: np.ndarray
    topk: int


def _step_shape(art, width: int, chain: int) -> _StepShape:
    """The verified tree for a step: the best Medusa tree of ``width - chain`` nodes plus a
    chain of ``chain`` lookup nodes under the root (cached per shape)."""
    cache = art.step_shapes
    key = (width, chain)
    if key not in cache:
        base = art.tree(width - chain) if width > 1 else Tree((-1,), (-1,), (1.0,))
        parents = list(base.parents) + [0 if i == 0 else base.width + i - 1 for i in range(chain)]
        ranks = list(base.ranks) + [-1] * chain
        tree = Tree(tuple(parents), tuple(ranks), tuple(base.probs) + (0.0,) * chain)
        b_ranks = np.asarray(base.ranks[1:], dtype=np.int64)
        cache[key] = _StepShape(tree, tree.mask(), tree.depths, base.width - 1,
                                base.heads[1:], b_ranks,
                                int(b_ranks.max()) + 1 if len(b_ranks) else 1)
    return cache[key]
