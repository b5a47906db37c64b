"""On the CUDA host, with the TVM runtime only: profile the kit, run the artifacts.

    python run.py profile BUNDLE OUT [UNIT ...]
                                         ARCA kit -> OUT/profile.sqlite (the units named,
                                         else cpu and cuda)
    python run.py run BUNDLE OUT [NAME ...]
                                         PyTorch eager bfloat16 on the GPU first (eager.py,
                                         where torch sees one), then attach weights; per
                                         artifact (measure_artifact): greedy output on the
                                         held-out prompts at W = 1, 2, 4, 8, 16, 64 (identical?),
                                         decode tokens/s, verify step time at W = 1, 4, 16,
                                         64, per-unit and per-kernel time
                                         -> OUT/results.json (rewritten after each artifact;
                                         another weight format's artifacts, gpu-q4_1 and
                                         cpu-q4_1: OUT/results-q4_1.json); last, the
                                         issue's ratios on stderr
    python run.py gemv KIT OUT [--dry]   every linear kernel variant of benchmarks/
                                         gemv_kernels.py's kit (KIT/gemv) at W = 1, 4,
                                         16, 64: hot (back to back, device timer) and
                                         cold (rotated weight copies) time per call;
                                         tree_attention with one group and with the
                                         default groups at W = 1, 4, 16, 64 over three
                                         cache lengths; the draft's top-k (ours, TVM's
                                         sort); the fused norm/linear/SiLU kernels
                                         against the kernels they replace
                                         -> OUT/gemv.json; --dry (no GPU):
                                         check the kit and make the arguments on the CPU
    python run.py generate BUNDLE OUT WORKERS SECONDS
                                         greedy responses to the bundle's prompts.json
                                         (calibration data, bundle.py --generate) from
                                         WORKERS processes of 2 threads each, stopped
                                         after SECONDS -> OUT/responses-*.jsonl

BUNDLE is what bundle.py wrote (its ``a`` folder; ``b``, ``c``, ... beside it hold the GGUF's
later parts, which arrive with later calls).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

T0 = time.time()
GEN_WIDTHS = (1, 2, 4, 8, 16, 64)  # generation on the held-out prompts
STEP_WIDTHS = (1, 4, 16, 64)  # verify step time (issue #19: W = 64 should cost little more)
BREAKDOWN_WIDTHS = (1, 2, 8)  # per-unit and per-kernel time (report.py)
NEW_TOKENS = 48


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def profile(bundle: str, out: str, units: list[str]) -> None:
    from hetcomp.driver.profiling import profile_command

    summary = profile_command(units=units or ["cpu", "cuda"], out=os.path.join(out, "profile.sqlite"),
                              kit=os.path.join(bundle, "kit"), progress=say)
    with open(os.path.join(out, "profile-summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)


def _gguf(bundle: str) -> str:
    path = os.path.join(bundle, "..", "gguf")
    meta = json.load(open(os.path.join(bundle, "bundle.json")))
    if not os.path.isfile(path):
        # Part i in folder "abcdefgh"[i] beside the bundle (bundle.py: one folder a call).
        parts = [os.path.join(bundle, "..", "abcdefgh"[i], f"gguf.part{i}")
                 for i in range(int(meta.get("gguf_parts", 2)))]
        missing = [p for p in parts if not os.path.isfile(p)]
        if missing:
            raise SystemExit(f"GGUF parts not here yet: {', '.join(missing)} (carry them)")
        with open(path + ".tmp", "wb") as fh:
            for part in parts:
                with open(part, "rb") as src:
                    fh.write(src.read())
        os.replace(path + ".tmp", path)
    with open(path, "rb") as fh:
        if hashlib.sha256(fh.read()).hexdigest() != meta["gguf_sha256"]:
            raise SystemExit("reassembled GGUF does not match its sha256")
    return path


def run(bundle: str, out: str, names: list[str]) -> None:
    from hetcomp.driver.benchmark import bench_prompts
    from hetcomp.errors import HetcompError
    from hetcomp.runtime import attach_weights, load_artifact

    gguf = _gguf(bundle)
    meta = json.load(open(os.path.join(bundle, "bundle.json")))
    touched = {}
    for name in names or meta["artifacts"]:
        # Results accumulate in a file per weight format (each file's first artifact is its
        # greedy reference), written after each artifact: a crash loses one artifact.
        path = results_path(out, meta, name)
        results = touched[path] = _results(path, out)
        art_dir = os.path.join(bundle, "art", name)
        if not os.path.isfile(os.path.join(art_dir, "params.bin")):  # else: a warm rerun
            say(f"{name}: attaching weights")
            attach_weights(art_dir, gguf, quiet=True)
        t = time.time()
        art = load_artifact(art_dir)  # checks params.bin against the manifest
        load_s = time.time() - t
        say(f"{name}: loaded in {load_s:.1f}s")
        try:
            which = "heldout"
            texts = bench_prompts(art.manifest, which)
        except HetcompError:  # heads without a calibration record (test models)
            which = "bench"
            texts = bench_prompts(art.manifest, which)
        chat = art.tokenizer.chat_template is not None
        r = measure_artifact(art, [art.tokenizer.encode(p, chat=chat) for p in texts],
                             results.get("reference"), GEN_WIDTHS, STEP_WIDTHS,
                             BREAKDOWN_WIDTHS, NEW_TOKENS)
        r["prompts"] = which
        r["load_s"] = load_s
        results.setdefault("reference", r["ids_w1"])
        results["artifacts"][name] = r
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)
        del art
    for path, results in touched.items():
        say(f"== {os.path.basename(path)}")
        _summary(results)


def results_path(out: str, meta: dict, name: str) -> str:
    """Where ``run`` keeps artifact ``name``'s results: ``results.json`` for the bundle's
    own weight format (the ``gpu`` artifact's: what report.py predicts from the profile),
    ``results-DTYPE.json`` for another."""
    dtypes = meta.get("dtypes", {})
    dtype = dtypes.get(name)
    if dtype is None or dtype == dtypes.get("gpu", dtype):
        return os.path.join(out, "results.json")
    return os.path.join(out, f"results-{dtype}.json")


def _results(path: str, out: str) -> dict:
    """A results file's contents so far, or a new one; with PyTorch eager's baseline
    (measured in the same run, issue #19: once, the main file's where it has one)."""
    if os.path.isfile(path):
        with open(path) as fh:
            results = json.load(fh)
    else:
        results = {"device": _device_info(), "artifacts": {}}
    if "eager" not in results:
        main = os.path.join(out, "results.json")
        if main != path and os.path.isfile(main):
            with open(main) as fh:
                results["eager"] = json.load(fh).get("eager") or _eager()
        else:
            results["eager"] = _eager()
        say(f"eager: {results['eager']}")
    return results


def measure_artifact(art, prompts: list[list[int]], reference: list | None = None,
                     gen_widths=GEN_WIDTHS, step_widths=STEP_WIDTHS,
                     breakdown_widths=BREAKDOWN_WIDTHS, new_tokens: int = NEW_TOKENS) -> dict:
    """One artifact: greedy decoding of ``prompts`` at each width (interleaved per prompt,
    after a warm-up at each width), whether every width's ids equal sequential decoding's
    (and ``reference``'s, the first artifact's), the verify step time at ``step_widths``,
    per-unit time at both, per-kernel time at ``breakdown_widths`` (a CUDA-graph artifact's
    graph is one call there: its kernels show in the ``-nograph`` build's), and the step split
    into VM calls, waits and host work at W = 1 and the fastest width."""
    import numpy as np

    from hetcomp.runtime import generate
    from hetcomp.runtime.generate import default_lookup
    from hetcomp.runtime.unit_time import (
        gc_paused,
        host_split,
        kernel_breakdown,
        step_breakdown,
    )

    r: dict = {"dtype": art.manifest.get("dtype"), "plan": art.manifest.get("plan"),
               "units": [u["name"] for u in art.manifest["units"]],
               "cuda_graph": art.manifest.get("cuda_graph"),
               "fixed_cache": art.fixed_cache,
               "fused_linears": art.manifest.get("fused_linears"),
               "launches": art.manifest.get("launches"),
               # what the lookup draft searched besides the context (None: the context only)
               "datastore": (art.manifest.get("speculative") or {}).get("datastore")}
    lookup = {w: default_lookup(art, w) for w in gen_widths}  # as `hetcomp bench` drafts
    for w in gen_widths:  # warm-up: loads, first captures
        generate(art, prompts[0], 8, stop_at_eos=False, width=w, lookup=lookup[w])
    runs: dict = {w: [] for w in gen_widths}
    with gc_paused():  # as eager.py times
        for ids in prompts:
            for w in gen_widths:
                runs[w].append(generate(art, ids, new_tokens, stop_at_eos=False, width=w,
                                        lookup=lookup[w]))
    outs = {w: [x.ids for x in runs[w]] for w in gen_widths}
    replayed = replayed_acceptance(art, prompts, new_tokens, gen_widths, lookup)
    for w in gen_widths:
        r[f"w{w}"] = {
            "tokens_per_s": float(np.mean([x.decode_tokens_per_s for x in runs[w]])),
            "accepted_per_step": float(np.mean([x.accepted_per_step for x in runs[w]])),
            # what the steps accept where the draft proposes what calibration measured
            "replayed_per_step": replayed and replayed[w],
            "identical_to_sequential": outs[w] == outs[gen_widths[0]]}
        if not r[f"w{w}"]["identical_to_sequential"]:
            r[f"w{w}"]["first_divergence"] = first_divergence(art, prompts, outs[w],
                                                              outs[gen_widths[0]])
        say(f"W={w} {r[f'w{w}']}")
    seq = r[f"w{gen_widths[0]}"]["tokens_per_s"]
    best = max(gen_widths, key=lambda w: r[f"w{w}"]["tokens_per_s"])
    r["speculative_speedup"] = {"width": best,
                                "x": r[f"w{best}"]["tokens_per_s"] / seq}
    r["ids_w1"] = outs[gen_widths[0]]
    r["text"] = art.tokenizer.decode(runs[gen_widths[0]][0].ids)
    r["identical_to_first_artifact"] = reference is None or r["ids_w1"] == reference
    if not r["identical_to_first_artifact"]:
        r["first_divergence"] = first_divergence(art, prompts, r["ids_w1"], reference)
        say(f"differs from the first artifact: {r['first_divergence']}")
    steps = {w: step_breakdown(art, w, steps=10, cache_len=64)
             for w in sorted({*step_widths, *breakdown_widths})}
    r["step_s"] = {str(w): steps[w]["step_s"] for w in step_widths}
    say(f"step ms {({w: round(1e3 * t, 3) for w, t in r['step_s'].items()})}")
    # Every timed step's busy time per unit: report.py predicts each (the W = 1, 4,
    # 16, 64 among them; until session 34 only W = 1, 2, 8 reached it).
    r["breakdown"] = [steps[w] for w in sorted(steps)]
    r["kernels"] = [kernel_breakdown(art, w, steps=10, cache_len=64) for w in breakdown_widths]
    # A step's time in the VM calls, in waiting for results, and on the host, at W = 1 and
    # the fastest width: what a GPU step's speculation gain is left after.
    split = [1] + ([best] if best != 1 else [])
    r["host_split"] = host_split(art, prompts[0], split, new_tokens)
    for row in r["host_split"]:
        say(f"W={row['width']} step {row['step_ms']} ms: VM {row['vm_ms']}, wait "
            f"{row['wait_ms']} ({row['reads_per_step']} reads), host {row['host_ms']}")
    return r


def replayed_acceptance(art, prompts: list[list[int]], new_tokens: int, widths,
                        lookup: dict) -> dict | None:
    """Accepted tokens a step at each width, the mean over ``prompts`` as
    :func:`measure_artifact` averages a decode's, replayed over their recorded responses
    (``hetcomp bench``'s :func:`~hetcomp.driver.benchmark.replayed_steps`): what the decode
    accepts where the compiled draft proposes what calibration measured (on this CPU the
    two agree step for step). None where the prompts are not the heads' held-out ones with
    a recorded response of ``new_tokens`` (the run ignores EOS; a replay stops there)."""
    from hetcomp.driver.benchmark import replayed_steps

    replayed = replayed_steps(art, prompts, new_tokens, {w: lookup[w] for w in widths})
    return replayed and {w: sum(r.tokens_per_step for r in runs) / len(runs)
                         for w, runs in replayed.items()}


def first_divergence(art, prompts: list[list[int]], ids: list[list[int]],
                     reference: list[list[int]]) -> dict | None:
    """Where greedy ``ids`` first leave ``reference`` (the same prompts, decoded by another
    artifact or width): the prompt, the position, both tokens, and this artifact's W = 1
    logits of both there, on the reference's context (equal to this one's up to there).
    A margin of a few thousandths of the logits' scale is a near-tie that float16 rounding
    or another summation order flips; a wide one is a wrong kernel, which the device
    session then knows without spending minutes on it."""
    import numpy as np

    for p, (prompt, own, ref) in enumerate(zip(prompts, ids, reference, strict=True)):
        i = next((k for k, (a, b) in enumerate(zip(own, ref)) if a != b), None)
        if i is None:
            if len(own) == len(ref):
                continue
            i = min(len(own), len(ref))  # one stopped early (EOS): no token to compare
            return {"prompt": p, "position": i, "lengths": [len(own), len(ref)]}
        ctx = list(prompt) + list(ref[:i])
        sess = art.new_session()
        if len(ctx) > 1:
            sess.prefill(ctx[:-1])
        _, _, logits = sess.verify(np.asarray(ctx[-1:], "int32"), np.asarray([len(ctx) - 1]),
                                   np.ones((1, 1), "int32"))
        row = logits.numpy()[0].astype(np.float64)
        top = np.argsort(row)[-2:][::-1]
        return {"prompt": p, "position": i, "token": int(own[i]),
                "reference_token": int(ref[i]),
                "logits": [round(float(row[own[i]]), 5), round(float(row[ref[i]]), 5)],
                "margin": round(float(row[own[i]] - row[ref[i]]), 5),
                "scale": round(float(row.max() - np.median(row)), 3),
                "top2": [[int(t), round(float(row[t]), 5)] for t in top]}
    return None


def _summary(results: dict) -> None:
    """The issue's ratios: sequential decoding against PyTorch eager, speculative against
    sequential, W = 64 against W = 1, and greedy identity."""
    eager = results.get("eager", {}).get("tokens_per_s")
    for name, r in results["artifacts"].items():
        seq = r["w1"]["tokens_per_s"]
        steps = r["step_s"]
        say(f"{name}: sequential {seq:.1f} tok/s"
            + (f" = {seq / eager:.2f}x eager" if eager else "")
            + f"; speculative {r['speculative_speedup']['x']:.2f}x at W="
            f"{r['speculative_speedup']['width']}; step W=64/W=1 "
            f"{steps['64'] / steps['1']:.2f}; identical "
            f"{all(r[k]['identical_to_sequential'] for k in r if k.startswith('w'))} / "
            f"{r['identical_to_first_artifact']}")
        widths = [k for k in r if k.startswith("w") and k[1:].isdigit()]
        if all(r[k].get("replayed_per_step") for k in widths):
            # 2x needs a step at W no slower than (tokens a step) / 2 steps at W = 1
            say(f"{name}: accepted a step measured / replayed: " + ", ".join(
                f"W={k[1:]} {r[k]['accepted_per_step']:.3f} / {r[k]['replayed_per_step']:.3f}"
                for k in widths) + "; 2x needs step W=64/W=1 <= "
                + (f"{r['w64']['replayed_per_step'] / 2:.2f}" if "w64" in r else "n/a"))
    # What fusing the norms and activations into the linears saves, and what the tensor
    # cores save (float16 linears at W = 16 and 64), step by step.
    gpu = results["artifacts"].get("gpu")
    for other in ("gpu-unfused", "gpu-notc"):
        if gpu and other in results["artifacts"]:
            steps = results["artifacts"][other]["step_s"]
            say(f"gpu step / {other} step: " + ", ".join(
                f"W={w} {gpu['step_s'][w] / steps[w]:.2f}" for w in gpu["step_s"]))


# Weight copies a cold gemv call rotates through: several times an H200's 50 MB L2, so every
# call streams its weight from DRAM, as each layer's does in a decode step.
GEMV_ROTATE_BYTES = 256 << 20


def _random_blocks(rng, shape, dtype: str):
    """Random quantized blocks in the kit's layout ``[N / B, K / 32, bytes, B]``: random
    quants under float16 scales (and q4_1 mins) of a model's size (~0.01). Random bytes
    there would be any half, 6e4 and NaN included, which no model has and which the
    tensor-core kernel's float16 terms of each weight cannot hold."""
    from hetcomp.quant_format import HEADER_BYTES

    host = rng.integers(0, 256, shape, dtype="uint8")
    halves = HEADER_BYTES[dtype] // 2
    bits = (rng.standard_normal((*shape[:2], halves, shape[3])) * 0.01).astype("<f2").view(
        "<u2")
    host[:, :, 0:2 * halves:2, :] = (bits & 0xFF).astype("uint8")  # little-endian
    host[:, :, 1:2 * halves:2, :] = (bits >> 8).astype("uint8")
    return host


def gemv(kit: str, out: str, dry: bool = False) -> dict:
    """Time each kernel of a gemv kit (``benchmarks/gemv_kernels.py build``), after checking
    its output (``max_rel_err``, ``correct``: against numpy for float weights, against the
    first variant of its shape for random quantized blocks): ``hot_us``,
    the median of TVM's device timer over back-to-back calls on one weight (L2-resident but
    for the LM head), and ``cold_us``, calls each on the next of enough weight copies to
    stream from DRAM, timed from Python (so bounded below by the launch cost, a few us).
    Everything is compiled already (``kcache`` holds the fatbin of the library's source):
    about 10 s of device time. ``dry``: check the kit and make every argument, on the CPU."""
    import numpy as np

    with open(os.path.join(kit, "kernels.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(kit, "kernels.cu")) as fh:
        source = fh.read()
    # The runtime hands the library's CUDA source to hetcomp._tvm's nvcc callback, which
    # finds the fatbin built with the kit under the source's hash.
    os.environ["HETCOMP_KERNEL_CACHE"] = os.path.join(kit, "kcache")
    os.environ["HETCOMP_CUDA_ARCH"] = meta["arch"]
    key = hashlib.sha256((meta["arch"] + source).encode()).hexdigest()[:24]
    if not os.path.isfile(os.path.join(kit, "kcache", key + ".fatbin")):
        raise SystemExit("the kit's fatbin does not match its CUDA source")
    with open(os.path.join(kit, "lib.so"), "rb") as fh:
        if source.encode() not in fh.read():
            raise SystemExit("lib.so does not hold kernels.cu")
    rng = np.random.default_rng(0)
    if dry:
        from hetcomp import _tvm
        dev, lib = _tvm.cpu(), None
    else:
        from hetcomp import _tvm
        dev = _tvm.device("cuda")
        lib = _tvm.load_module(os.path.join(kit, "lib.so"))
    results, copies, group, first_output = [], [], None, {}
    # Records sorted so that those sharing a weight (shape, dtype) share its copies.
    recs = sorted(meta["kernels"], key=lambda r: (r["dtype"], r["weight_shape"], r["w"]))
    for rec in recs:
        if f"{rec['name']}_kernel" not in source:
            raise SystemExit(f"{rec['name']}: not in the kit's CUDA source")
        if group != (rec["dtype"], rec["weight_shape"]):
            group = (rec["dtype"], rec["weight_shape"])
            wdtype = rec.get("weight_dtype", rec["dtype"])
            if wdtype == "uint8":  # quantized blocks: random ones time as real ones do
                host = _random_blocks(rng, rec["weight_shape"], rec["dtype"])
            else:
                host = rng.standard_normal(rec["weight_shape"]).astype(wdtype)
            count = 1 if dry else max(2, min(512, -(-GEMV_ROTATE_BYTES // host.nbytes)))
            copies = [_tvm.tensor(host, dev)]
            for _ in range(count - 1):
                copies.append(_tvm.runtime.empty(host.shape, host.dtype, dev))
                copies[0].copyto(copies[-1])
        w, n, k = rec["w"], rec["n"], rec["k"]
        # The same inputs for every variant of a shape: their outputs are compared.
        inputs = np.random.default_rng(n * 1_000_003 + k * 1009 + w)
        x_np = inputs.standard_normal((w, k)).astype("float32")
        res_np = inputs.standard_normal((w, n)).astype("float32") if rec["residual"] else None
        x = _tvm.tensor(x_np, dev)
        extra = [_tvm.tensor(res_np, dev)] if res_np is not None else []
        y = _tvm.tensor(np.zeros((w, n), "float32"), dev)
        r = {k2: rec[k2] for k2 in ("name", "kind", "n", "k", "w", "dtype", "variant", "rule")}
        # Float weights: numpy's product. Random quantized blocks: the first variant of the
        # same shape (NaN where it has NaN, as a kit from before _random_blocks had).
        ref = None if wdtype == "uint8" else _linear_reference(host, x_np, res_np)
        if not dry:
            f = lib[rec["name"]]
            f(x, copies[0], *extra, y)
            got = y.numpy()
            if ref is None:
                ref = first_output.setdefault((rec["dtype"], rec["kind"], w), got)
            scale = float(np.nanmax(np.abs(ref))) or 1.0
            diff = np.abs(got - ref)
            diff[np.isnan(got) & np.isnan(ref)] = 0
            r["max_rel_err"] = float(np.max(diff)) / scale if diff.size else 0.0
            r["correct"] = bool(r["max_rel_err"] < 1e-3)
            timer = lib.time_evaluator(rec["name"], dev, number=1, repeat=3, min_repeat_ms=10)
            r["hot_us"] = float(np.median(timer(x, copies[0], *extra, y).results)) * 1e6
            best = float("inf")
            for _ in range(2):
                dev.sync()
                t0 = time.perf_counter()
                for wc in copies:
                    f(x, wc, *extra, y)
                dev.sync()
                best = min(best, (time.perf_counter() - t0) / len(copies))
            r["cold_us"] = best * 1e6
            say(f"gemv {r['name']}: hot {r['hot_us']:.2f} us, cold {r['cold_us']:.2f} us, "
                f"rel err {r['max_rel_err']:.1e}")
        elif ref is not None:
            assert ref.shape == (w, n), (rec["name"], ref.shape)
        results.append(r)
    _tensor_core_summary(results)
    summary = {"arch": meta["arch"], "dry": dry, "kernels": results}
    if not dry:
        summary["device"] = _device_info()

    def save():  # after each part: a call's `timeout` then keeps what finished
        with open(os.path.join(out, "gemv.json"), "w") as fh:
            json.dump(summary, fh, indent=1)

    save()
    summary["attention"] = _attention(meta, lib, dev, dry)
    save()
    summary["topk"] = _topk(meta, lib, dev, dry)
    save()
    summary["chains"] = _chains(meta, lib, dev, dry, results)
    save()
    return summary


def _tensor_core_summary(results: list[dict]) -> None:
    """Per weight format, SmolLM2 linear and W: the tensor cores' time (the rule's schedule,
    then, float16, a k step at a time and 2 and 4 column tiles a block on every layer)
    against split K's (hot)."""
    hot = {(r["dtype"], r["variant"], r["kind"], r["w"]): r["hot_us"] for r in results
           if "hot_us" in r}
    for (dtype, variant, kind, w), us in sorted(hot.items()):
        if variant == "tensorcore" and (dtype, "splitk", kind, w) in hot:
            tiles = ", ".join(f"{label} {hot[dtype, v, kind, w]:.2f} us" for label, v in (
                ("a step at a time", "tensorcore_step"),
                ("fewest staging rounds", "tensorcore_rounds"), ("J=2", "tensorcore2"),
                ("J=4", "tensorcore4")) if (dtype, v, kind, w) in hot)
            say(f"tensor cores {dtype} {kind} W={w}: {us:.2f} us"
                + (f" ({tiles})" if tiles else "")
                + f", split K {hot[dtype, 'splitk', kind, w]:.2f} us, W=1 split K "
                f"{hot.get((dtype, 'splitk', kind, 1), float('nan')):.2f} us")


def _linear_reference(weight, x, residual):
    """``x @ W.T (+ residual)`` in float64 from a kit weight: packed ``[N / B, K, B]`` (our
    kernels; unpacked as ``hetcomp.kernels.ops.unpack_linear_weight`` does, in numpy here so
    that the GPU host's run imports nothing of the compiler's side) or ``[N, K]`` (dlight's
    layout)."""
    import numpy as np

    wt = weight.astype(np.float64)
    if wt.ndim == 3:
        wt = wt.transpose(0, 2, 1).reshape(-1, wt.shape[1])
    out = x.astype(np.float64) @ wt.T
    return out + residual if residual is not None else out


def _attention(meta: dict, lib, dev, dry: bool) -> list[dict]:
    """Time the kit's ``tree_attention`` variants (device timer, back to back: the layer's
    cache is L2-resident, as in a step) at W = 1, 4, 16, 64 over ``attention_cache``
    committed keys, each tree a chain (every row sees all keys: the most work), after
    checking each output against numpy (``max_rel_err``, ``correct``). The kernel rotates
    the qkv rows and writes the tree's K/V into the caches: the host's copy of the caches
    follows (:func:`_tree_rows`)."""
    import numpy as np

    from hetcomp import _tvm

    rng = np.random.default_rng(1)
    out = []
    for rec in meta.get("attention", []):
        hq, g, d, nl, ctx = rec["args"]
        kc_np = rng.standard_normal((nl, g, d, ctx)).astype(rec["kv_dtype"])
        vc_np = rng.standard_normal((nl, g, ctx, d)).astype(rec["kv_dtype"])
        kc, vc = _tvm.tensor(kc_np, dev), _tvm.tensor(vc_np, dev)
        for w in STEP_WIDTHS:
            for n in meta["attention_cache"]:
                qkv_np = rng.standard_normal((w, (hq + 2 * g) * d)).astype("float32")
                cs_np = _rope_table(np.arange(n, n + w), d)
                args = [_tvm.tensor(qkv_np, dev), _tvm.tensor(cs_np, dev), kc, vc,
                        _tvm.tensor(np.tril(np.ones((w, w), "int32")), dev),
                        _tvm.tensor(np.arange(n, n + w, dtype="int32"), dev), 1]
                o = _tvm.tensor(np.zeros((w, hq, d), "float32"), dev)
                r = {"name": rec["name"], "groups": rec["groups"],
                     "fan_in": rec.get("fan_in"), "w": w, "cache": n}
                q, k_tree, v_tree = _tree_rows(qkv_np, cs_np, hq, g, d)
                kc_np[1, :, :, n:n + w] = k_tree.transpose(0, 2, 1)
                vc_np[1, :, n:n + w] = v_tree
                ref = _chain_attention(q, kc_np[1], vc_np[1], n)
                if not dry:
                    lib[rec["name"]](*args, o)
                    r["max_rel_err"] = float(np.abs(o.numpy() - ref).max() / np.abs(ref).max())
                    # The written keys within a float16 rounding (nvcc fuses the
                    # rotation's multiply-adds).
                    r["correct"] = bool(r["max_rel_err"] < 1e-3 and np.allclose(
                        kc.numpy()[1, :, :, n:n + w].astype("float32"),
                        kc_np[1, :, :, n:n + w].astype("float32"), rtol=2e-3, atol=1e-3))
                    timer = lib.time_evaluator(rec["name"], dev, number=10, repeat=3,
                                               min_repeat_ms=10)
                    r["us"] = float(np.median(timer(*args, o).results)) * 1e6
                    say(f"attention {rec['name']} W={w} cache={n}: {r['us']:.2f} us, "
                        f"rel err {r['max_rel_err']:.1e}")
                out.append(r)
    return out


def _rope_table(positions, d: int, theta: float = 10000.0):
    """``cs[w, D]`` (cos | sin) of the rows at ``positions`` (``ops.rope_table``'s layout)."""
    import numpy as np

    angles = np.asarray(positions)[:, None] / theta ** (np.arange(d // 2) * 2 / d)
    return np.concatenate([np.cos(angles), np.sin(angles)], axis=1).astype("float32")


def _tree_rows(qkv, cs, hq: int, g: int, d: int, kv_dtype: str = "float16"):
    """What ``tree_attention`` makes of the qkv rows: the rotated queries ``q[H, w, D]``
    (float64) and the tree's rotated keys and values as the caches hold them,
    ``k[G, w, D]``, ``v[G, w, D]``, rounded to ``kv_dtype`` in float32 as the kernel rounds."""
    import numpy as np

    half = d // 2
    c, s = cs[:, :half], cs[:, half:]

    def rotated(head):
        x = qkv[:, head * d:(head + 1) * d]
        return np.concatenate([x[:, :half] * c - x[:, half:] * s,
                               x[:, half:] * c + x[:, :half] * s], axis=1)

    q = np.stack([rotated(h) for h in range(hq)]).astype(np.float64)
    k = np.stack([rotated(hq + j) for j in range(g)]).astype(kv_dtype)
    v = np.stack([qkv[:, (hq + g + j) * d:(hq + g + j + 1) * d] for j in range(g)])
    return q, k, v.astype(kv_dtype)


def _chains(meta: dict, lib, dev, dry: bool, linears: list[dict]) -> list[dict]:
    """Time the kit's fused chains and the kernels they replace (device timer, back to back,
    as the ``hot`` linears), each output checked against numpy first; then per kind and W
    the fused kernel's time beside the sum it replaces (``rms_norm`` + the ``splitk``
    float16 linear's ``hot_us`` [+ ``silu_mul``])."""
    import numpy as np

    from hetcomp import _tvm
    from hetcomp.kernels import ops, quant

    rng = np.random.default_rng(3)
    out, times = [], {}
    for rec in meta.get("chains", []):
        w, n, k, eps, act = rec["w"], rec["n"], rec["k"], rec["eps"], rec["activation"]
        r = {key: rec.get(key) for key in ("name", "role", "kind", "dtype", "w", "cols", "rule")}
        if rec["role"] == "fused":
            x_np = rng.standard_normal((w, k)).astype("float32")
            g_np = rng.standard_normal(k).astype("float32")
            dense = rng.standard_normal((n, k)).astype("float32")
            dtype = r["dtype"] = rec.get("dtype", "float16")
            if quant.is_quant(dtype):
                m = quant.QuantMatrix.quantize(dense, dtype)
                w_np, dense = quant.pack_quant_weight(m), m.dequantize()
            else:
                dense = dense.astype(dtype)
                w_np = ops.pack_linear_weight(dense, dtype)
            args = [x_np, g_np, w_np]
            ref = _norm_reference(x_np, g_np, eps) @ dense.astype(np.float64).T
            ref = _silu_mul_reference(ref) if act else ref
        elif rec["role"] == "norm":
            args = [rng.standard_normal((w, n)).astype("float32"),
                    rng.standard_normal(n).astype("float32")]
            ref = _norm_reference(*args, eps)
        else:
            args = [rng.standard_normal((w, n)).astype("float32")]
            ref = _silu_mul_reference(args[0].astype(np.float64))
        tensors = [_tvm.tensor(a, dev) for a in args]
        y = _tvm.tensor(np.zeros(ref.shape, "float32"), dev)
        if not dry:
            lib[rec["name"]](*tensors, y)
            r["max_rel_err"] = float(np.abs(y.numpy() - ref).max() / np.abs(ref).max())
            r["correct"] = bool(r["max_rel_err"] < 1e-3)
            timer = lib.time_evaluator(rec["name"], dev, number=10, repeat=3, min_repeat_ms=10)
            r["us"] = times[rec["name"]] = float(np.median(timer(*tensors, y).results)) * 1e6
            say(f"chain {rec['name']}: {r['us']:.2f} us, rel err {r['max_rel_err']:.1e}")
        out.append(r)
    if dry:
        return out
    hot = {(x["kind"], x["dtype"], x["w"]): x["hot_us"] for x in linears
           if x["variant"] == "splitk" and "hot_us" in x}
    for r in out:
        key = (r["kind"], r.get("dtype"), r["w"])
        if r["role"] != "fused" or key not in hot:
            continue
        w = r["w"]
        parts = times[f"norm_w{w}"] + hot[key] + (
            times[f"act_w{w}"] if r["kind"] == "gate_up" else 0.0)
        r["replaced_us"] = parts
        say(f"chain {r['kind']} {key[1]} W={w} ({r['rule']}, {r['cols']} columns a block): "
            f"fused {r['us']:.2f} us, unfused {parts:.2f} us")
    return out


def _norm_reference(x, gamma, eps: float):
    """RMSNorm in float64: ``x / rms(x) * gamma`` per row."""
    import numpy as np

    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=1, keepdims=True) + eps) * gamma


def _silu_mul_reference(gate_up):
    """``silu(gate) * up`` of ``[gate | up]`` columns."""
    import numpy as np

    gate, up = np.split(gate_up, 2, axis=1)
    return gate / (1.0 + np.exp(-gate)) * up


def _chain_attention(q, k_layer, v_layer, n: int):
    """numpy ``[w, H, D]`` attention of chain-tree rows: row i (at position n + i) sees keys
    ``0 .. n + i`` of one layer's caches ``k[G, D, C]``, ``v[G, C, D]`` (head h reads group
    h // (H / G)), float64."""
    import numpy as np

    hq, w, d = q.shape
    rep = hq // k_layer.shape[0]
    out = np.zeros((w, hq, d))
    for h in range(hq):
        keys = k_layer[h // rep, :, : n + w].astype(np.float64)  # [D, n + w]
        vals = v_layer[h // rep, : n + w].astype(np.float64)  # [n + w, D]
        s = q[h].astype(np.float64) @ keys / np.sqrt(d)  # [w, n + w]
        s[np.arange(n + w)[None, :] > (n + np.arange(w))[:, None]] = -np.inf
        p = np.exp(s - s.max(axis=1, keepdims=True))
        out[:, h] = (p / p.sum(axis=1, keepdims=True)) @ vals
    return out


def _topk(meta: dict, lib, dev, dry: bool) -> list[dict]:
    """Time the kit's draft top-k kernels (device timer, back to back) on random logits; a
    kernel's ids are checked against numpy's ranking first (the vocabulary map's too)."""
    import numpy as np

    from hetcomp import _tvm

    rng = np.random.default_rng(2)
    out = []
    for rec in meta.get("topk", []):
        rows, n, k = rec["rows"], rec["n"], rec["k"]
        logits = rng.standard_normal((rows, n)).astype("float32")
        vocab = rng.permutation(1 << 16)[:n].astype("int32")
        args = [_tvm.tensor(logits, dev)] + ([_tvm.tensor(vocab, dev)] if rec["mapped"] else [])
        top = _tvm.tensor(np.zeros((rows, k), "int32"), dev)
        r = {key: rec[key] for key in ("name", "impl", "rows", "n", "k", "mapped")}
        if not dry:
            lib[rec["name"]](*args, top)
            want = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            r["correct"] = bool(np.array_equal(top.numpy(), vocab[want] if rec["mapped"]
                                               else want))
            timer = lib.time_evaluator(rec["name"], dev, number=10, repeat=3, min_repeat_ms=10)
            r["us"] = float(np.median(timer(*args, top).results)) * 1e6
            say(f"topk {rec['name']}: {r['us']:.2f} us, correct {r['correct']}")
        out.append(r)
    return out


def _generate_worker(bundle: str, out: str, worker: int, workers: int) -> None:
    from hetcomp.runtime import generate, load_artifact

    meta = json.load(open(os.path.join(bundle, "prompts.json")))
    art = load_artifact(os.path.join(bundle, "art", "cpu"))
    with open(os.path.join(out, f"responses-{worker}.jsonl"), "a") as fh:
        for index, ids in meta["prompts"][worker::workers]:
            r = generate(art, ids, meta["new_tokens"])
            fh.write(json.dumps({"index": index, "ids": r.ids}) + "\n")
            fh.flush()  # a worker stopped at the deadline keeps every finished response


def generate_responses(bundle: str, out: str, workers: int, seconds: float) -> None:
    """Calibration data on a many-core host: each worker answers every WORKERS-th prompt."""
    import subprocess

    from hetcomp.runtime import attach_weights

    attach_weights(os.path.join(bundle, "art", "cpu"), _gguf(bundle), quiet=True)
    say(f"weights attached; {workers} workers")
    # Each worker on its own two cores: TVM pins its pool threads to the first cores it
    # sees, so unpinned workers all share cores 0-1 (8 workers made 66 responses in 8 min).
    env = dict(os.environ, TVM_NUM_THREADS="2", TVM_BIND_THREADS="0")
    cores = sorted(os.sched_getaffinity(0))
    procs = [subprocess.Popen(["taskset", "-c", ",".join(map(str, cores[2 * k: 2 * k + 2])),
                               sys.executable, __file__, "generate-worker", bundle, out,
                               str(k), str(workers)], env=env) for k in range(workers)]
    deadline = T0 + seconds
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    done = sum(1 for f in os.listdir(out) if f.startswith("responses-")
               for _ in open(os.path.join(out, f)))
    say(f"{done} responses")


def _eager() -> dict:
    """PyTorch eager bfloat16 on this host's GPU (eager.py), or why it did not run."""
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed here"}
    if not torch.cuda.is_available():
        return {"skipped": "torch sees no GPU"}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import eager

    return eager.bench(eager.SMOLLM2, "cuda", "bfloat16")


def _device_info() -> dict:
    import subprocess

    from hetcomp.profile.units import cpu_model, gpu_info, gpu_integrated

    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True,
                              text=True).stdout.strip().splitlines()[-1:]
    except OSError:  # no CUDA toolkit (the rehearsal on the build machine)
        nvcc = []
    # integrated: the CUDA driver's answer, which decides whether the planner puts a
    # profiled GPU on the host's memory (None: no driver answered)
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_info(), "nvcc": nvcc,
            "integrated": gpu_integrated()}


def _unpack(bundle: str) -> None:
    import tarfile

    if not os.path.isdir(os.path.join(bundle, "kit")):
        with tarfile.open(os.path.join(bundle, "payload.tar.xz")) as tf:
            tf.extractall(bundle, filter="data")


if __name__ == "__main__":
    what, bundle, out = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    if what == "generate-worker":
        _generate_worker(bundle, out, int(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    if what == "gemv":
        gemv(os.path.join(bundle, "gemv"), out, dry="--dry" in sys.argv[4:])
        say("done")
        sys.exit(0)
    _unpack(bundle)
    if what == "generate":
        generate_responses(bundle, out, int(sys.argv[4]), float(sys.argv[5]))
    elif what == "profile":
        profile(bundle, out, sys.argv[4:])
    else:
        run(bundle, out, sys.argv[4:])
    say("done")
