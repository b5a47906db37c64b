"""``hetcomp calibrate``: self-distillation data from the compiled model, Medusa heads, statistics."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import sys
import tempfile
import time
import zipfile
import zlib

import numpy as np

from ..artifact_format import (
    PLOT_METADATA,
    check_output,
    check_output_file,
    is_plot,
    load_npz,
    output_file,
)
from ..data import packaged_file
from ..errors import HetcompError
from ..frontend import load_model
from ..frontend.tokenizer import TokenizerInfo
from ..runtime import load_artifact
from ..runtime.generate import auto_lookup, generate
from ..speculative.acceptance import best_lookup, replay_acceptance
from ..speculative.corpus import CORPORA, load_corpus
from ..speculative.medusa import (
    TOPK,
    MedusaHeads,
    draft_vocabulary,
    heldout_ranks,
    rank_statistics,
    train_heads,
)
from ..speculative.tree import build_tree, csr_from_mask
from .compile import CompileOptions, compile_model

WIDTHS = (1, 2, 4, 8, 16, 32, 64)


@dataclasses.dataclass(frozen=True)
class CalibrateOptions:
    corpus: str = "mtbench"
    num_heads: int = 4
    new_tokens: int = 96  # generated tokens per prompt
    held_out: float = 0.15
    epochs: int = 3
    seed: int = 0
    max_prompts: int = 0  # 0: all
    weight_decay: float = 0.01
    cosine: bool = True  # the learning rate decays to 0 over training (else constant)
    cache: str | None = None  # .npz to save the generated data in
    condition_on_root: bool = True  # heads also see the root token's embedding (EAGLE-style)
    soft: float = 0.5  # weight of the base model's distribution in the targets (0: hard)
    draft_vocab: int = 8192  # tokens the draft may propose (0: the whole vocabulary)
    responses: str | None = None  # recorded greedy responses (.jsonl[.gz]): prompt -> ids
    recorded_only: bool = False  # with responses: skip the prompts that have none
    # Weights of the compiled model whose hidden states the heads learn from: float16 reads
    # half the bytes (Qwen2.5-Coder-0.5B: 1.3 GB a step in float32) and takes half the memory.
    dtype: str = "float32"


def read_responses(path: str, vocab_size: int | None = None) -> dict[str, list[int]]:
    """``{prompt: greedy response ids}`` from JSON lines ``{"prompt": ..., "ids": [...]}``.

    Every response holds at least one id (teacher forcing starts from its first) and, with
    ``vocab_size``, only ids of that vocabulary: the compiled model reads its embedding at
    each id unchecked, so one outside it crashed the process or trained on other memory."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as fh:
            rows = [(n, json.loads(line)) for n, line in enumerate(fh, 1) if line.strip()]
        rows = [(n, r["prompt"], [int(i) for i in r["ids"]]) for n, r in rows]
        responses = {prompt: ids for _, prompt, ids in rows}  # (a list as prompt: TypeError)
    except (OSError, ValueError, KeyError, TypeError, OverflowError, EOFError, zlib.error,
            RecursionError) as e:
        # (gzip: EOFError for a truncated stream, zlib.error for a damaged one; an id of
        # 1e400: OverflowError)
        raise HetcompError(f"cannot read responses {path}: {e}") from None
    for n, _, ids in rows:
        if not ids:
            raise HetcompError(f"responses {path}, line {n}: the response is empty")
        if vocab_size is not None and not 0 <= min(ids) <= max(ids) < vocab_size:
            raise HetcompError(f"responses {path}, line {n}: token ids outside this model's "
                               f"vocabulary of {vocab_size}")
    return responses


TEACHER_CHUNK = 64  # tokens per verify call when replaying a recorded response


def _causal(w: int):
    """A causal chain of ``w`` nodes as verify takes it: the mask and its CSR."""
    mask = np.tril(np.ones((w, w), "int32"))
    return mask, csr_from_mask(mask)


