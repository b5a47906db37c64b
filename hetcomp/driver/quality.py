"""``hetcomp quality``: what a compiled artifact's numerics cost, as numbers.

A converted weight format (float16, a quantized one), a float16 KV cache or another summation
order changes the logits; this measures by how much on a fixed text set, under teacher forcing:
every text runs through ``verify`` as a chain (the cache filled chunk by chunk, each row's
logits kept), so every position is scored with the true text before it. Against a reference
artifact (the float32 compile of the same model) it reports how often the two choose the same
next token, the KL divergence of their distributions and where they first disagree.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..errors import HetcompError
from ..runtime import load_artifact
from ..speculative.corpus import load_corpus

QUALITY_CHUNK = 16  # rows per verify call (a compiled static width: exact row tiles)


def quality_texts(count: int = 32) -> list[str]:
    """The fixed text set: the first ``count`` MT-bench prompts (plain text, no template)."""
    return load_corpus("mtbench")[:count]


def teacher_forced_logits(art, ids: list[int], chunk: int = QUALITY_CHUNK) -> np.ndarray:
    """``[len(ids), V]`` float64 logits of every position, each seeing the true ids before it
    (at most the artifact's context)."""
    if len(ids) > art.config.max_context:
        raise HetcompError(f"a text of {len(ids)} tokens exceeds the context of "
                           f"{art.config.max_context}")
    sess = art.new_session()
    rows = []
    for s in range(0, len(ids), chunk):
        part = ids[s: s + chunk]
        w = len(part)
        _, _, logits = sess.verify(np.asarray(part, "int32"), np.arange(s, s + w),
                                   np.tril(np.ones((w, w), "int32")))
        rows.append(logits.numpy().astype(np.float64))
        sess.commit(list(range(w)))  # the chain is already in place: no kernel runs
    return np.concatenate(rows)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclasses.dataclass
class _Tally:
    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    first: dict | None = None


def quality(artifact: str, reference: str | None = None, texts: int = 32,
            verify: bool = True) -> dict:
    """Perplexity of ``artifact`` on :func:`quality_texts` (each cut to the context, the
    shorter of the two with a reference) and, with a ``reference`` artifact,
    the agreement of their next-token choices (argmax), the mean KL(reference || artifact) and
    the first disagreement (text, position, both top-2 ids and logits)."""
    if texts < 1:
        raise HetcompError(f"--texts must be at least 1, not {texts}")
    chosen = quality_texts(texts)
    if len(chosen) < texts:  # not fewer than asked, silently, under the count asked for
        raise HetcompError(f"--texts {texts}: the text set has {len(chosen)} texts")
    art = load_artifact(artifact, verify)
    ref = load_artifact(reference, verify) if reference else None
    if ref is not None and ref.config.vocab_size != art.config.vocab_size:
        raise HetcompError(f"{reference} has another vocabulary than {artifact}: not the same "
                           "model")
    # A long text is scored up to the context, the shorter one's where two are compared.
    context = min(a.config.max_context for a in (art, ref) if a is not None)
    t = _Tally()
    for ti, text in enumerate(chosen):
        ids = art.tokenizer.encode_text(text)
        if ref is not None and ref.tokenizer.encode_text(text) != ids:
            raise HetcompError(f"{reference} tokenizes the texts differently: not the same "
                               "model")
        ids = ids[:context]
        if len(ids) < 2:
            continue
        own = teacher_forced_logits(art, ids)[:-1]
        lp = _log_softmax(own)
        nxt = np.asarray(ids[1:])
        t.nll -= float(lp[np.arange(len(nxt)), nxt].sum())
        t.tokens += len(nxt)
        if ref is None:
            continue
        raw = teacher_forced_logits(ref, ids)[:-1]
        rp = _log_softmax(raw)
        t.ref_nll -= float(rp[np.arange(len(nxt)), nxt].sum())
        t.kl += float((np.exp(rp) * (rp - lp)).sum())
        a, b = lp.argmax(axis=-1), rp.argmax(axis=-1)
        t.agree += int((a == b).sum())
        if t.first is None and (a != b).any():
            pos = int(np.argmax(a != b))
            t.first = {"text": ti, "position": pos + 1,
                       "artifact_top2": _top2(own[pos]),
                       "reference_top2": _top2(raw[pos])}
    if t.tokens == 0:
        raise HetcompError("no text to score")
    out = {"artifact": artifact, "texts": texts, "tokens": t.tokens,
           "nll_per_token": t.nll / t.tokens, "perplexity": _perplexity(t.nll / t.tokens)}
    if ref is not None:
        out.update({"reference": reference, "reference_nll_per_token": t.ref_nll / t.tokens,
                    "reference_perplexity": _perplexity(t.ref_nll / t.tokens),
                    "agreement": t.agree / t.tokens, "mean_kl": t.kl / t.tokens,
                    "first_disagreement": t.first})
    return out


def _perplexity(nll_per_token: float) -> float | None:
    """``exp`` of the mean negative log-likelihood; None past float's range (a mean above
    ~709 nats a token: a broken model), which JSON could not hold as a number."""
    try:
        return math.exp(nll_per_token)
    except OverflowError:
        return None


def _top2(logits: np.ndarray) -> list[list]:
    """The two highest ``[id, logit]`` pairs."""
    top = np.argsort(logits)[-2:][::-1]
    return [[int(i), round(float(logits[i]), 4)] for i in top]
