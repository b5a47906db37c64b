"""The VM's own time in a decode step: SmolLM2's 30 layers at hidden size 64 (random float16
weights, so the kernels take next to nothing), one W = 1 verify call timed over and over.

What is left is the VM: its instruction dispatch, the tensor allocations its memory plan
leaves, and a parallel launch per threaded kernel. Session 36, the 2-core Intel host: 289 us
a step with ``TVM_NUM_THREADS=1``, 366 with 2 (275 kernel calls), against SmolLM2's 9.5 ms
float16 step: 3-4%. (``hetcomp bench --kernels`` times calls one by one with a VM instrument,
whose own time it takes off: :class:`hetcomp.runtime.unit_time.SyncTimer`.)

``TVM_NUM_THREADS=1 python benchmarks/vm_overhead.py [--out DIR] [--calls 200]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", help="artifact folder (default: a temporary one)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import hetcomp.testing
    from hetcomp import _tvm
    from hetcomp.driver.compile import CompileOptions, compile_model
    from hetcomp.frontend.config import LlamaConfig
    from hetcomp.frontend.weights import random_weights
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.unit_time import gc_paused

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_layers=30, num_heads=4,
                      num_kv_heads=2, vocab_size=320, max_context=256, rope_theta=10000.0)
    out = args.out or os.path.join(tempfile.mkdtemp(), "art")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        compile_model(CompileOptions(model="tiny.gguf", dtype="float16", max_context=256),
                      out, quiet=True,
                      weights=(cfg, random_weights(cfg, seed=0, scale=0.08),
                               hetcomp.testing.byte_tokenizer_spec(cfg.vocab_size),
                               hetcomp.testing.__file__))
    art = load_artifact(out)
    calls = sum(k["calls"] for k in art.manifest["kernels"] if k["function"] == "verify_w1")
    sess = art.new_session()
    sess.prefill(np.arange(1, 65) % cfg.vocab_size)
    verify = art._verify_static[1]
    inputs = (sess._t(np.array([5])), sess._t(np.array([sess.length])),
              *sess._tree(np.ones((1, 1)), None), sess.k_cache, sess.v_cache,
              _tvm.length_shape(sess.length), *art.params)
    for _ in range(20):
        verify(*inputs)
    per_call = []
    with gc_paused():
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                res = verify(*inputs)
            _tvm.download(res[2])
            per_call.append((time.perf_counter() - t0) / args.calls)
    print(f"TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}: "
          f"{1e6 * float(np.median(per_call)):.1f} us a W = 1 step (median of {args.rounds} "
          f"rounds of {args.calls}), {calls} kernel calls")


if __name__ == "__main__":
    main()
