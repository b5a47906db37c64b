"""``hetcomp bench``: decode speed per width on fixed or held-out prompts, interleaved, with
the bandwidth roofline, per-unit busy time and the slowest kernels of a verify step."""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

from ..artifact_format import PLOT_METADATA, check_output_file, is_plot, output_file
from ..errors import HetcompError
from ..hardware import cpu_threads
from ..profile.bandwidth import measure_read_bandwidth
from ..runtime import generate, load_artifact
from ..runtime.generate import check_context, default_lookup, what_widths
from ..runtime.unit_time import gc_paused, kernel_breakdown, peak_rss_mb, step_breakdown
from ..runtime.weights import recorded_heads
from ..speculative.acceptance import replay_acceptance
from ..speculative.medusa import MedusaHeads
from .calibrate import heldout_prompts, heldout_sequences

BENCH_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, in simple terms.",
    "What should I pack for a weekend hiking trip?",
]
PROMPT_SETS = ("bench", "heldout")


def bench_prompts(manifest: dict, which: str = "bench") -> list[str]:
    """The prompts `hetcomp bench` decodes: ``bench`` (:data:`BENCH_PROMPTS`) or ``heldout``
    (the first 8 held-out prompts of the calibration that made the heads of the artifact
    whose ``manifest`` is given)."""
    _check_prompt_set(which)
    if which == "bench":
        return list(BENCH_PROMPTS)
    info = (manifest.get("speculative") or {}).get("heads_info")
    if not info or "corpus" not in info:
        raise HetcompError("--prompts heldout needs an artifact compiled with calibrated heads")
    return heldout_prompts(info)


def _check_prompt_set(which: str) -> None:
    """Refuse a prompt set other than :data:`PROMPT_SETS` (the API takes any string; a typo
    must not decode the held-out prompts instead)."""
    if which not in PROMPT_SETS:
        raise HetcompError(f"--prompts must be {' or '.join(PROMPT_SETS)}, not {which!r}")


def encode_prompts(art, texts: list[str], new_tokens: int, what: str) -> list[list[int]]:
    """``texts`` as token ids (with the chat template where the artifact has one), each
    checked to fit the context with ``new_tokens`` (named ``what`` 1, 2, ... in the refusal),
    so that a long prompt is refused before any decoding rather than after the others."""
    chat = art.tokenizer.chat_template is not None  # tiny test models have none
    encoded = [art.tokenizer.encode(t, chat=chat) for t in texts]
    for i, ids in enumerate(encoded, 1):
        check_context(art, len(ids), new_tokens, f"{what} {i}", "--new-tokens")
    return encoded


