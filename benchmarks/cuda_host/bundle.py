"""Build everything a CUDA host needs to run hetcomp with the TVM runtime only.

The GPU host is lent for minutes and takes at most 64 MiB per call, so nothing is compiled
there: this script (on the build machine, with the compiler) writes

    DIR/a/tvm-runtime.tar.xz   the tvm package without libtvm_compiler.so (README:
                               loading an artifact needs the TVM runtime only)
    DIR/a/wheels/              apache-tvm-ffi and gguf for the host's Python (pip download)
    DIR/a/payload.tar.xz       kit/: the ARCA profile kit, probe kernels for cpu (x86-64-v3)
                               and cuda; art/<name>/: artifacts with separate weights (below)
    DIR/a/gguf.part0           the first part of the model file; DIR/b/gguf.part1, DIR/c/...
                               the rest, one folder per later call (each fits a call's 64 MiB
                               beside the working tree)
    DIR/a/bundle.json          sha256 of the whole GGUF, names of the artifacts

Artifacts, every one with float16 weights (``--dtype``; the probes too): ``cpu`` (the whole
model on the CPU, portable x86-64-v3; the GPU's greedy reference), ``gpu`` (the whole model
on the GPU, CUDA graphs, norms and activations fused into the linears, float16 linears of
16-64 rows on tensor cores; ``gpu-unfused`` without that fusion, ``gpu-nograph`` without the
graphs, ``gpu-notc`` without the tensor cores), and two partitions with the CPU as
host and the GPU taking output columns of
every linear layer: ``split-all`` (all columns on the GPU; attention and the rest on the CPU)
and ``split-half`` (half of every linear layer's columns on each unit, so both run at once).
Beside them, the packaged file's own format (``QUANT_DTYPE``, q4_1: its Q4_1 layers kept
byte for byte): ``gpu-q4_1`` (the ``gpu`` build, quantized linears: split K, tensor cores
at 16-64 rows) and its greedy reference ``cpu-q4_1`` (x86-64-v3: no int8 dot products, so
its linears dequantize with float activations, as the GPU's do); ``run.py`` writes their
results apart (``results-q4_1.json``).

``--generate CORPUS`` builds instead a calibration-data bundle: the ``cpu`` artifact without
heads and ``prompts.json`` (the corpus' prompts as chat token ids), for ``run.py generate``.

Usage: python benchmarks/cuda_host/bundle.py DIR [--quick | --generate CORPUS [--new-tokens N]]
       [--cuda-arch sm_90] [--dtype float16]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys

# A call carries at most 64 MiB with the working tree (24.4 MiB since the Gemma heads): the
# first carries TVM, the wheels and payload.tar.xz (kit and artifacts, ~7 MiB) and part 0 of
# the GGUF; each later call (folders b, c, ...) one more part.
CALL_BYTES = 64 << 20
MARGIN_BYTES = 2 << 20  # files a session adds before the call (notes, results)
# Weights of every artifact (but the q4_1 pair) and of the profile's probes: the GPU's
# tensor-core rules take no float32 linears, and a float16 step reads half the bytes.
DTYPE = "float16"
# The quantized artifacts' format: the packaged GGUF's own (Q4_1 layers, Q8_0 embedding).
QUANT_DTYPE = "q4_1"
# The widths each artifact decodes at (run.py's GEN_WIDTHS and STEP_WIDTHS; a width is
# decodable where the manifest has its tree, up to the largest compiled width).
WIDTHS = (1, 2, 4, 8, 16, 64)


def profile_options(quick: bool):
    """The kit's probes. Quick: two column ratios, one cache length and short rounds, but at
    every width the artifacts decode (until session 34 ``ProfileOptions.quick()``'s W = 1 and
    16: fitted from those, the rehearsal's predicted cpu step was -23% to +67% off the
    measured one at W = 1-64, from these -12% to +0%, the profile 23 s instead of 21 s).
    Else every shape of a full profile, timed in shorter rounds: the host is lent for
    minutes."""
    import dataclasses

    from hetcomp.profile.measure import ProfileOptions

    if quick:
        return dataclasses.replace(ProfileOptions.quick(), widths=WIDTHS)
    return ProfileOptions(min_time_s=0.004, rounds=3)


def _sh(*cmd):
    subprocess.run(cmd, check=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--quick", action="store_true", help="quick profile kit")
    ap.add_argument("--max-context", type=int, default=512)
    ap.add_argument("--generate", metavar="CORPUS", help="calibration-data bundle")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--cuda-arch", default="sm_90",
                    help="the lent host's GPU (H100/H200: sm_90; Jetson Orin: sm_87)")
    ap.add_argument("--dtype", default=DTYPE,
                    help="weights of every artifact (but the q4_1 pair) and of the profile's "
                         "probes (float16: the GPU's tensor-core rules take no float32 "
                         "linears)")
    args = ap.parse_args()

    import tvm

    from hetcomp.driver.compile import compile_model
    from hetcomp.driver.profiling import read_model_shape
    from hetcomp.profile.measure import build_kit

    a = os.path.join(args.out, "a")
    os.makedirs(a, exist_ok=True)
    site = os.path.dirname(os.path.dirname(tvm.__file__))
    _sh("tar", "-C", site, "--exclude=tvm/lib/libtvm_compiler.so", "--exclude=tvm/3rdparty",
        "--exclude=tvm/src", "--exclude=tvm/web", "--exclude=__pycache__", "-cJf",
        os.path.join(a, "tvm-runtime.tar.xz"), "tvm", f"apache_tvm-{tvm.__version__}.dist-info")
    wheels = os.path.join(a, "wheels")
    if not os.path.isdir(wheels):
        _sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "-d", wheels, "apache-tvm-ffi==0.1.14.post1", "gguf==0.19.0")

    if args.generate:
        _generation_payload(a, args)
        _gguf_parts(args.out, [])
        return 0

    shape, key = read_model_shape("smollm2", args.dtype)
    opts = profile_options(args.quick)
    build_kit(os.path.join(a, "kit"), ["cpu", "cuda"], shape, key, opts, wdtype=args.dtype,
              cpu_target="x86-64-v3", cuda_arch=args.cuda_arch)
    builds = artifact_builds(args.cuda_arch, args.max_context, args.dtype)
    for name, opts in builds.items():
        print(f"== artifact {name}", file=sys.stderr, flush=True)
        compile_model(opts, os.path.join(a, "art", name))

    _sh("tar", "-C", a, "-cJf", os.path.join(a, "payload.tar.xz"), "kit", "art")
    for d in ("kit", "art"):
        subprocess.run(["rm", "-rf", os.path.join(a, d)], check=True)
    _gguf_parts(args.out, list(builds), {n: o.dtype for n, o in builds.items()})
    return 0


def artifact_builds(cuda_arch: str, max_context: int, dtype: str = DTYPE) -> dict:
    """The bundle's artifacts by name, each a ``CompileOptions``: SmolLM2 with its packaged
    heads and separate weights, every one in ``dtype`` (the CPU artifact is the GPU's
    greedy reference, so it computes from the same weights)."""
    from hetcomp.driver.compile import CompileOptions
    from hetcomp.hardware import target_dict
    from hetcomp.plan import HeteroPlan

    heads = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "hetcomp",
                         "data", "smollm2-medusa.npz")
    cpu, cuda = target_dict("x86-64-v3"), {"kind": "cuda", "arch": cuda_arch}
    kinds = ("qkv", "o", "gate_up", "down", "lm_head")
    plans = {
        "split-all": HeteroPlan(("cpu", "cuda"), (cpu, cuda),
                                tuple((k, 1.0) for k in kinds), 0, 0),
        "split-half": HeteroPlan(("cpu", "cuda"), (cpu, cuda),
                                 tuple((k, 0.5) for k in kinds), 0, 0),
    }
    common = dict(model="smollm2", heads=heads, dtype=dtype, max_context=max_context,
                  separate_weights=True, widths=WIDTHS, cuda_arch=cuda_arch)
    builds = {"cpu": CompileOptions(target="x86-64-v3", **common),
              "gpu": CompileOptions(target="cuda", **common),
              # The same GPU build launching every kernel on its own: what CUDA graphs save.
              "gpu-nograph": CompileOptions(target="cuda", cuda_graph=False, **common),
              # The same with each norm and activation its own kernel: what fusing saves.
              "gpu-unfused": CompileOptions(target="cuda", fuse_linears=False, **common),
              # Every linear on the CUDA cores: what the tensor cores save at W = 16, 64.
              "gpu-notc": CompileOptions(target="cuda", tensor_cores=False, **common)}
    builds.update({n: CompileOptions(target="x86-64-v3", plan=p, **common)
                   for n, p in plans.items()})
    if dtype != QUANT_DTYPE:
        quantized = {**common, "dtype": QUANT_DTYPE}
        builds.update({f"gpu-{QUANT_DTYPE}": CompileOptions(target="cuda", **quantized),
                       f"cpu-{QUANT_DTYPE}": CompileOptions(target="x86-64-v3", int8_dot=False,
                                                            **quantized)})
    return builds


def _generation_payload(a: str, args) -> None:
    """The ``cpu`` artifact (no heads: plain greedy decoding) and the prompts as token ids."""
    from hetcomp.driver.compile import CompileOptions, compile_model
    from hetcomp.frontend import load_model
    from hetcomp.frontend.tokenizer import TokenizerInfo
    from hetcomp.speculative.corpus import load_corpus

    art = os.path.join(a, "art", "cpu")
    loaded = load_model("smollm2")
    compile_model(CompileOptions(model="smollm2", target="x86-64-v3", separate_weights=True,
                                 max_context=args.max_context), art, weights=loaded)
    tok = TokenizerInfo.from_spec(loaded[2])
    prompts = [[i, tok.encode(p, chat=True)] for i, p in enumerate(load_corpus(args.generate))]
    with open(os.path.join(a, "prompts.json"), "w") as fh:
        json.dump({"corpus": args.generate, "new_tokens": args.new_tokens, "prompts": prompts},
                  fh)
    _sh("tar", "-C", a, "-cJf", os.path.join(a, "payload.tar.xz"), "art")
    subprocess.run(["rm", "-rf", art], check=True)


def _tree_bytes() -> int:
    """Bytes of the working tree a device call sends (tracked files)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    files = subprocess.run(["git", "-C", root, "ls-files", "-z"], check=True,
                           capture_output=True).stdout.decode().split("\0")
    return sum(os.path.getsize(os.path.join(root, f)) for f in files
               if f and os.path.isfile(os.path.join(root, f)))


