"""Which draft heads would raise acceptance: Medusa heads against heads that see more.

Every variant is trained the way `hetcomp calibrate` trains the packaged SmolLM2 heads (the
replayed recorded responses, 864 training prompts, hard targets mixed half and half with the
base model's distribution, over the 8192-token draft vocabulary, AdamW with a cosine decay,
zero-initialised so that each head starts as the LM head), here in PyTorch, and measured
on the 153 held-out prompts (28,485 rows): each head's top-1 and top-10 accuracy and the
expected accepted tokens per step (tau) of the best tree of W nodes under the measured
joint statistics (`build_tree(..., ranks)`, what `calibrate` puts in the heads file).

Head k predicts token t + 2 + k from the final hidden state h at t and the root r (the
token the base model chose at t):

- ``medusa``: ``h + SiLU(W_k h + U_k e(r) + b_k)`` (the packaged heads);
- ``parent``: plus ``P_k e(x_k)``, x_k the tree token at depth k on the node's path
  (Hydra's sequential dependence); the draft would then run one head after another, each
  on the previous depth's candidates;
- ``recurrent``: a state carried down the path, ``s_{k+1} = s_k + SiLU(W_k s_k + U_k e(r)
  + P_k e(x_k) + b_k)``, ``s_0 = h``;
- ``prev``: plus ``P_k h'``, h' the hidden state one position earlier;
- ``wide``: a two-layer MLP on ``[h, e(r)]`` (4E hidden units) instead of one linear;
- ``attn``: the ``medusa`` heads on ``h + Attn([h, e(r)])``, one causal self-attention layer
  (9 heads, ALiBi distances) over the rows of the same sequence, as EAGLE's draft layer
  attends to the earlier positions' features (a draft KV cache at run time);
- ``eagle``: EAGLE's draft itself (:func:`make_eagle`): one Llama decoder layer on
  ``FC([f, e(x)])`` that predicts the next feature, run depth after depth on its own
  output, trained unrolled as it runs (4.6 M parameters; the draft would run four passes of
  one layer and the LM head, one per depth, and keep its own KV cache).

Parents are teacher-forced (the true tokens): a node can only be accepted when its path is,
so that is the conditional that acceptance needs.

Measured here (2 epochs each, 4-8 minutes a variant on 2 cores, ``eagle`` 11; ``attn`` and
``eagle`` one sequence a batch), held-out top-1 per head and tau at W = 4 / 16 / 64:

    medusa     0.369 0.184 0.118 0.092   1.580 / 1.895 / 2.098
    parent     0.369 0.283 0.247 0.228   1.615 / 1.984 / 2.251
    recurrent  0.358 0.281 0.257 0.255   1.599 / 1.959 / 2.226
    prev       0.361 0.176 0.117 0.096   1.569 / 1.874 / 2.068
    wide       0.409 0.216 0.130 0.101   1.646 / 1.989 / 2.213
    attn       0.320 0.153 0.096 0.085   1.501 / 1.809 / 2.005
    eagle      0.279 0.253 0.235 0.232   1.492 / 1.838 / 2.097
    medusa, half the training prompts (--train-prompts 432, the same draft vocabulary):
               0.311 0.148 0.089 0.077   1.492 / 1.798 / 1.970

(``medusa`` reproduces the packaged heads, trained in numpy for 4 epochs: 0.369 0.183 0.106
0.087, 1.578 / 1.890 / 2.084.) Conditioning on the path lifts heads 2-4 on their own (0.18
-> 0.28) yet tau only by 5% at W = 16 and 7% at W = 64: the Medusa heads' successes were
already correlated (P(head 2 right | head 1 right) is 0.26 for ``medusa``, 0.36 for
``parent``), and every path starts at head 1, which sees no more than before; such heads
would also cost the draft three more passes over its LM head, one per depth, each waiting
for the last. A wider head 1 helps it directly (0.409) for 6x the heads' bytes (16 M
parameters, not 2.7 M). The previous position's state adds nothing, and this short run of a
one-layer attention draft is worse than the plain heads. What moves every head is data: half
the prompts lose 0.06 of head 1's top-1 and 0.10 of tau at W = 16. New prompts, that is:
continuing the training prompts' responses that stopped at 256 tokens to 512
(`record_responses.py --extend`, 119,655 tokens more, 72% more rows) and training as the
packaged heads were (`hetcomp calibrate ... --new-tokens 512 --epochs 3`) gave top-1 0.369
0.171 0.107 0.081 and tau 1.573 / 1.882 / 2.070 at W = 4 / 16 / 64, no better than the
packaged heads: 87% of those continuation tokens repeat the token that followed their
3-gram's previous occurrence (49% in the first 256), so they teach the heads the loops that
the n-gram lookup already drafts.

EAGLE's draft layer, with the attention over the earlier features that ``attn`` lacked and
its own drafted features at every depth, is no better at W = 64 (2.097; a run with 100 steps
of warm-up and the gradient clipped to norm 1, which the loop here has for no variant: top-1
0.316 0.276 0.262 0.254, tau 1.543 / 1.904 / 2.181). Like ``parent`` its deeper depths hold
up (0.25 against 0.09), but its first depth is worse than a Medusa head: a draft of 4.6 M
parameters learns no more from 165K training rows. Drafts that see more are not what this
data supports; drafting from the model's own responses is (`hetcomp compile --datastore`:
2.558 -> 2.880 accepted tokens a step at W = 64 on the held-out prompts).

Usage::

    .venv/bin/python benchmarks/draft_heads.py [--cache DATA.npz] [--variants medusa,parent]
        [--epochs 2] [--json OUT.json] [--plot OUT.png]

``--cache``: the data `hetcomp calibrate --cache` saves; made here first when the file is
absent (compiles SmolLM2 float32 and replays the 1017 recorded responses, ~10 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HEADS = 4
TOP = 10
SOFT = 0.5
VARIANTS = ("medusa", "parent", "recurrent", "prev", "wide", "attn", "eagle")
#: The variants trained one whole sequence a batch (their rows attend to earlier rows).
SEQUENCE_VARIANTS = ("attn", "eagle")


def replayed_data(path: str):
    """The packaged heads' training data: replayed now and saved to ``path`` unless there."""
    from hetcomp.driver.calibrate import (
        TEACHER_CHUNK,
        CalibrateOptions,
        distillation_data,
        load_cache,
    )
    from hetcomp.driver.compile import CompileOptions, compile_model
    from hetcomp.frontend import load_model
    from hetcomp.runtime import load_artifact

    if not os.path.exists(path):
        opts = CalibrateOptions(corpus="chat", new_tokens=256, cache=path, recorded_only=True,
                                responses="hetcomp/data/smollm2-responses.jsonl.gz")
        with tempfile.TemporaryDirectory() as tmp:
            compile_model(CompileOptions(model="smollm2", verify_widths=(TEACHER_CHUNK,)),
                          f"{tmp}/art", weights=load_model("smollm2"))
            distillation_data(load_artifact(f"{tmp}/art"), opts)
    return load_cache(path)


