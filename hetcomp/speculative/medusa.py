"""Medusa heads: ``head_k(h) = lm_head(h + SiLU(W_k h + U_k e + b_k))``, predicting token t + 2 + k.

``h`` is the final hidden state at position t and ``e`` the embedding of the token the base
model chose there (the tree's root, known when drafting). Conditioning on ``e`` (as EAGLE
does) spares the heads from decoding the root out of ``h``; ``U`` is optional (plain Medusa
without it). Trained by self-distillation (targets are the base model's own greedy tokens)
with the tied LM head frozen. Stored as a small ``.npz`` (float16 weights) plus statistics.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zipfile
import zlib

import numpy as np

from ..artifact_format import load_npz, output_file
from ..errors import HetcompError
from .datastore import pack_sequences, unpack_sequences

TOPK = 10


@dataclasses.dataclass
class MedusaHeads:
    w: np.ndarray  # [K, E, E] float32, HF layout (z = h @ w[k].T)
    b: np.ndarray  # [K, E]
    rank_probs: np.ndarray  # [K, TOPK]: P(rank-r candidate of head k is right), held out
    info: dict
    ranks: np.ndarray | None = None  # [N, K] held-out target ranks (joint statistics)
    u: np.ndarray | None = None  # [K, E, E]: weights on the root token's embedding
    vocab: np.ndarray | None = None  # [Vd] int32: the draft vocabulary (None: the whole one)
    # The greedy responses calibration trained on (the lookup draft's datastore) and its
    # held-out (prompt ids, response) pairs, whose rows ``ranks`` holds in order (what
    # replaying a decode walks); None in heads saved before calibration kept them.
    responses: list[np.ndarray] | None = None
    heldout: list[tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def num_heads(self) -> int:
        return int(self.w.shape[0])

    def hidden(self, h: np.ndarray, e: np.ndarray | None = None) -> np.ndarray:
        """``[N, E]`` hidden states (and root embeddings) -> ``[K, N, E]`` head states."""
        z = np.stack([h @ self.w[k].T + (0 if self.u is None else e @ self.u[k].T)
                      for k in range(self.num_heads)]) + self.b[:, None, :]
        return h[None] + z / (1.0 + np.exp(-z))

    def save(self, path: str) -> None:
        """Write the heads to ``path`` (a temporary file renamed into place)."""
        meta = dict(self.info)
        meta["rank_probs"] = self.rank_probs.tolist()
        extra = {} if self.ranks is None else {"ranks": self.ranks.astype(np.int8)}
        if self.u is not None:
            extra["u"] = self.u.astype(np.float16)
        if self.vocab is not None:
            extra["vocab"] = self.vocab.astype(np.int32)
        if self.responses is not None:
            extra["responses"] = pack_sequences(self.responses)
        if self.heldout is not None:
            extra["heldout_prompts"] = pack_sequences([p for p, _ in self.heldout])
            extra["heldout_responses"] = pack_sequences([r for _, r in self.heldout])
        with output_file(path) as tmp:
            np.savez_compressed(tmp, w=self.w.astype(np.float16), b=self.b.astype(np.float32),
                                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                                **extra)

    @classmethod
    def load(cls, path: str) -> MedusaHeads:
        try:
            # (weights past float32's range become inf, refused below, without a warning)
            with load_npz(path) as z, np.errstate(over="ignore"):
                meta = json.loads(bytes(z["meta"]).decode())
                w, b = z["w"].astype(np.float32), z["b"].astype(np.float32)
                ranks = z["ranks"] if "ranks" in z.files else None
                u = z["u"].astype(np.float32) if "u" in z.files else None
                vocab = z["vocab"] if "vocab" in z.files else None
                seqs = {name: unpack_sequences(z[name]) if name in z.files else None
                        for name in ("responses", "heldout_prompts", "heldout_responses")}
            rank_probs = np.asarray(meta.pop("rank_probs"), dtype=np.float64)
        except (OSError, EOFError, KeyError, ValueError, TypeError, AttributeError,
                RecursionError, zipfile.BadZipFile, zlib.error) as e:  # a damaged .npz's
            raise HetcompError(f"cannot read Medusa heads {path}: "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                               ) from None
        for name, ids in (("ranks", ranks), ("vocab", vocab)):
            if ids is not None and not np.issubdtype(ids.dtype, np.integer):
                raise HetcompError(f"cannot read Medusa heads {path}: {name} hold "
                                   f"{ids.dtype}, not integers")
        if vocab is not None:  # token ids: int32 holds every vocabulary's (compile checks
            # them against the model's)
            bounds = np.iinfo(np.int32)
            if vocab.size and (vocab.min() < bounds.min or vocab.max() > bounds.max):
                raise HetcompError(f"cannot read Medusa heads {path}: vocab holds ids past "
                                   "int32's range")
            vocab = vocab.astype(np.int32)
        k = w.shape[0] if w.ndim == 3 else -1
        # Statistics of K heads of TOPK candidates (ranks: -1 no target, TOPK not among them);
        # others would build trees with nodes for heads or ranks the draft does not have.
        if (w.ndim != 3 or w.shape[1] != w.shape[2] or b.shape != w.shape[:2]
                or rank_probs.shape != (k, TOPK)
                or (ranks is not None and (ranks.ndim != 2 or ranks.shape[1] != k
                                           or ranks.size and (ranks.max() > TOPK
                                                              or ranks.min() < -1)))
                or (u is not None and u.shape != w.shape)
                or (vocab is not None and vocab.ndim != 1)):
            raise HetcompError(f"cannot read Medusa heads {path}: inconsistent array shapes")
        if not (np.isfinite(rank_probs).all() and ((rank_probs >= 0) & (rank_probs <= 1)).all()):
            raise HetcompError(f"cannot read Medusa heads {path}: rank_probs are not "
                               "probabilities")
        if not all(np.isfinite(a).all() for a in (w, b, u) if a is not None):
            raise HetcompError(f"cannot read Medusa heads {path}: weights that are not finite")
        heldout = None
        if seqs["heldout_prompts"] is not None or seqs["heldout_responses"] is not None:
            prompts, responses = seqs["heldout_prompts"], seqs["heldout_responses"]
            # one response a prompt, one row of ranks a response token
            if (prompts is None or responses is None or len(prompts) != len(responses)
                    or ranks is None or sum(len(r) for r in responses) != len(ranks)):
                raise HetcompError(f"cannot read Medusa heads {path}: held-out responses "
                                   "that do not match their prompts or ranks")
            heldout = list(zip(prompts, responses, strict=True))
        return cls(w, b, rank_probs, meta, ranks, u, vocab, seqs["responses"], heldout)

    def token_ids(self) -> np.ndarray:
        """Every token id the heads hold (draft vocabulary, responses, prompts), to check
        against a model's vocabulary."""
        parts = [np.zeros(0, np.int32)] + ([] if self.vocab is None else [self.vocab])
        parts += list(self.responses or ()) + [x for pair in self.heldout or () for x in pair]
        return np.concatenate([np.asarray(p, np.int64).ravel() for p in parts])