def teacher_force(art, prompt_ids, response, chunk: int = TEACHER_CHUNK) -> np.ndarray:
    """The final hidden states ``[len(response), E]`` that chose each token of a recorded
    greedy ``response`` to ``prompt_ids``: the prompt's prefill, then the response as chains
    of ``chunk`` tokens through ``verify`` (causal mask) and ``commit``. Row ``j`` is the
    state the base model chose ``response[j]`` from, as :func:`collect` records while
    generating, at a fraction of the cost. Raises if the artifact disagrees with the record
    on more than 1% of the tokens (a response from another model)."""
    sess = art.new_session()
    first, hidden = sess.prefill(prompt_ids)
    rows, agree = [hidden.numpy()[0]], [first == response[0]]
    feed = list(response[:-1])
    causal: dict = {}  # pad -> (mask, CSR) of a causal chain
    for s in range(0, len(feed), chunk):
        part = np.asarray(feed[s: s + chunk], "int64")
        w = len(part)
        # Chains run at the width of a width-specialised verify, a short one padded (several
        # times faster than the generic verify); the mask is causal, so padding never reaches
        # real rows, and only the real rows are committed.
        pad = min((x for x in art.static_widths if x >= w), default=w)
        pad = pad if sess.length + pad <= sess.capacity else w
        tokens = np.concatenate([part, np.zeros(pad - w, "int64")])
        if pad not in causal:
            causal[pad] = _causal(pad)
        mask, csr = causal[pad]
        greedy, hid, _ = sess.verify(tokens, sess.length + np.arange(pad), mask, csr)
        sess.commit(list(range(w)))
        rows.extend(hid.numpy()[:w])
        agree.extend(greedy[:w] == np.asarray(response[s + 1: s + 1 + w]))
    if np.mean(agree) < 0.99:
        raise HetcompError(f"recorded response disagrees with the model's greedy choices on "
                           f"{100 * (1 - np.mean(agree)):.1f}% of its tokens")
    return np.stack(rows)


