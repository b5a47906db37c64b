"""On the CUDA host, with the TVM runtime only: profile the kit, run the artifacts.

    python run.py profile BUNDLE OUT     ARCA kit -> OUT/profile.sqlite (cpu and cuda)
    python run.py run BUNDLE OUT         PyTorch eager bfloat16 on the GPU first (eager.py,
                                         where torch sees one), then attach weights; per
                                         artifact: greedy output (sequential and
                                         speculative), decode tokens/s, verify step time,
                                         per-unit and per-kernel time
                                         -> OUT/results.json (rewritten after each artifact)
    python run.py generate BUNDLE OUT WORKERS SECONDS
                                         greedy responses to the bundle's prompts.json
                                         (calibration data, bundle.py --generate) from
                                         WORKERS processes of 2 threads each, stopped
                                         after SECONDS -> OUT/responses-*.jsonl

BUNDLE is what bundle.py wrote (its ``a`` folder; ``b`` beside it holds the GGUF's second
part, which arrives with the second call).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

T0 = time.time()
PROMPTS = ["What are three good habits for staying healthy?",
           "Write a short poem about the sea."]
NEW_TOKENS = 48


def say(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def profile(bundle: str, out: str, units: list[str]) -> None:
    from hetcomp.driver.profile import profile_command

    summary = profile_command(units=units or ["cpu", "cuda"], out=os.path.join(out, "profile.sqlite"),
                              kit=os.path.join(bundle, "kit"), progress=say)
    with open(os.path.join(out, "profile-summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)


def _gguf(bundle: str) -> str:
    path = os.path.join(bundle, "..", "gguf")
    meta = json.load(open(os.path.join(bundle, "bundle.json")))
    if not os.path.isfile(path):
        with open(path + ".tmp", "wb") as fh:
            for part in (os.path.join(bundle, "gguf.part0"),
                         os.path.join(bundle, "..", "b", "gguf.part1")):
                with open(part, "rb") as src:
                    fh.write(src.read())
        os.replace(path + ".tmp", path)
    with open(path, "rb") as fh:
        if hashlib.sha256(fh.read()).hexdigest() != meta["gguf_sha256"]:
            raise SystemExit("reassembled GGUF does not match its sha256")
    return path


def run(bundle: str, out: str, names: list[str]) -> None:
    import numpy as np

    from hetcomp.runtime import attach_weights, generate, load_artifact
    from hetcomp.runtime.unit_time import kernel_breakdown, step_breakdown

    gguf = _gguf(bundle)
    meta = json.load(open(os.path.join(bundle, "bundle.json")))
    path = os.path.join(out, "results.json")
    # One process per artifact (a crash loses one artifact): results accumulate in the file.
    results: dict = (json.load(open(path)) if os.path.isfile(path)
                     else {"device": _device_info(), "artifacts": {}})
    reference = results.get("reference")
    if "eager" not in results:  # the baseline, in the same run (issue #19)
        results["eager"] = _eager()
        say(f"eager: {results['eager']}")
    for name in names or meta["artifacts"]:
        art_dir = os.path.join(bundle, "art", name)
        say(f"{name}: attaching weights")
        attach_weights(art_dir, gguf, quiet=True)
        t = time.time()
        art = load_artifact(art_dir)
        r: dict = {"load_s": time.time() - t, "plan": art.manifest.get("plan"),
                   "units": [u["name"] for u in art.manifest["units"]]}
        say(f"{name}: loaded in {r['load_s']:.1f}s on {r['units']}")
        prompts = [art.tokenizer.encode(p, chat=True) for p in PROMPTS]
        outs = {}
        for width in (1, 2, 4, 8):
            runs = [generate(art, ids, NEW_TOKENS, stop_at_eos=False, width=width)
                    for ids in prompts]
            runs = [generate(art, ids, NEW_TOKENS, stop_at_eos=False, width=width)
                    for ids in prompts]  # second pass: warm
            outs[width] = [x.ids for x in runs]
            r[f"w{width}"] = {
                "tokens_per_s": float(np.mean([x.decode_tokens_per_s for x in runs])),
                "accepted_per_step": float(np.mean([x.accepted_per_step for x in runs])),
                "identical_to_sequential": outs[width] == outs[1]}
            say(f"{name}: W={width} {r[f'w{width}']}")
        if reference is None:
            reference = results["reference"] = outs[1]
            r["text"] = runs[0].text
        r["identical_to_first_artifact"] = outs[1] == reference
        r["ids_w1"] = outs[1]
        r["breakdown"] = [step_breakdown(art, w, steps=10, cache_len=64) for w in (1, 2, 8)]
        say(f"{name}: breakdown {r['breakdown']}")
        r["kernels"] = [kernel_breakdown(art, w, steps=10, cache_len=64) for w in (1, 2, 8)]
        results["artifacts"][name] = r
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)
        del art


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

    from hetcomp.profile.units import cpu_model, gpu_info

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_info(),
            "nvcc": subprocess.run(["nvcc", "--version"], capture_output=True,
                                   text=True).stdout.strip().splitlines()[-1:]}


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
    _unpack(bundle)
    if what == "generate":
        generate_responses(bundle, out, int(sys.argv[4]), float(sys.argv[5]))
    elif what == "profile":
        profile(bundle, out, sys.argv[4:])
    else:
        run(bundle, out, sys.argv[4:])
    say("done")