def bench_widths(art, widths, new_tokens: int, lookup: int | None,
                 prompts: list[str] = BENCH_PROMPTS, rounds: int = 1,
                 datastore: bool = True) -> list[dict]:
    """Per width: tokens/s over the prompts, accepted tokens per step, step time
    (``datastore=False``: the lookup draft searches the context only).

    Widths are interleaved: every prompt (in every round) runs at each width in turn, so a
    slow phase of a shared machine lands on all widths alike instead of on a few of them.
    """
    widths = list(dict.fromkeys(widths))  # each once (a width named twice: one row)
    encoded = encode_prompts(art, prompts, new_tokens, "prompt")
    # A step drafts at most W - 1 nodes by lookup (the root is the model's own choice), as
    # Generation clamps it: the rows report what was used.
    lookups = {w: min(default_lookup(art, w) if lookup is None else lookup, w - 1)
               for w in widths}
    for w in widths:
        generate(art, encoded[0], max_new_tokens=min(8, new_tokens), stop_at_eos=False,
                 width=w, lookup=lookups[w], datastore=datastore)  # warm-up
    made = dict.fromkeys(widths, 0)
    secs = dict.fromkeys(widths, 0.0)
    steps = dict.fromkeys(widths, 0)
    times: dict = {w: [] for w in widths}
    for r in range(rounds):
        with gc_paused():  # (a round at a time: a collection between rounds is not timed)
            for ids in encoded:
                for w in widths:
                    res = generate(art, ids, max_new_tokens=new_tokens, stop_at_eos=False,
                                   width=w, step_times=times[w], lookup=lookups[w],
                                   datastore=datastore)
                    made[w] += len(res.ids) - 1
                    secs[w] += res.decode_s
                    steps[w] += res.steps
        if rounds > 1:
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    replayed = replayed_steps(art, encoded, new_tokens, lookups, datastore)
    rows = []
    for w in widths:
        tree = art.trees.get(w)
        rows.append({
            "width": w,
            "tokens_per_s": made[w] / secs[w],
            "accepted_per_step": made[w] / steps[w],
            "expected_accepted_per_step": tree.expected_accept_length if tree else 1.0,
            # the same decodes replayed over the prompts' recorded responses (None: no record)
            "replayed_accepted_per_step": replayed and (
                sum(r.tokens for r in replayed[w]) / sum(r.steps for r in replayed[w])),
            "step_ms": 1e3 * statistics.median(times[w]),
            "lookup": lookups[w],
            # whether the lookup also searched the artifact's datastore
            "datastore": bool(datastore and lookups[w] and art.datastore is not None),
        })
        again = rows[-1]["replayed_accepted_per_step"]
        print(f"  W={w:3d}  {rows[-1]['tokens_per_s']:6.1f} tokens/s  "
              f"{rows[-1]['accepted_per_step']:.2f} accepted/step"
              + (f" (replayed {again:.2f})" if again else "") + "  "
              f"{rows[-1]['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)
    return rows


def replayed_steps(art, prompts: list[list[int]], new_tokens: int, lookups: dict,
                   datastore: bool = True) -> dict | None:
    """Per width (``lookups``: its lookup nodes), each prompt's greedy decode of
    ``new_tokens`` tokens, EOS ignored, replayed over its recorded response
    (:func:`~hetcomp.speculative.acceptance.replay_acceptance`: a ``Replayed`` per prompt):
    what the steps accept where the compiled draft proposes what calibration measured, the
    steps of the decode itself on a CPU. None unless ``prompts`` are the first held-out
    prompts of the artifact's heads (the package's, or the file it was compiled from, found
    here: :func:`~hetcomp.runtime.weights.recorded_heads`), each with a recorded response of
    at least ``new_tokens`` tokens."""
    path = recorded_heads(art.manifest)
    if path is None:
        return None
    heads = MedusaHeads.load(path)
    held = heldout_sequences(heads, art.tokenizer, art.config.vocab_size)
    if held is None:
        return None
    seqs = held[: len(prompts)]
    if ([list(p) for p, _ in seqs] != [list(p) for p in prompts]
            or any(len(r) < new_tokens for _, r in seqs)):
        return None
    starts = np.cumsum([0] + [len(r) for _, r in held])  # each response's first row
    store = art.datastore if datastore else None
    return {w: [replay_acceptance([(p, r[:new_tokens])],
                                  heads.ranks[starts[i]: starts[i] + new_tokens], art.tree, w,
                                  lookup, store)
                for i, (p, r) in enumerate(seqs)]
            for w, lookup in lookups.items()}


def decoded_and_replayed(art, heads: MedusaHeads, width: int, lookup: int, new_tokens: int,
                         count: int) -> list[tuple[list[int], list[int]] | None]:
    """For each of the first ``count`` held-out prompts of ``heads`` (the heads ``art`` was
    compiled with: :func:`~hetcomp.driver.calibrate.heldout_sequences`), the tokens each step
    emits when ``art`` decodes it as `generate` does (EOS stops; ``width``, ``lookup`` lookup
    nodes, the datastore) and when the replay walks its recorded response, both over its
    first ``new_tokens`` tokens; None for a prompt whose decode leaves that response (the
    replay then describes another text)."""
    from ..runtime.generate import Generation

    seqs = heldout_sequences(heads, art.tokenizer, art.config.vocab_size)
    if seqs is None:
        raise HetcompError("these heads keep no held-out responses to replay")
    starts = np.cumsum([0] + [len(r) for _, r in seqs])  # each response's first row of ranks
    out: list = []
    for i, (prompt, response) in enumerate(seqs[:count]):
        gen = Generation(art, prompt, new_tokens, True, width, lookup=lookup)
        decoded = [len(new) for new in gen][1:]  # (the first: prefill's token)
        cut = response[:new_tokens]
        if gen.ids != cut:
            out.append(None)
            continue
        replay = replay_acceptance([(prompt, cut)], heads.ranks[starts[i]: starts[i] + len(cut)],
                                   art.tree, width, lookup, art.datastore)
        out.append((decoded, list(replay.per_step)))
    return out


def plot_widths(rows, path: str, title: str) -> None:
    """Tokens/s and accepted tokens per step against the tree width, as a PNG."""
    import matplotlib  # lazy: plotting is optional and slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [r["width"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(ws, [r["tokens_per_s"] for r in rows], marker="o", color="C0", label="tokens/s")
    pred = [(r["width"], r["predicted_tokens_per_s"]) for r in rows if "predicted_tokens_per_s" in r]
    if pred:
        ax.plot(*zip(*pred, strict=True), marker="x", ls="--", color="C0",
                label="predicted (plan)")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tree width W")
    ax.set_ylabel("decode tokens/s", color="C0")
    ax2 = ax.twinx()
    ax2.plot(ws, [r["accepted_per_step"] for r in rows], marker="s", color="C1",
             label="accepted/step (measured)")
    ax2.plot(ws, [r["expected_accepted_per_step"] for r in rows], ls="--", color="C1",
             label="accepted/step (expected: the trees)")
    if all(r.get("replayed_accepted_per_step") for r in rows):
        ax2.plot(ws, [r["replayed_accepted_per_step"] for r in rows], ls=":", marker="+",
                 color="C2", label="accepted/step (replayed)")
    ax2.set_ylabel("tokens per verify step", color="C1")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata=PLOT_METADATA)
    plt.close(fig)


