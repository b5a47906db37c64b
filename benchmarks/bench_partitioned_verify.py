"""One verify step of SmolLM2 partitioned across two CPU units: the dense attention part and
the KV cache on unit 1, the sparse part on the host (the placement whose cache traffic the
v_tree change removed), linear layers split 50/50. Wall time of a ``w``-node verify after
256 cached tokens (2048-slot cache), best of 15.

    python benchmarks/bench_partitioned_verify.py ART_DIR [--width 16]   (compiles ART_DIR
    first if it does not exist)

Measured (znver5, 2 shared cores under a load average of 3-4; symbolic-width verify, no
heads), best / median of 15, ms:

    sparse part read tree V from the V cache, so the whole cache [30, 3, 2048, 64] float32
    (47 MB) went to the host in every layer, 1.4 GB a step:
        W=16  660.2 / 688.0      W=64  768.7 / 802.0
    sparse part reads rope_kv's v_tree (only q/k_tree/v_tree, CSR and partials cross):
        W=16   47.7 /  52.6      W=64  322.5 / 328.9
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--cached", type=int, default=256)
    args = ap.parse_args(argv)

    import numpy as np

    from hetcomp.driver.compile import CompileOptions, compile_model
    from hetcomp.frontend import load_model
    from hetcomp.hardware import target_dict
    from hetcomp.plan import HeteroPlan
    from hetcomp.runtime import load_artifact

    if not os.path.isdir(args.artifact):
        host = target_dict("host")
        plan = HeteroPlan(targets=(host, host), ratios=(("default", 0.5),),
                          dense_attention=1, sparse_attention=0)
        compile_model(CompileOptions(model="smollm2", plan=plan), args.artifact, quiet=True,
                      weights=load_model("smollm2"))
    art = load_artifact(args.artifact, verify=False)
    s = art.new_session()
    prompt = list(range(100, 100 + args.cached))
    s.prefill(prompt)
    w = args.width
    mask = np.tril(np.ones((w, w), "int32"))
    toks, pos = list(range(500, 500 + w)), np.arange(w) + len(prompt)
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        s.verify(toks, pos, mask)
        times.append(time.perf_counter() - t0)
        s.truncate(len(prompt))
    times.sort()
    print(f"W={w}: verify best {times[0] * 1e3:.1f} ms, median {times[7] * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