def previous_rows(x: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each row's predecessor within its prompt (``starts``: the prompts' first rows, which
    are their own predecessors)."""
    prev = np.roll(x, 1, 0)
    prev[starts] = x[starts]
    return prev


def make_heads(torch, variant: str, e: int):
    nn, silu = torch.nn, torch.nn.functional.silu

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            def zeros():
                return nn.Parameter(torch.zeros(HEADS, e, e))
            self.w, self.u, self.b = zeros(), zeros(), nn.Parameter(torch.zeros(HEADS, e))
            if variant in ("parent", "recurrent", "prev"):
                self.p = zeros()
            if variant == "attn":
                self.fc = nn.Parameter(torch.randn(e, 2 * e) * (2 * e) ** -0.5)
                self.qkv = nn.Parameter(torch.randn(3 * e, e) * e ** -0.5)
                self.o = nn.Parameter(torch.zeros(e, e))
            if variant == "wide":
                self.w1 = nn.Parameter(torch.randn(HEADS, 4 * e, 2 * e) * (2 * e) ** -0.5)
                self.b1 = nn.Parameter(torch.zeros(HEADS, 4 * e))
                self.w2 = nn.Parameter(torch.zeros(HEADS, e, 4 * e))

        def forward(self, h, path_emb, prev):
            """``[K, N, E]`` head states; ``path_emb[:, k]`` the embedding of the path's token
            at depth k (0: the root), ``prev`` the rows one position earlier."""
            if variant == "attn":  # rows are one sequence, in order
                n, nh = len(h), 9
                a = torch.cat([h, path_emb[:, 0]], 1) @ self.fc.T
                q, k_, v = (t.reshape(n, nh, -1).transpose(0, 1)
                            for t in (a @ self.qkv.T).chunk(3, -1))
                pos = torch.arange(n)
                dist = (pos[:, None] - pos[None, :]).float()
                slopes = 2.0 ** (-8 * torch.arange(1, nh + 1) / nh)
                bias = torch.where(dist >= 0, -slopes[:, None, None] * dist, -torch.inf)
                att = torch.softmax(q @ k_.transpose(1, 2) / q.shape[-1] ** 0.5 + bias, -1)
                h = h + (att @ v).transpose(0, 1).reshape(n, e) @ self.o.T
            outs, s = [], h
            for k in range(HEADS):
                root = path_emb[:, 0]
                if variant == "wide":
                    a = silu(torch.cat([h, root], 1) @ self.w1[k].T + self.b1[k])
                    outs.append(h + a @ self.w2[k].T)
                    continue
                base = s if variant == "recurrent" else h
                z = base @ self.w[k].T + root @ self.u[k].T + self.b[k]
                if variant == "recurrent" or (variant == "parent" and k > 0):
                    z = z + path_emb[:, k] @ self.p[k].T
                if variant == "prev":
                    z = z + prev @ self.p[k].T
                s = base + silu(z)
                outs.append(s)
            return torch.stack(outs)

    return Heads()


def make_eagle(torch, e: int, heads: int = 9, inter: int = 1536, theta: float = 10000.0):
    """EAGLE's draft (Li et al. 2024): ``z = FC([f, e(x)])`` then one Llama decoder layer
    (RMSNorm, 9-head causal attention with RoPE, SwiGLU MLP) whose output is the next
    position's feature, autoregressive in it: depth k's input is depth k - 1's output and
    the path's token at depth k. Trained unrolled over the depths as it runs (HASS, Zhang et
    al. 2024): depth k's query for anchor t sees the true features' keys up to t and the
    drafted keys of depths 1..k after it, never a later true feature. ``FC`` starts as the
    identity on ``f`` and the layer's output projections at zero, so the draft starts as
    the LM head's own guess, as the Medusa heads do. ``forward`` returns ``[K, N, E]``
    aligned by anchor (row t: the draft started at row t), what the shared loop expects."""
    nn, silu = torch.nn, torch.nn.functional.silu
    hd = e // heads

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def rope(x, pos):  # [n, heads, hd]
        ang = pos[:, None].float() * theta ** (-torch.arange(0, hd, 2).float() / hd)
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return torch.cat([a * c - b * s, a * s + b * c], -1)

    class Eagle(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2 * e, e)
            with torch.no_grad():
                self.fc.weight.zero_()
                self.fc.weight[:, :e] = torch.eye(e)
                self.fc.bias.zero_()
            self.n1, self.n2 = nn.Parameter(torch.ones(e)), nn.Parameter(torch.ones(e))
            self.q, self.k, self.v, self.o = (nn.Linear(e, e, bias=False) for _ in range(4))
            self.gate, self.up = nn.Linear(e, inter, bias=False), nn.Linear(e, inter, bias=False)
            self.down = nn.Linear(inter, e, bias=False)
            nn.init.zeros_(self.o.weight)
            nn.init.zeros_(self.down.weight)

        def forward(self, h, path_emb, prev):
            n = len(h)
            pos = torch.arange(n)
            outs, keys, vals, feat = [], [], [], h
            for d in range(HEADS):  # row i of depth d: the draft started at row i - d
                if d:
                    feat = torch.cat([torch.zeros(1, e), outs[-1][:-1]])
                # the path's token at depth d of the draft from row i - d is the root of row i
                z = self.fc(torch.cat([feat, path_emb[:, 0]], 1))
                x = rms(z, self.n1)
                q = rope(self.q(x).view(n, heads, hd), pos)
                keys.append(rope(self.k(x).view(n, heads, hd), pos))
                vals.append(self.v(x).view(n, heads, hd))
                scores = [torch.einsum("ihd,jhd->hij", q, keys[0]).masked_fill(
                    (pos[None, :] > pos[:, None] - d)[None], -torch.inf)]
                drafted = []
                for m in range(1, d + 1):  # depth m's key, at row i - d + m
                    km, vm = (torch.roll(t, d - m, 0) for t in (keys[m], vals[m]))
                    sc = (q * km).sum(-1).T.clone()
                    sc[:, : d - m] = -torch.inf
                    scores.append(sc[..., None])
                    drafted.append(vm)
                att = torch.softmax(torch.cat(scores, -1) / hd ** 0.5, -1)
                out = torch.einsum("hij,jhd->ihd", att[..., :n], vals[0])
                for m, vm in enumerate(drafted):
                    out = out + att[..., n + m].T[..., None] * vm
                z = z + self.o(out.reshape(n, e))
                y = rms(z, self.n2)
                outs.append(z + self.down(silu(self.gate(y)) * self.up(y)))
            # by anchor: row t of depth d is row t + d (zeros past the sequence's end)
            return torch.stack([torch.cat([o[d:], torch.zeros(d, e)]) for d, o in
                                enumerate(outs)])

    return Eagle()


def run_variant(torch, variant, data, embed, lm, epochs: int, seed: int = 0) -> dict:
    """Train one variant; its held-out top-k accuracies, ranks and taus."""
    from hetcomp.speculative.medusa import rank_statistics
    from hetcomp.speculative.tree import build_tree

    torch.manual_seed(seed)
    (xtr, ptr, prtr, _, ytr_d, btr), (xho, pho, prho, yho, yho_d, bho) = data
    model = (make_eagle(torch, xtr.shape[1]) if variant == "eagle"
             else make_heads(torch, variant, xtr.shape[1]))
    emb, lm_t = torch.from_numpy(embed), torch.from_numpy(lm)
    x, p, pr, y = (torch.from_numpy(a) for a in (xtr, ptr, prtr, ytr_d))
    n, batch = len(xtr), 256

    def batches(bounds, rows, shuffle):
        """Row index batches: random rows, or (``attn``, ``eagle``) one whole sequence each."""
        if variant in SEQUENCE_VARIANTS:
            for i in (torch.randperm(len(bounds) - 1) if shuffle else range(len(bounds) - 1)):
                yield torch.arange(int(bounds[i]), int(bounds[i + 1]))
        else:
            order = torch.randperm(rows) if shuffle else torch.arange(rows)
            for s in range(0, rows, batch):
                yield order[s: s + batch]

    steps = epochs * (len(btr) - 1 if variant in SEQUENCE_VARIANTS else -(-n // batch))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    t0, step = time.time(), 0
    for epoch in range(epochs):
        for i, idx in enumerate(batches(btr, n, True)):
            hk = model(x[idx], emb[p[idx].clamp(min=0)], pr[idx])
            loss = 0
            for k in range(HEADS):
                t = y[idx, k]
                keep = t >= 0
                if not keep.any():
                    continue
                logp = torch.log_softmax(hk[k][keep] @ lm_t.T, -1)
                with torch.no_grad():  # the base model's distribution over the target
                    teacher = torch.softmax(x[(idx[keep] + 1 + k).clamp(max=n - 1)] @ lm_t.T, -1)
                hard = -logp.gather(1, t[keep][:, None]).mean()
                loss = loss + (1 - SOFT) * hard - SOFT * (teacher * logp).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                print(f"\r  {variant}: epoch {epoch + 1}/{epochs} step {i + 1}/{steps // epochs} "
                      f"loss {loss.item() / HEADS:.3f} ({time.time() - t0:.0f} s)",
                      end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    ranks = np.full(yho.shape, -1, np.int8)
    with torch.no_grad():
        for idx in batches(bho, len(xho), False):
            sl = idx.numpy()
            hk = model(torch.from_numpy(xho[sl]), emb[torch.from_numpy(pho[sl]).clamp(min=0)],
                       torch.from_numpy(prho[sl]))
            for k in range(HEADS):
                top = torch.topk(hk[k] @ lm_t.T, TOP, -1).indices.numpy()
                hit = top == yho_d[sl, k][:, None]
                r = np.where(hit.any(1), hit.argmax(1), TOP)
                ranks[sl, k] = np.where(yho[sl, k] >= 0, r, -1)
    probs = rank_statistics(ranks, TOP)
    both = ranks[(ranks[:, :2] >= 0).all(1)]
    first = both[:, 0] == 0
    return {"top1": probs[:, 0].round(4).tolist(), "top10": probs.sum(1).round(4).tolist(),
            "p_head2_given_head1": round(float((first & (both[:, 1] == 0)).sum()
                                               / max(first.sum(), 1)), 4),
            "tau": {w: round(build_tree(probs, w, ranks).expected_accept_length, 4)
                    for w in (2, 4, 8, 16, 32, 64)}}


def plot(results: dict, path: str, prompts: int) -> None:
    """Top-1 per head and tau against W for each variant (``results`` as ``--json`` writes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for v, r in results.items():
        a.plot(range(1, HEADS + 1), r["top1"], marker="o", label=v)
        ws = sorted(r["tau"], key=int)
        b.plot([int(w) for w in ws], [r["tau"][w] for w in ws], marker="o", label=v)
    a.set_xlabel("head (predicts token t + 1 + head)")
    a.set_ylabel("held-out top-1 accuracy")
    a.set_xticks(range(1, HEADS + 1))
    b.set_xscale("log", base=2)
    b.set_xlabel("tree width W")
    b.set_ylabel("expected accepted tokens per step")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"SmolLM2 draft heads: what conditioning buys ({prompts} held-out prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="build/draft_heads_data.npz")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--train-prompts", type=int, default=0,
                    help="train on the first N training prompts only (0: all): how acceptance "
                         "grows with data")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if not set(variants) <= set(VARIANTS):
        print(f"draft_heads: --variants from {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    import torch

    from hetcomp.driver.calibrate import make_targets
    from hetcomp.frontend import load_model
    from hetcomp.speculative.medusa import _restrict, draft_vocabulary

    (ftr, str_, _), (fho, sho, _) = replayed_data(args.cache)
    embed = load_model("smollm2")[1]["embed"].astype(np.float32)
    # The draft vocabulary of all training prompts, also with --train-prompts: fewer rows
    # for the heads, the same vocabulary.
    vocab = draft_vocabulary(str_, len(embed), 8192)
    if args.train_prompts:
        ftr, str_ = ftr[: args.train_prompts], str_[: args.train_prompts]
    lm = np.ascontiguousarray(embed[vocab])
    parts = []
    for feats, seqs in ((ftr, str_), (fho, sho)):
        x, roots, y = make_targets(feats, seqs, HEADS)
        path = np.concatenate([roots[:, None], y[:, :HEADS - 1]], 1)  # depth-k tokens
        bounds = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
        parts.append((x, path, previous_rows(x, bounds[:-1]), y,
                      _restrict(embed, y, vocab)[1], bounds))
    results = {}
    for v in variants:
        results[v] = run_variant(torch, v, parts, embed, lm, args.epochs)
        r = results[v]
        print(f"{v:10s} top-1 {' '.join(f'{a:.3f}' for a in r['top1'])}  tau W=4/16/64 "
              f"{r['tau'][4]:.3f} / {r['tau'][16]:.3f} / {r['tau'][64]:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.plot:
        plot(results, args.plot, len(sho))
    return 0


if __name__ == "__main__":
    sys.exit(main())