def draft_vocabulary(seqs, vocab_size: int, size: int) -> np.ndarray:
    """The ``size`` tokens the draft may propose: the model's own outputs ranked by how often
    it emitted them (``seqs``: its greedy sequences), then the rest in id order (BPE ids
    roughly follow merge frequency). Returned sorted by id (int32).

    The draft reads its LM head every step; over 8K of SmolLM2's 49K tokens it reads 6x fewer
    bytes. Drafts only propose, so a token outside the vocabulary costs acceptance, never
    correctness (FR-Spec, Zhao et al. 2025, prunes the same way)."""
    if not 0 < size <= vocab_size:
        raise HetcompError(f"draft vocabulary size must lie in (0, {vocab_size}]")
    counts = np.bincount(np.concatenate([np.asarray(s).ravel() for s in seqs]),
                         minlength=vocab_size)[:vocab_size]
    order = np.lexsort((np.arange(vocab_size), -counts))
    return np.sort(order[:size]).astype(np.int32)


def _restrict(embed: np.ndarray, targets: np.ndarray, vocab: np.ndarray | None):
    """The LM-head rows of the draft vocabulary and the targets as indices into it (-1 for
    tokens outside it, which no head can propose)."""
    if vocab is None:
        return embed, targets
    index = np.full(len(embed), -1, np.int64)
    index[vocab] = np.arange(len(vocab))
    return embed[vocab], np.where(targets >= 0, index[np.maximum(targets, 0)], -1)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log_softmax_grad(logits: np.ndarray, target: np.ndarray, teacher: np.ndarray | None = None,
                      soft: float = 0.0):
    """Cross-entropy loss and d(loss)/d(logits) for rows of logits.

    With ``teacher`` (the base model's probabilities for the same token, ``[N, V]``) the
    target distribution is ``soft * teacher + (1 - soft) * one_hot(target)``: the heads then
    learn the model's whole ranking, not only its first choice (Medusa-2's self-distillation).
    """
    m = logits.max(-1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(-1, keepdims=True)
    rows = np.arange(len(target))
    loss = float((np.log(s[:, 0]) + m[:, 0] - logits[rows, target]).mean())
    g = e / s
    if teacher is not None and soft:
        g -= soft * teacher
        g[rows, target] -= 1.0 - soft
    else:
        g[rows, target] -= 1.0
    return loss, g / len(target)


def validation_loss(w, b, u, h, e, targets, embed, chunk: int = 1024) -> np.ndarray:
    """Mean cross-entropy per head on held-out rows."""
    k_heads = w.shape[0]
    total, count = np.zeros(k_heads), np.zeros(k_heads)
    emb_t = np.ascontiguousarray(embed.T)
    for s in range(0, len(h), chunk):
        x = h[s: s + chunk]
        for k in range(k_heads):
            t = targets[s: s + chunk, k]
            keep = t >= 0
            if not keep.any():
                continue
            z = x[keep] @ w[k].T + b[k]
            if u is not None:
                z += e[s: s + chunk][keep] @ u[k].T
            loss, _ = _log_softmax_grad((x[keep] + z / (1 + np.exp(-z))) @ emb_t, t[keep])
            total[k] += loss * keep.sum()
            count[k] += keep.sum()
    return total / np.maximum(count, 1)


def train_heads(h: np.ndarray, targets: np.ndarray, embed: np.ndarray, num_heads: int,
                epochs: int = 3, batch: int = 256, lr: float = 1e-3, seed: int = 0,
                progress: bool = True, validation=None, weight_decay: float = 0.0,
                roots: np.ndarray | None = None, soft: float = 0.0,
                vocab: np.ndarray | None = None, cosine: bool = False,
                lm_head: np.ndarray | None = None):
    """AdamW on the heads' cross-entropy; ``targets[n, k]`` = token 2 + k after row n (-1: none).

    ``embed`` is the token embedding ``[V, E]`` (the roots' rows) and ``lm_head`` the model's
    LM head ``[V, E]`` (None: tied, ``embed``), both frozen. Weights start at zero, i.e. every head
    starts as the base LM head on an unchanged hidden state. With ``validation = (h, targets)``
    each head keeps the epoch with its lowest validation loss (early stopping per head).
    With ``roots`` (the root token of each row; validation then is ``(h, roots, targets)``)
    the heads also learn ``U`` on the root's embedding. With ``soft > 0`` the targets mix in
    the base model's distribution over the target token: row ``n + 1 + k`` of ``h`` is the
    hidden state whose logits chose ``targets[n, k]`` (rows of one sequence are consecutive,
    as :func:`~hetcomp.driver.calibrate.make_targets` lays them out). With ``vocab`` the
    softmax runs over the draft vocabulary only (as the compiled draft does); targets outside
    it are skipped. ``cosine``: the learning rate decays from ``lr`` to 0 over the run (a
    cosine schedule). Returns ``(w, b, u or None)``.
    """
    rng = np.random.default_rng(seed)
    full_embed = embed  # the root embedding still reads the whole table
    # From here ``embed`` is the (restricted) LM head: an untied model's head is not its
    # embedding (Qwen2.5's GGUF stores them apart, in different formats).
    head = embed if lm_head is None else lm_head
    embed, targets = _restrict(head, targets, vocab)
    if validation is not None:
        validation = (*validation[:-1], _restrict(head, validation[-1], vocab)[1])
    n, e = h.shape
    w = np.zeros((num_heads, e, e), np.float32)
    b = np.zeros((num_heads, e), np.float32)
    u = None if roots is None else np.zeros((num_heads, e, e), np.float32)
    mw, vw, mb, vb = (np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b))
    mu, vu = (None, None) if u is None else (np.zeros_like(u), np.zeros_like(u))
    step, b1, b2, eps = 0, 0.9, 0.999, 1e-8
    emb_t = np.ascontiguousarray(embed.T)
    best_loss = np.full(num_heads, np.inf)
    best_w, best_b = w.copy(), b.copy()
    best_u = None if u is None else u.copy()
    total = epochs * -(-n // batch)
    for epoch in range(epochs):
        order = rng.permutation(n)
        losses = []
        for s in range(0, n, batch):
            idx = order[s: s + batch]
            x = h[idx]
            er = None if u is None else full_embed[roots[idx]]
            step += 1
            rate = lr * 0.5 * (1 + np.cos(np.pi * (step - 1) / total)) if cosine else lr
            for k in range(num_heads):
                t = targets[idx, k]
                keep = t >= 0
                if not keep.any():
                    continue
                xk, tk = x[keep], t[keep]
                z = xk @ w[k].T + b[k]
                if u is not None:
                    ek = er[keep]
                    z += ek @ u[k].T
                sig = 1.0 / (1.0 + np.exp(-z))
                hk = xk + z * sig
                teacher = _softmax(h[idx[keep] + 1 + k] @ emb_t) if soft else None
                loss, g = _log_softmax_grad(hk @ emb_t, tk, teacher, soft)
                losses.append(loss)
                dh = g @ embed
                dz = dh * (sig * (1 + z * (1 - sig)))
                gw, gb = dz.T @ xk, dz.sum(0)
                updates = [(w[k], gw, mw[k], vw[k]), (b[k], gb, mb[k], vb[k])]
                if u is not None:
                    updates.append((u[k], dz.T @ ek, mu[k], vu[k]))
                for p, gp, m_, v_ in updates:
                    m_ *= b1
                    m_ += (1 - b1) * gp
                    v_ *= b2
                    v_ += (1 - b2) * gp * gp
                    p -= rate * (m_ / (1 - b1 ** step)) / (np.sqrt(v_ / (1 - b2 ** step)) + eps)
                    if weight_decay and p.ndim == 2:
                        p -= rate * weight_decay * p
            if progress and (s // batch) % 10 == 0:
                print(f"\r  epoch {epoch + 1}/{epochs}  {min(s + batch, n)}/{n}  "
                      f"loss {np.mean(losses[-40:]):.3f}", end="", file=sys.stderr, flush=True)
        if validation is not None:
            vh, vr, vt = validation
            ve = None if u is None else full_embed[vr]
            vloss = validation_loss(w, b, u, vh, ve, vt, embed)
            better = vloss < best_loss
            best_loss[better] = vloss[better]
            best_w[better], best_b[better] = w[better], b[better]
            if u is not None:
                best_u[better] = u[better]
            if progress:
                print(f"  validation loss per head {np.round(vloss, 3).tolist()}",
                      end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
    return (best_w, best_b, best_u) if validation is not None else (w, b, u)


def heldout_ranks(heads: MedusaHeads, h: np.ndarray, targets: np.ndarray, embed: np.ndarray,
                  topk: int = TOPK, chunk: int = 512, roots: np.ndarray | None = None,
                  lm_head: np.ndarray | None = None) -> np.ndarray:
    """``[N, K]`` int8: the rank of row n's target among head k's top-``topk`` candidates
    (``topk`` when it is not among them, -1 when the row has no target for that head).
    Candidates come from the heads' draft vocabulary, as in the compiled draft; ``embed``
    gives the roots' embeddings, ``lm_head`` the logits (None: tied, ``embed``)."""
    ranks = np.full(targets.shape, -1, np.int8)
    head = embed if lm_head is None else lm_head
    ids = np.arange(len(head)) if heads.vocab is None else heads.vocab
    emb_t = np.ascontiguousarray((head if heads.vocab is None else head[ids]).T)
    for s in range(0, len(h), chunk):
        er = None if roots is None else embed[roots[s: s + chunk]]
        hk = heads.hidden(h[s: s + chunk], er)
        for k in range(heads.num_heads):
            t = targets[s: s + chunk, k]
            keep = np.flatnonzero(t >= 0)
            if not len(keep):
                continue
            logits = hk[k][keep] @ emb_t
            top = np.argpartition(-logits, topk - 1, axis=-1)[:, :topk]
            order = np.take_along_axis(logits, top, -1).argsort(-1)[:, ::-1]
            top = ids[np.take_along_axis(top, order, -1)]
            hit = top == t[keep][:, None]
            ranks[s + keep, k] = np.where(hit.any(1), hit.argmax(1), topk)
    return ranks


def rank_statistics(ranks: np.ndarray, topk: int = TOPK) -> np.ndarray:
    """``[K, topk]``: fraction of rows whose target is head k's rank-r candidate."""
    probs = np.zeros((ranks.shape[1], topk))
    for k in range(ranks.shape[1]):
        col = ranks[:, k][ranks[:, k] >= 0]
        if len(col):
            probs[k] = np.bincount(col[col < topk], minlength=topk)[:topk] / len(col)
    return probs
