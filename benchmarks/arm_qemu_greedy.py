"""Greedy decoding of a model scheduled for aarch64, every kernel cross-compiled and run under
qemu, against a host artifact's greedy ids: the whole-model check of the ARM rules on a real
model (no aarch64 TVM runtime needed; slow: a qemu process per kernel call, ~25 s a token
for SmolLM2).

``python benchmarks/arm_qemu_greedy.py HOST_ART [--model smollm2] [--dtype q4_1]
[--tokens 8] [--prompt TEXT] [--target aarch64|aarch64-dotprod]``; HOST_ART is a host
artifact of the same model and dtype (for ``aarch64-dotprod``, whose quantized linears round
their inputs to int8, one whose linears do too: an AVX-512 VNNI host's default)
(e.g. ``hetcomp compile --model smollm2 --dtype q4_1 -o HOST_ART``). Exits 1 when the ids
differ. Needs gcc-aarch64-linux-gnu and qemu-user-static.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="host artifact of the same model and dtype")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="q4_1")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--target", choices=("aarch64", "aarch64-dotprod"), default="aarch64")
    args = ap.parse_args()

    from hetcomp.codegen.build import schedule_module
    from hetcomp.codegen.cross import QemuModule
    from hetcomp.codegen.targets import make_target
    from hetcomp.frontend import load_model
    from hetcomp.frontend.config import kv_cache_shapes
    from hetcomp.frontend.llama import build_module
    from hetcomp.frontend.tokenizer import TokenizerInfo
    from hetcomp.frontend.weights import pack_weights, param_specs
    from hetcomp.hardware import target_dict
    from hetcomp.quant_format import cache_dtype, is_quant
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.generate import generate
    from hetcomp.speculative.tree import csr_from_mask

    cfg, w, spec, _ = load_model(args.model, 256, keep_quant=is_quant(args.dtype))
    prompt = TokenizerInfo.from_spec(spec).encode(args.prompt)
    ref = generate(load_artifact(args.reference), prompt, max_new_tokens=args.tokens,
                   stop_at_eos=False).ids
    packed = pack_weights(cfg, w, args.dtype)
    params = [packed[name] for name, _, _ in param_specs(cfg, args.dtype)]
    kv = cache_dtype(args.dtype)
    t0 = time.time()
    mod = schedule_module(build_module(cfg, args.dtype, static_widths=(1,), kv_dtype=kv),
                          make_target(args.target))
    run = QemuModule(mod, workdir=tempfile.mkdtemp(prefix="hetcomp-arm-greedy-"),
                     target=target_dict(args.target))
    ks, vs = kv_cache_shapes(cfg)
    kc, vc = np.zeros(ks, kv), np.zeros(vs, kv)
    t = len(prompt)
    _, _, ids, kc, vc = run("prefill", np.array(prompt, "int32"), np.arange(t, dtype="int32"),
                            np.tril(np.ones((t, t), "int32")), kc, vc, 0, *params)
    out = [int(ids[0])]
    one = np.ones((1, 1), "int32")
    while len(out) < args.tokens:  # sequential decoding: verify_w1, then commit its node
        pos = t + len(out) - 1
        _, _, ids, kc, vc = run("verify_w1", np.array([out[-1]], "int32"),
                                np.array([pos], "int32"), one, *csr_from_mask(one), kc, vc,
                                pos, *params)
        kc, vc = run("commit", kc, vc, np.array([0], "int32"), pos)
        out.append(int(ids[0]))
    same = out == ref[:len(out)]
    print(f"host  {ref}\nqemu  {out}\nequal: {same} ({time.time() - t0:.0f} s under qemu)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