def _breakdown_widths(art, widths) -> list[int]:
    """The widths the step breakdowns time, each once: those whose whole tree fits the
    context after one committed token. (Generation verifies a wider tree only shrunk to the
    room left; a breakdown times the compiled tree as it is.)"""
    return sorted(w for w in set(widths) if w < art.config.max_context)


def _breakdown_cache_len(art, widths) -> int:
    """The committed length the step breakdowns run after: 64, or less if the widest tree
    they time (:func:`_breakdown_widths`) would not fit the context after it."""
    return max(1, min(64, art.config.max_context - max(widths, default=1) - 1))


def _breakdowns(art, widths, breakdown):
    """``(width, breakdown(art, width, ...))`` for the widths whose tree fits the context,
    each after the same committed length (5 steps each)."""
    widths = _breakdown_widths(art, widths)
    cache_len = _breakdown_cache_len(art, widths)
    return [(w, breakdown(art, w, steps=5, cache_len=cache_len)) for w in widths]


def kernel_tables(art, widths, top: int) -> list[dict]:
    """Per width: the ``top`` kernels (and VM builtins) by synchronised time in one verify
    step, the timer's own ``timer_us`` a call taken off each call
    (hetcomp.runtime.unit_time.kernel_breakdown); widths whose tree does not fit the context
    are left out (:func:`_breakdown_widths`)."""
    return [{"width": w, "step_ms": 1e3 * b["step_s"], "timer_us": 1e6 * b["timer_s"], "top": [
                {"name": k, "ms": 1e3 * t, "calls": b["calls"][k]}
                for k, t in list(b["kernels"].items())[:top]]}
            for w, b in _breakdowns(art, widths, kernel_breakdown)]


def verify_steps(art, widths) -> list[dict]:
    """Per width: the verify step time and each unit's busy time (their sum is the step
    without overlap; see hetcomp.runtime.unit_time); widths whose tree does not fit the
    context are left out (:func:`_breakdown_widths`)."""
    return [{"width": w, "step_ms": 1e3 * b["step_s"], "serial_ms": 1e3 * b["serial_s"],
             "busy_ms": {u: 1e3 * t for u, t in b["busy_s"].items() if u != "host"}}
            for w, b in _breakdowns(art, widths, step_breakdown)]


def llama_bench(art, runs: int, prompt: int = 512, gen: int = 128) -> dict:
    """llama-bench's two numbers: ``pp{prompt}``, tokens/s prefilling a ``prompt``-token prompt
    (random ids, an empty cache), and ``tg{gen}``, tokens/s generating ``gen`` tokens one at a
    time (W = 1) after one token; the median of ``runs`` runs each. A context too short for
    the prompt leaves ``pp`` out."""
    ids = np.random.default_rng(0).integers(0, art.config.vocab_size, prompt).tolist()
    out = {}
    if prompt < art.config.max_context:
        art.new_session().prefill(ids[:8])  # warm-up
        times = []
        for _ in range(runs):
            sess = art.new_session()
            t0 = time.perf_counter()
            sess.prefill(ids)
            times.append(time.perf_counter() - t0)
        out[f"pp{prompt}"] = prompt / statistics.median(times)
    if gen + 1 < art.config.max_context:
        out[f"tg{gen}"] = statistics.median(
            generate(art, ids[:1], max_new_tokens=gen, stop_at_eos=False).decode_tokens_per_s
            for _ in range(runs))
    return out