def collect(art, prompts, new_tokens: int, progress: bool = True,
            responses: dict | None = None):
    """Greedy-generate from each prompt that fits the context (or replay its recorded
    response, ``responses``: prompt -> ids): ``(feats, seqs, prompts)``, per prompt the
    hidden states ``[n, E]``, the ``n`` tokens they chose and the prompt's ids."""

    feats, seqs, used = [], [], []
    t0 = time.time()
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(art.tokenizer, prompt)
        if not fits(len(ids), new_tokens, art.config.max_context):
            continue
        if responses and prompt in responses:
            toks = responses[prompt][:new_tokens]
            feats.append(teacher_force(art, ids, toks))
        else:
            hs: list = []
            toks = generate(art, ids, max_new_tokens=new_tokens, hidden_states=hs).ids
            feats.append(np.stack(hs))
        seqs.append(np.asarray(toks))
        used.append(np.asarray(ids, np.int64))
        if progress:
            rate = sum(len(s) for s in seqs) / (time.time() - t0)
            print(f"\r  self-distillation data {i + 1}/{len(prompts)} prompts ({rate:.0f} "
                  "tokens/s)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if prompts and not feats:
        raise HetcompError(_none_fit(art.config.max_context, new_tokens))
    return feats, seqs, used


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A corpus prompt's ids as calibration runs it (one user turn where there is a chat
    template)."""
    return tokenizer.encode(prompt, chat=tokenizer.chat_template is not None)


def fits(prompt_len: int, new_tokens: int, context: int) -> bool:
    """Whether :func:`collect` uses a prompt of ``prompt_len`` ids (it leaves out the ones
    whose generation would not fit the context)."""
    return prompt_len + new_tokens + 1 < context


def _none_fit(context: int, new_tokens: int) -> str:
    return (f"no prompt of the corpus fits the model's context of {context} tokens with "
            f"--new-tokens {new_tokens}")


def make_targets(feats, seqs, num_heads: int):
    """Rows ``(hidden, root, targets)``: row j of a prompt is the hidden state that predicts
    token j (the root), its targets tokens j + 1 .. j + K (-1: past the end)."""
    hs, ts = [], []
    for h, s in zip(feats, seqs):
        n = len(s)
        t = np.full((n, num_heads), -1, np.int64)
        for k in range(num_heads):
            t[: max(n - 1 - k, 0), k] = s[1 + k:]
        hs.append(h)
        ts.append(t)
    return (np.concatenate(hs).astype(np.float32), np.concatenate(seqs).astype(np.int64),
            np.concatenate(ts))


def load_cache(path: str):
    """The generated data saved by ``CalibrateOptions.cache``: train and held-out parts,
    each ``(feats, seqs, prompts)`` as :func:`collect` returns them (``prompts`` None in data
    saved before it kept them)."""
    def part(z, prefix):
        n = sum(1 for k in z.files if k.startswith(prefix + "_h"))
        if n == 0:
            raise ValueError(f"no {prefix} rows")
        prompts = ([z[f"{prefix}_p{i}"] for i in range(n)] if f"{prefix}_p0" in z.files
                   else None)
        return ([z[f"{prefix}_h{i}"] for i in range(n)], [z[f"{prefix}_s{i}"] for i in range(n)],
                prompts)

    try:
        # Any file may be named here (--reuse, or --cache's check of what it would replace).
        with load_npz(path) as z:
            return part(z, "tr"), part(z, "ho")
    except (OSError, EOFError, KeyError, ValueError, TypeError, AttributeError,
            NotImplementedError, zipfile.BadZipFile, zlib.error) as e:  # damaged .npz files
        raise HetcompError(f"cannot read calibration data {path} (saved by --cache): "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           ) from None


def is_calibration_data(path: str) -> bool:
    """True when ``path`` holds data a ``--cache`` run saved."""
    try:
        load_cache(path)
    except HetcompError:
        return False
    return True


def check_calibration_data(data, cfg, path: str) -> None:
    """Saved data fit to train heads for the model ``cfg``: per prompt, hidden rows ``[n,
    E]`` and the ``n`` token ids they chose, in the vocabulary (data of another model used to
    fail mid-training, or to train heads on wrong rows)."""
    for feats, seqs, prompts in data:
        for h, t in zip(feats, seqs, strict=True):
            if h.ndim != 2 or h.shape[1] != cfg.hidden_size or h.dtype.kind != "f":
                raise HetcompError(f"calibration data {path} holds hidden states of shape "
                                   f"{list(h.shape)}, not [n, {cfg.hidden_size}]: saved for "
                                   "another model?")
            if t.ndim != 1 or len(t) != len(h) or t.dtype.kind not in "iu":
                raise HetcompError(f"calibration data {path} is inconsistent: {len(h)} hidden "
                                   f"rows against token ids of shape {list(t.shape)}")
            if t.size and (t.min() < 0 or t.max() >= cfg.vocab_size):
                raise HetcompError(f"calibration data {path} holds token ids outside this "
                                   f"model's vocabulary of {cfg.vocab_size}")
        for p in prompts or ():
            if p.ndim != 1 or p.dtype.kind not in "iu" or p.size and (
                    p.min() < 0 or p.max() >= cfg.vocab_size):
                raise HetcompError(f"calibration data {path} holds prompts that are not token "
                                   f"ids of this model's vocabulary of {cfg.vocab_size}")


def split_prompts(opts: CalibrateOptions, responses: dict | None = None):
    """``(training, held-out)`` prompts of the corpus: a seeded permutation, the first
    ``held_out`` fraction held out (with ``recorded_only``, only prompts in ``responses``)."""
    prompts = load_corpus(opts.corpus)
    if responses is not None and opts.recorded_only:
        prompts = [p for p in prompts if p in responses]
        if not prompts:
            raise HetcompError(f"no prompt of corpus {opts.corpus} has a response in "
                               f"{opts.responses}")
    order = np.random.default_rng(opts.seed).permutation(len(prompts))
    if opts.max_prompts:
        order = order[: opts.max_prompts]
    n_held = max(1, int(round(len(order) * opts.held_out)))
    held = [prompts[i] for i in order[:n_held]]
    train = [prompts[i] for i in order[n_held:]]
    if not train:
        raise HetcompError("the corpus is too small to split into training and held-out "
                           "prompts")
    return train, held


def heads_split(info: dict, responses: str | None, vocab_size: int | None = None):
    """``(training prompts, held-out prompts, {prompt: response ids} or None)`` of the
    ``calibrate`` run whose heads carry ``info`` (``MedusaHeads.info``, or an artifact's
    ``speculative.heads_info``): same corpus, seed and split, with ``responses`` the path of
    the recorded responses it replayed (None: it generated them)."""
    recorded = read_responses(responses, vocab_size) if responses else None
    # (heads calibrated before the split's options were recorded used the defaults)
    opts = CalibrateOptions(corpus=info["corpus"], seed=info["seed"], responses=responses,
                            recorded_only=bool(responses),
                            held_out=info.get("held_out", CalibrateOptions.held_out),
                            max_prompts=info.get("max_prompts", CalibrateOptions.max_prompts))
    return (*split_prompts(opts, recorded), recorded)


def heldout_prompts(info: dict, count: int = 8) -> list[str]:
    """The first ``count`` held-out prompts of the ``calibrate`` run whose heads carry
    ``info`` (:func:`heads_split`), so prompts the heads never trained on, the ones their
    trees' expected acceptance was measured on. Recorded responses are looked up in the
    package's data folder by file name. A corpus file is read where ``info`` says: calibrate
    records its absolute path (older heads, the path as typed: from the current folder)."""
    responses = packaged_file(info["responses"]) if info.get("recorded_only") else None
    return heads_split(info, responses)[1][:count]


def training_responses(heads: MedusaHeads, vocab_size: int
                       ) -> tuple[list[list[int]], str] | None:
    """The responses ``heads`` trained on, their held-out prompts' left out (so `bench
    --prompts heldout` stays held out), and where they come from: kept in the heads (since
    calibrate keeps them), else the recorded responses file in the package's data folder
    that ``heads.info`` names; None where neither is there."""
    info = heads.info
    if heads.responses is not None:
        recorded = os.path.basename(info.get("responses") or "")
        return ([r.tolist() for r in heads.responses],
                f"{recorded or 'greedy responses generated at calibration'}, kept in the heads")
    name = info.get("responses")
    path = packaged_file(os.path.basename(name)) if info.get("recorded_only") and name else None
    if path is None or not os.path.isfile(path):
        return None
    train, _, responses = heads_split(info, path, vocab_size)
    return [responses[p] for p in train], os.path.basename(path)


def heldout_sequences(heads: MedusaHeads, tokenizer, vocab_size: int):
    """``[(prompt ids, response ids)]``: the held-out prompts of ``heads`` and the responses
    calibration measured them on, in the order of the rows of the heads' held-out ``ranks``,
    for :func:`~hetcomp.speculative.acceptance.replay_acceptance`: kept in the heads (since
    calibrate keeps them), else redrawn from the corpus with the recorded responses file in
    the package's data folder that ``heads.info`` names (the first ``new_tokens`` of each).
    None where that cannot be known: no ranks, neither kept nor packaged responses, or
    responses that do not add up to the ranks' rows (a prompt calibration left out for its
    context)."""
    info, ranks = heads.info, heads.ranks
    if heads.heldout is not None:  # (MedusaHeads.load checked them against the ranks)
        return [(p.tolist(), r.tolist()) for p, r in heads.heldout]
    name = info.get("responses")
    path = packaged_file(os.path.basename(name)) if info.get("recorded_only") and name else None
    if ranks is None or path is None or not os.path.isfile(path) or "new_tokens" not in info:
        return None
    _, held, responses = heads_split(info, path, vocab_size)
    seqs = [(prompt_ids(tokenizer, p), responses[p][: info["new_tokens"]]) for p in held]
    return seqs if sum(len(r) for _, r in seqs) == len(ranks) else None


@dataclasses.dataclass(frozen=True)
class ReplayedWidths:
    """Per width, the lookup nodes a decode drafts and the tokens a step it then accepts,
    replayed (:func:`replayed_taus`), and a line saying where they come from."""

    taus: dict[int, float]
    lookups: dict[int, int]
    source: str


#: Replays made in this process, by their inputs' digest (the latest few): a compile and a
#: tune of the same model replay the same responses (the test suite compiles SmolLM2 with
#: its heads a dozen times; each replay is ~6 s of the compile).
_REPLAYED: dict[str, ReplayedWidths] = {}


def replayed_taus(heads: MedusaHeads, tokenizer, vocab_size: int, widths, store=None
                  ) -> ReplayedWidths | None:
    """Each of ``widths``' lookup nodes (:func:`~hetcomp.speculative.acceptance.best_lookup`:
    :func:`~hetcomp.runtime.generate.auto_lookup`'s, unless another accepts 1% more at 64
    and 128 tokens and over the whole responses) and the tokens a step greedy decoding then
    accepts over the whole responses, replayed over the held-out recorded responses of
    ``heads`` (:func:`~hetcomp.speculative.acceptance.replay_acceptance`) with the trees an
    artifact compiled with them verifies (from their joint statistics) and ``store``, the
    datastore or None; None where those responses are not known (:func:`heldout_sequences`)."""
    seqs = heldout_sequences(heads, tokenizer, vocab_size)
    if seqs is None:
        return None
    digest = hashlib.sha256()
    for part in (heads.rank_probs, heads.ranks, np.asarray(sorted(widths)),
                 *(np.asarray(x, np.int64) for seq in seqs for x in seq),
                 np.zeros(0) if store is None else store.tokens):
        digest.update(np.ascontiguousarray(part).tobytes() + b"|")
    key = digest.hexdigest()
    if key not in _REPLAYED:
        trees: dict = {}

        def tree(w: int):
            if w not in trees:
                trees[w] = build_tree(heads.rank_probs, w, heads.ranks)
            return trees[w]

        taus, lookups = {}, {}
        for w in widths:
            lookups[w], taus[w] = best_lookup(w, auto_lookup(w), lambda n, w=w: (
                replay_acceptance(seqs, heads.ranks, tree, w, n, store)))
        if len(_REPLAYED) >= 4:
            _REPLAYED.pop(next(iter(_REPLAYED)))
        _REPLAYED[key] = ReplayedWidths(taus, lookups, (
            f"replayed: {len(seqs)} held-out recorded responses, the lookup nodes that accept "
            f"the most{' and the datastore' if store is not None else ''}"))
    return _REPLAYED[key]


def distillation_data(art, opts: CalibrateOptions, progress: bool = True):
    """``((train feats, seqs, prompts), (held-out feats, seqs, prompts))``: the artifact's
    greedy outputs for the corpus's split prompts (replayed where ``opts.responses`` has them) with
    the hidden states that chose them, saved to ``opts.cache`` when it is set (the expensive
    part: :func:`load_cache` gives it back to re-train without re-generating)."""
    responses = (read_responses(opts.responses, art.config.vocab_size) if opts.responses
                 else None)
    train, held = split_prompts(opts, responses)
    if progress:
        print(f"[1/3] self-distillation data: {len(train)} training, {len(held)} held-out "
              "prompts", file=sys.stderr)
    data = (collect(art, train, opts.new_tokens, progress, responses),
            collect(art, held, opts.new_tokens, progress, responses))
    if opts.cache:  # renamed into place (calibrate_model checked the path first)
        with output_file(opts.cache) as tmp:
            np.savez(tmp, **{f"{part}_{kind}{i}": x
                             for part, arrays in zip(("tr", "ho"), data, strict=True)
                             for kind, xs in zip("hsp", arrays, strict=True)
                             for i, x in enumerate(xs)})
    return data


def calibrate(art, embed: np.ndarray, opts: CalibrateOptions, progress: bool = True,
              data=None, lm_head: np.ndarray | None = None):
    """Train Medusa heads on the artifact's own greedy outputs; returns MedusaHeads.

    ``embed`` is the model's token embedding and ``lm_head`` its LM head (None: tied), as
    the compiled draft reads them.

    ``data = ((train feats, seqs, prompts), (held-out feats, seqs, prompts))`` (from
    :func:`load_cache`) skips generation. The heads keep the training responses (the lookup
    draft's datastore) and the held-out prompts with their responses (to replay decoding
    over: :func:`heldout_sequences`); data saved without its prompts keeps none.
    """
    if data is None:
        data = distillation_data(art, opts, progress)
    (ftr, str_, _), (fho, sho, pho) = data
    xtr, rtr, ytr = make_targets(ftr, str_, opts.num_heads)
    xho, rho, yho = make_targets(fho, sho, opts.num_heads)
    if progress:
        print(f"[2/3] training {opts.num_heads} heads on {len(xtr)} rows", file=sys.stderr)
    # Early stopping on a validation slice of the training prompts (the held-out prompts stay
    # untouched for the statistics that build the trees).
    rows_per_prompt = np.cumsum([len(s) for s in str_])
    cut = int(np.searchsorted(rows_per_prompt, 0.9 * rows_per_prompt[-1]))
    cut_row = int(rows_per_prompt[cut]) if cut < len(rows_per_prompt) else len(xtr)
    roots = rtr if opts.condition_on_root else None
    vocab = (draft_vocabulary(str_, len(embed), opts.draft_vocab)
             if opts.draft_vocab and opts.draft_vocab < len(embed) else None)
    w, b, u = train_heads(
        xtr[:cut_row], ytr[:cut_row], embed, opts.num_heads, epochs=opts.epochs,
        seed=opts.seed, progress=progress, weight_decay=opts.weight_decay,
        soft=opts.soft, vocab=vocab, roots=None if roots is None else roots[:cut_row],
        cosine=opts.cosine, lm_head=lm_head,
        validation=(xtr[cut_row:], rtr[cut_row:], ytr[cut_row:]) if cut_row < len(xtr) else None)
    if progress:
        print(f"[3/3] held-out statistics on {len(xho)} rows", file=sys.stderr)
    heads = MedusaHeads(w, b, np.zeros((opts.num_heads, TOPK)), {}, None, u, vocab,
                        responses=[np.asarray(r) for r in str_],
                        heldout=None if pho is None else list(zip(pho, sho, strict=True)))
    heads.ranks = heldout_ranks(heads, xho, yho, embed, lm_head=lm_head,
                                roots=rho if opts.condition_on_root else None)
    heads.rank_probs = rank_statistics(heads.ranks)
    heads.info = {
        # a corpus file by its absolute path: `bench --prompts heldout` may run elsewhere
        "corpus": opts.corpus if opts.corpus in CORPORA else os.path.abspath(opts.corpus),
        "seed": opts.seed, "epochs": opts.epochs, "dtype": opts.dtype,
        # the split's options: `bench --prompts heldout` redraws the same held-out prompts
        "held_out": opts.held_out, "max_prompts": opts.max_prompts,
        "lr_schedule": "cosine" if opts.cosine else "constant",
        "new_tokens": opts.new_tokens, "train_rows": int(len(xtr)), "held_out_rows": int(len(xho)),
        "train_prompts": len(str_), "held_out_prompts": len(sho),
        "condition_on_root": bool(opts.condition_on_root),
        "soft": opts.soft, "draft_vocab": 0 if vocab is None else len(vocab),
        "responses": opts.responses and os.path.basename(opts.responses),
        "recorded_only": bool(opts.responses and opts.recorded_only),
        "topk_accuracy": np.cumsum(heads.rank_probs, axis=1).tolist(),
        "tau": {str(wd): build_tree(heads.rank_probs, wd, heads.ranks).expected_accept_length
                for wd in WIDTHS},
    }
    return heads


def plot_statistics(heads: MedusaHeads, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    acc = np.cumsum(heads.rank_probs, axis=1)
    for k in range(heads.num_heads):
        a.plot(range(1, acc.shape[1] + 1), acc[k], marker="o", label=f"head {k + 1} (t+{k + 2})")
    a.set_xlabel("top-k")
    a.set_ylabel("held-out accuracy")
    a.legend()
    a.grid(alpha=0.3)
    ws = list(WIDTHS)
    b.plot(ws, [build_tree(heads.rank_probs, w, heads.ranks).expected_accept_length
                for w in ws], marker="o")
    b.set_xscale("log", base=2)
    b.set_xlabel("tree width W")
    b.set_ylabel("expected accepted tokens per step")
    b.grid(alpha=0.3)
    fig.suptitle("Medusa heads: held-out statistics")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PLOT_METADATA)
    plt.close(fig)


def is_heads_file(path: str) -> bool:
    """True when ``path`` holds Medusa heads (a file `hetcomp calibrate` wrote)."""
    try:
        return MedusaHeads.load(path) is not None
    except HetcompError:
        return False


def calibrate_model(model: str, opts: CalibrateOptions, output: str, reuse: str | None = None,
                    force: bool = False) -> dict:
    """`hetcomp calibrate`: compile ``model`` with a teacher-forcing verify, train heads on its
    greedy outputs (or on data saved by ``--cache``: ``reuse``) and write ``output`` (.npz)
    and its statistics plot beside it. Returns a summary."""
    if reuse and opts.cache:
        raise HetcompError("--reuse trains on saved data; --cache saves new data: pick one")
    out = output if output.endswith(".npz") else output + ".npz"
    check_output(out, is_heads_file, "Medusa heads file", force)
    check_output(out[:-4] + ".png", is_plot, "hetcomp plot", force)  # the plot beside it
    if opts.cache:  # numpy's savez names it so; like any output, it replaces only its kind
        opts = dataclasses.replace(opts, cache=opts.cache if opts.cache.endswith(".npz")
                                   else opts.cache + ".npz")
        if os.path.abspath(opts.cache) in (os.path.abspath(out),
                                           os.path.abspath(out[:-4] + ".png")):
            raise HetcompError("--cache and -o name the same file")
        check_output_file(opts.cache, is_calibration_data, "calibration data file", force)
    data = load_cache(reuse) if reuse else None
    split = None
    if data is None:  # the corpus, responses and split, before a compile's worth of work
        split = split_prompts(opts, read_responses(opts.responses) if opts.responses else None)
    loaded = load_model(model)
    if data is None:  # both parts need a prompt whose generation fits the context
        tok, context = TokenizerInfo.from_spec(loaded[2]), loaded[0].max_context
        if not all(any(fits(len(prompt_ids(tok, p)), opts.new_tokens, context) for p in part)
                   for part in split):
            raise HetcompError(_none_fit(context, opts.new_tokens))
        if opts.responses:  # read again, now that the vocabulary their ids must lie in is known
            read_responses(opts.responses, loaded[0].vocab_size)
    if data is not None:  # the saved data replaces the compiled model's run
        check_calibration_data(data, loaded[0], reuse)
        heads = calibrate(None, loaded[1]["embed"], opts, data=data,
                          lm_head=loaded[1].get("lm_head"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            compile_model(CompileOptions(model=model, dtype=opts.dtype,
                                         verify_widths=(TEACHER_CHUNK,)),
                          f"{tmp}/art", weights=loaded)
            heads = calibrate(load_artifact(f"{tmp}/art"), loaded[1]["embed"], opts,
                              lm_head=loaded[1].get("lm_head"))
    heads.save(out)
    with output_file(out[:-4] + ".png", is_plot, "hetcomp plot", force) as tmp:
        plot_statistics(heads, tmp)
    tau = heads.info["tau"]
    return {"heads": out, "plot": out[:-4] + ".png",
            "topk_accuracy_top1": [round(a[0], 4) for a in heads.info["topk_accuracy"]],
            "tau": {k: round(v, 3) for k, v in tau.items()}}