def _gguf_parts(out: str, artifacts: list, dtypes: dict | None = None) -> None:
    """The GGUF in parts that fit the calls beside the working tree: part 0 in ``out/a``
    after the runtime and payload, then one part per folder ``out/b``, ``out/c``, ...;
    ``bundle.json`` names the artifacts and their weight formats (``dtypes``)."""
    from hetcomp.frontend import default_gguf_path

    with open(default_gguf_path(), "rb") as fh:
        data = fh.read()
    a = os.path.join(out, "a")
    # An earlier bundle's parts in the same folder are stale: they would count as used room
    # (part 0 came out nearly the whole file once) or travel as extra parts.
    for stale in glob.glob(os.path.join(out, "[a-h]", "gguf.part*")):
        os.remove(stale)
    budget = CALL_BYTES - _tree_bytes() - MARGIN_BYTES
    used = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(a) for f in fs)
    if used >= budget:
        raise SystemExit(f"{a} holds {used / 2**20:.1f} MiB, more than a call's "
                         f"{budget / 2**20:.1f} MiB beside the tree")
    dirs, start, size = [], 0, budget - used
    while start < len(data):
        d = os.path.join(out, "abcdefgh"[len(dirs)])
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"gguf.part{len(dirs)}"), "wb") as fh:
            fh.write(data[start: start + size])
        dirs.append(d)
        start, size = start + size, budget
    with open(os.path.join(a, "bundle.json"), "w") as fh:
        json.dump({"gguf_sha256": hashlib.sha256(data).hexdigest(), "gguf_parts": len(dirs),
                   "artifacts": artifacts, "dtypes": dtypes or {}}, fh, indent=1)
    for d in dirs:
        total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs)
        print(f"{d}: {total / 2**20:.1f} MiB (a call: {budget / 2**20:.1f} MiB beside the "
              "tree)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