def bench(artifact: str, widths: list[int] | None = None, runs: int = 5, new_tokens: int = 64,
          prompts: str = "bench", rounds: int = 1, lookup: int | None = None, kernels: int = 0,
          plot: str | None = None, verify: bool = True, datastore: bool = True) -> dict:
    """Benchmark the artifact at ``artifact``; returns the report `hetcomp bench` prints.

    llama-bench's ``pp512`` and ``tg128`` (:func:`llama_bench`), sequential decoding ``runs``
    times on the first bench prompt (median tokens/s, against the measured read bandwidth's
    roofline), the verify step per width, and with ``widths``
    every width on every prompt, interleaved (:func:`bench_widths`), plotted to ``plot``
    (default ``ARTIFACT/bench_widths.png``, unless a file there is not a plot of ours).
    W = 1 is always among the widths, first: the speedup is against it, in the same run.
    ``datastore=False``: the lookup draft leaves the artifact's datastore out.
    """
    if runs < 1 or rounds < 1 or kernels < 0:
        raise HetcompError("--runs and --rounds must be at least 1, --kernels at least 0")
    if new_tokens < 2:  # the first new token comes from the prompt: no decode step to time
        raise HetcompError("--new-tokens must be at least 2 (the first comes from the "
                           "prompt's prefill; decode speed is measured on the rest)")
    if lookup is not None and lookup < 0:
        raise HetcompError("--lookup must be at least 0")
    if widths is not None and (not widths or min(widths) < 1):
        raise HetcompError("--widths must be positive integers")
    _check_prompt_set(prompts)
    if widths:  # each width once, W = 1 first (the speedup's base, in the same interleaving)
        widths = list(dict.fromkeys([1, *widths]))
    plot_kind = (is_plot, "hetcomp plot")
    if plot is not None:  # before the long work: a plot replaces a plot of ours, no other file
        if not widths:
            raise HetcompError("--plot draws the widths' speeds: it needs --widths")
        if os.path.splitext(plot)[1].lower() != ".png":
            raise HetcompError(f"--plot writes a PNG: give a path ending in .png, not {plot}")
        check_output_file(plot, *plot_kind, force=True)
    art = load_artifact(artifact, verify=verify)
    if plot is None and widths:  # the default, in the artifact's folder: over a plot of ours only
        plot = os.path.join(art.path, "bench_widths.png")
        if os.path.lexists(plot) and not is_plot(plot):  # the user's: not asked to replace it
            print(f"note: {plot} is not a hetcomp plot: left as it is, no plot drawn "
                  "(--plot FILE.png draws one)", file=sys.stderr, flush=True)
            plot = None
        else:
            check_output_file(plot, *plot_kind, force=True)
    texts = bench_prompts(art.manifest, prompts)
    bad = [w for w in (widths or [1]) if w != 1 and w not in art.trees]
    if bad:
        raise HetcompError(f"widths {bad} are not in this artifact {what_widths(art)}")
    (ids,) = encode_prompts(art, BENCH_PROMPTS[:1], new_tokens, "bench prompt")
    if widths:  # every prompt the widths decode, before the long work
        encode_prompts(art, texts, new_tokens,
                       "held-out prompt" if prompts == "heldout" else "bench prompt")
    left_out = sorted(set(widths or [1]) - set(_breakdown_widths(art, widths or [1])))
    if left_out:
        print(f"note: the verify step breakdowns leave out W={','.join(map(str, left_out))}, "
              f"whose tree does not fit the context of {art.config.max_context} tokens after "
              "one committed token (generation shrinks it there)", file=sys.stderr, flush=True)
    generate(art, ids, max_new_tokens=min(8, new_tokens), stop_at_eos=False)  # warm-up
    with gc_paused():
        results = [generate(art, ids, max_new_tokens=new_tokens, stop_at_eos=False)
                   for _ in range(runs)]
    tps = statistics.median(r.decode_tokens_per_s for r in results)
    bw = measure_read_bandwidth()
    per_token = art.bytes_per_token()
    report = {
        "artifact": art.path,
        "dtype": art.dtype,
        "threads": cpu_threads(),
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "runs": runs,
        **llama_bench(art, runs),
        "decode_tokens_per_s": tps,
        "decode_tokens_per_s_all": [r.decode_tokens_per_s for r in results],
        "prefill_s": statistics.median(r.prefill_s for r in results),
        "weight_bytes_per_token": per_token,
        "memory_bandwidth_gb_s": bw,
        "roofline_tokens_per_s": bw * 1e9 / per_token,
        "roofline_fraction": tps * per_token / (bw * 1e9),
    }
    report["verify_steps"] = verify_steps(art, widths or [1])
    if kernels:
        report["kernels"] = kernel_tables(art, widths or [1], kernels)
    if widths:
        report["prompts"] = {"set": prompts, "count": len(texts)}
        rows = bench_widths(art, widths, new_tokens, lookup, texts, rounds, datastore)
        report["rounds"] = rounds
        predicted = art.manifest.get("plan_prediction") or {}
        for r in rows:
            if str(r["width"]) in predicted:
                r["predicted_tokens_per_s"] = predicted[str(r["width"])]["tokens_per_s"]
        best = max(rows, key=lambda r: r["tokens_per_s"])
        report["widths"] = rows
        report["best_width"] = best["width"]
        report["speedup_best_vs_w1"] = best["tokens_per_s"] / rows[0]["tokens_per_s"]  # W=1
        if plot is not None:
            with output_file(plot, *plot_kind, force=True) as tmp:
                plot_widths(rows, tmp, f"{art.manifest['model']} ({art.dtype}): speculative "
                            "decoding")
        report["plot"] = plot
    report["peak_rss_mb"] = peak_rss_mb()
    return report
