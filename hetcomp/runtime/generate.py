"""Greedy generation, sequential (W = 1) or speculative, through ``verify``/``commit``; as an
iterator that yields the tokens each step accepts, or to the end."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..artifact_format import MEDUSA_TOPK
from ..errors import HetcompError
from ..speculative.lookup import STORE_LENGTH, NgramIndex
from ..speculative.tree import Tree, accept_path, csr_from_mask
from .artifact import latest_cached


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


def auto_lookup(width: int) -> int:
    """Default n-gram draft nodes inside a width-W tree (a budget: a step with fewer
    looked-up nodes gives the rest to the Medusa tree): half of it up to W = 8, where the
    Medusa nodes a lookup node displaces are still likely ones, then three quarters, at most
    32. Accepted tokens per step, packaged heads, SmolLM2 float16, 96 tokens, on the 24
    held-out prompts `bench --prompts heldout` does not use (17th-40th) and [on the 8 it
    uses]; "chain" is the earlier draft (one occurrence's continuation, W/2, at most 8):
    W=4 with 2 / 3 nodes 1.716 / 1.712; W=8 with 4 / 6 1.940 / 1.944;
    W=16 chain 2.096 [2.249], 8 nodes 2.101 [2.346], 12 nodes 2.157 [2.360];
    W=32 chain 2.186 [2.428], 16 nodes 2.190 [2.585], 24 nodes 2.240 [2.542];
    W=64 chain 2.264 [2.468], 32 nodes 2.294 [2.734], 48 nodes 2.266 [2.667]."""
    return width // 2 if width <= 8 else min(3 * width // 4, 32)


def default_lookup(art, width: int) -> int:
    """The lookup nodes a step at ``width`` drafts unless told: the artifact's choice
    (``manifest["lookup"]``, what compile's replay found to accept the most), else
    :func:`auto_lookup`'s."""
    chosen = (art.manifest.get("lookup") or {}).get(str(width))
    return auto_lookup(width) if chosen is None else min(chosen, width - 1)


def context_room(art, new_tokens: int) -> int:
    """The longest prompt after which ``new_tokens`` tokens fit the artifact's context, at any
    width: the cache holds the prompt and every new token but the last (no step runs it),
    which is what sequential decoding needs and all a tree needs (the last steps verify
    smaller trees, in the room left)."""
    return art.config.max_context - new_tokens + 1


def check_context(art, prompt_len: int, new_tokens: int, prompt: str = "prompt",
                  option: str = "--max-new-tokens") -> None:
    """Refuse, in one line, a prompt and a token count that do not fit (:func:`context_room`);
    ``prompt`` and ``option`` name them as the caller's user knows them."""
    if prompt_len > context_room(art, new_tokens):
        raise HetcompError(
            f"{prompt} ({prompt_len} tokens) plus {option} ({new_tokens}) does not fit the "
            f"context of {art.config.max_context} tokens (the cache holds the prompt and every "
            "new token but the last)")


def check_decoding(art, max_new_tokens: int, width: int, lookup: int = 0) -> None:
    """Refuse, in one line, decoding options no prompt could make valid for ``art`` (a chat
    checks them before its first turn)."""
    if max_new_tokens < 1:
        raise HetcompError("--max-new-tokens must be at least 1")
    if width < 1:
        raise HetcompError("--width must be at least 1")
    if lookup < 0:
        raise HetcompError("--lookup must be at least 0")
    if width > 1 and width not in art.trees:
        raise HetcompError(f"width {width} is not available in this artifact "
                           f"{what_widths(art)}")


def what_widths(art) -> str:
    """Why a width is missing, for a refusal: ``(its trees have at most N nodes)``, or that the
    artifact has no heads."""
    return (f"(its trees have at most {max(art.trees)} nodes)" if art.trees
            else "(it has no Medusa heads: compile with --heads)")


class Generation:
    """Greedy decoding as an iterator: each step yields the token ids it accepted.

    With ``width > 1``, Medusa tree speculation verified losslessly: each step verifies the
    tree of ``width`` nodes rooted at the token the base model already chose, accepts the
    longest path whose tokens equal the base model's greedy choices, commits it, and emits
    those tokens plus the base model's choice after the path, so the output is token for
    token that of sequential greedy decoding.

    ``lookup = L > 0`` also drafts up to L nodes by n-gram lookup in the context (the tokens
    that followed the latest earlier occurrences of the current suffix, merged into a tree
    under the root: :meth:`NgramIndex.draft_tree`); the Medusa tree then shrinks to the best
    tree of ``width - lookup nodes``, so every step still verifies exactly ``width`` nodes.
    Where the artifact has a datastore (:mod:`hetcomp.speculative.datastore`: the model's
    own responses to other prompts) its continuations join the lookup's, after the
    context's; ``datastore=False`` leaves it out.

    ``session``: continue a session whose cache holds a prefix of ``prompt_ids`` (a chat's
    earlier turns); only the rest is prefilled. Without one, a new session is used.
    ``hidden_states`` (a list) receives, for each emitted token, the final hidden state ``[E]``
    that chose it (calibration's training rows); with ``width > 1`` only the chosen roots.
    Iterating to the end (or calling :meth:`result`) fills :attr:`ids` and the timings.
    """

    def __init__(self, art, prompt_ids, max_new_tokens: int = 64, stop_at_eos: bool = True,
                 width: int = 1, step_times: list | None = None, lookup: int = 0,
                 hidden_states: list | None = None, session=None, datastore: bool = True):
        check_decoding(art, max_new_tokens, width, lookup)
        try:
            if isinstance(prompt_ids, str):
                raise TypeError
            prompt_ids = [int(i) for i in prompt_ids]
        except (TypeError, ValueError):
            raise HetcompError("the prompt must be token ids here (text goes through "
                               "hetcomp.driver.generate or Chat)") from None
        if not prompt_ids:
            raise HetcompError("empty prompt")
        vocab = art.config.vocab_size
        if any(i < 0 or i >= vocab for i in prompt_ids):
            raise HetcompError(f"prompt ids must lie in [0, {vocab})")
        check_context(art, len(prompt_ids), max_new_tokens)
        self.art, self.prompt_ids, self.max_new_tokens = art, prompt_ids, max_new_tokens
        self.width, self.lookup = width, min(lookup, width - 1)
        self.store = art.datastore if datastore and self.lookup else None
        if self.store is not None:  # (its index and rankings made here, before the steps)
            self.store.prepare(min(self.lookup, STORE_LENGTH))
        self.eos = set(art.tokenizer.eos_token_ids) if stop_at_eos else set()
        self.step_times, self.hidden_states = step_times, hidden_states
        self.session = session if session is not None else art.new_session()
        self.ids: list[int] = []
        self.steps = 0
        self.prefilled = 0
        self.prefill_s = self.decode_s = 0.0
        self._iter = self._run()

    def __iter__(self):
        return self._iter

    def result(self) -> GenerationResult:
        """Run to the end; the whole generation's result."""
        for _ in self._iter:
            pass
        return GenerationResult(
            prompt_ids=self.prompt_ids, ids=self.ids, text=self.art.tokenizer.decode(self.ids),
            steps=self.steps,
            accepted_per_step=(len(self.ids) - 1) / self.steps if self.steps else 1.0,
            prefill_s=self.prefill_s, decode_s=self.decode_s)

    def _emit(self, new: list[int]) -> list[int]:
        """The part of ``new`` that is output: up to EOS and the token budget."""
        room = self.max_new_tokens - len(self.ids)
        new = new[:room]
        ends = [k for k, t in enumerate(new) if t in self.eos]
        if ends:
            new = new[: ends[0] + 1]
        self.ids.extend(new)
        return new

    def _done(self) -> bool:
        return len(self.ids) >= self.max_new_tokens or self.ids[-1] in self.eos

    def _run(self):
        art, sess = self.art, self.session
        # Reuse the cached prefix of the prompt (a chat's earlier turns); at least one prompt
        # token is prefilled, since prefill chooses the first new token.
        keep = min(_common_prefix(sess.tokens, self.prompt_ids), len(self.prompt_ids) - 1)
        sess.truncate(keep)
        t0 = time.perf_counter()
        nxt, hidden = sess.prefill(self.prompt_ids[keep:])
        self.prefilled = len(self.prompt_ids) - keep
        self.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if self.hidden_states is not None:
            self.hidden_states.append(hidden.numpy()[0])
        yield self._emit([nxt])
        row = 0  # the row of `hidden` (prefill's last, then a verify call's) the draft reads
        index = NgramIndex(store=self.store) if self.lookup else None
        if index is not None:
            index.extend(self.prompt_ids + self.ids)
        while not self._done():
            ts = time.perf_counter()
            # Near the end of the cache a step verifies the tree that fits the room left:
            # every width then fits what sequential decoding fits (any tree is lossless).
            width = min(self.width, sess.capacity - sess.length)
            lookup = min(self.lookup, width - 1)
            looked, looked_ids = index.draft_tree(lookup) if lookup else ((), [])
            shape = _step_shape(art, width, looked)
            nodes = np.empty(width, "int32")
            nodes[0] = self.ids[-1]
            nodes[1: 1 + shape.medusa_nodes] = shape.node_refs
            nodes[1 + shape.medusa_nodes:] = looked_ids
            # The draft writes the tree's tokens on the device, from the hidden states still
            # there; verify takes them as they are (one wait a step: verify's greedy ids).
            tokens = art.draft_tree(hidden, row, nodes) if shape.medusa_nodes else nodes
            greedy, hid, _ = sess.verify(tokens, shape.depths + sess.length, shape.mask,
                                         shape.csr)
            tokens = sess.tree_tokens
            path = accept_path(shape.tree, tokens, greedy) if width > 1 else [0]
            sess.commit(path)
            hidden, row = hid, path[-1]
            if self.hidden_states is not None:
                self.hidden_states.append(hid.numpy()[path[-1]])
            self.steps += 1
            new = self._emit([int(t) for t in tokens[path[1:]]] + [int(greedy[path[-1]])])
            if index is not None:
                index.extend(new)
            if self.step_times is not None:
                self.step_times.append(time.perf_counter() - ts)
            self.decode_s = time.perf_counter() - t1
            yield new
        # The cache holds the context up to the last emitted token, which no step has run
        # yet: nodes accepted past EOS or the budget are dropped.
        sess.truncate(len(self.prompt_ids) + len(self.ids) - 1)
        self.decode_s = time.perf_counter() - t1


def generate(art, prompt_ids, max_new_tokens: int = 64, stop_at_eos: bool = True,
             width: int = 1, step_times: list | None = None, lookup: int = 0,
             hidden_states: list | None = None, session=None,
             datastore: bool = True) -> GenerationResult:
    """Greedy decoding to the end (see :class:`Generation`)."""
    return Generation(art, prompt_ids, max_new_tokens, stop_at_eos, width, step_times, lookup,
                      hidden_states, session, datastore).result()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class TextStream:
    """Incremental detokenization: :meth:`push` returns the text that new ids add.

    Text is decoded from all ids so far (BPE pieces and multi-byte characters span tokens) and
    held back while it ends in an incomplete character, or in a run of byte-fallback pieces
    (the next byte may make the whole run one U+FFFD a byte); :meth:`finish` gives what is
    held back when no ids follow, so the pieces join to the decoded whole."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def push(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        settled = len(self.ids)
        byte_ids = self.tokenizer.byte_token_ids
        while settled and self.ids[settled - 1] in byte_ids:
            settled -= 1
        text = self.tokenizer.decode(self.ids[:settled])
        return "" if text.endswith("\ufffd") else self._show(text)

    def finish(self) -> str:
        """The text held back at the end (an incomplete character, as U+FFFD)."""
        return self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> str:
        new, self.shown = text[self.shown:], len(text)
        return new


@dataclasses.dataclass(frozen=True)
class _StepShape:
    tree: Tree  # the combined tree (Medusa nodes, then the lookup nodes)
    mask: np.ndarray
    csr: tuple[np.ndarray, np.ndarray]  # the mask as (row_ptr, col_idx), verify's sparse part
    depths: np.ndarray
    medusa_nodes: int
    node_refs: np.ndarray  # the Medusa nodes as the draft's references, -1 - (head * 10 + rank)


def _step_shape(art, width: int, looked: tuple[int, ...]) -> _StepShape:
    """The verified tree for a step: the best Medusa tree of ``width - len(looked)`` nodes
    plus the lookup nodes, whose parents ``looked`` gives (-1: the root;
    :meth:`NgramIndex.draft_tree`). Cached per shape (the latest 256); the Medusa part's
    arrays per its width, so a new lookup tree costs only its own rows."""

    def make():
        bw = width - len(looked)
        base, b_mask, b_depths, (b_ptr, b_col), node_refs = _medusa_part(art, bw)
        parents = list(base.parents)
        rows: list[list[int]] = []  # each lookup node's ancestors and itself, increasing
        for node, p in enumerate(looked, bw):
            parent = 0 if p < 0 else bw + p
            parents.append(parent)
            rows.append((rows[parent - bw] if parent else [0]) + [node])
        counts = np.array([len(r) for r in rows], "int32")
        cols = np.array([c for r in rows for c in r], "int32")
        mask = np.zeros((width, width), "int32")
        mask[:bw, :bw] = b_mask
        mask[np.repeat(np.arange(bw, width), counts), cols] = 1
        csr = (np.concatenate([b_ptr, b_ptr[-1] + np.cumsum(counts, dtype="int32")]),
               np.concatenate([b_col, cols]))
        tree = Tree(tuple(parents), base.ranks + (-1,) * len(looked),
                    base.probs + (0.0,) * len(looked))
        return _StepShape(tree, mask, csr, np.concatenate([b_depths, counts - 1]), bw - 1,
                          node_refs)

    return latest_cached(art.step_shapes, (width, looked), make, 256)


def _medusa_part(art, width: int):
    """``(tree, mask, depths, csr, node_refs)`` of the best Medusa tree of ``width`` nodes
    (``art.tree``: the root alone at W = 1), cached in ``art.medusa_parts``."""

    def make():
        base = art.tree(width)
        ranks = np.asarray(base.ranks[1:], dtype=np.int64)
        heads = np.asarray(base.heads[1:], dtype=np.int64)
        mask = base.mask()
        return (base, mask, base.depths, csr_from_mask(mask),
                (-1 - (heads * MEDUSA_TOPK + ranks)).astype(np.int32))

    return latest_cached(art.medusa_parts, width, make, 256)
