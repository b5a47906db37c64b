"""SmolLM2's decode linear kernels under each GPU schedule: a compile-side table and a kit of
compiled kernels for the GPU host.

    python benchmarks/gemv_kernels.py table [--dtype float16|float32|q4_0|q4_1|q8_0]
                                            [--out FILE]
        per kernel (qkv, o, gate_up, down, lm_head at W = 1, 4, 16, 64) and variant: CUDA
        source bytes, ptxas registers / stack / spills for sm_90, blocks x threads launched
        (markdown; benchmarks/gemv.md holds a run)
    python benchmarks/gemv_kernels.py norms [--out FILE]
        the same columns for SmolLM2's rms_norm (and the residual norm) under
        gpu.PerStageThread and gpu.RMSNorm
    python benchmarks/gemv_kernels.py build DIR [--cuda-arch sm_90]
        DIR/gemv/: lib.so (every kernel of every variant and weight format), kernels.json
        (names, shapes), kcache/ (the fatbin nvcc made here from the library's CUDA source,
        keyed as hetcomp._tvm._nvcc_fatbin keys it, so the host compiles nothing)
        -> on the GPU host: python benchmarks/cuda_host/run.py gemv DIR OUT

The kit also holds SmolLM2's ``tree_attention`` (the CUDA-graph build's attention, float16
cache) with one group of T threads a block (session 10's kernel) and with the default groups
(256 threads a block), and the default groups reducing in pairs (the kernel before the
8-way reductions); ``run.py gemv`` times each at W = 1, 4, 16, 64 over cache lengths
``ATTN_CACHE``; the Medusa draft's top-k, ``script_ops.topk_rows`` against TVM's GPU
``topk`` (a sort), at the shipped draft's shape and over the whole vocabulary; and the two
chains FuseLinearChains fuses (float16 and q4_1): ``rms_norm -> qkv`` and ``rms_norm ->
gate_up -> silu_mul`` as one fused kernel each, beside the ``rms_norm`` and ``silu_mul``
kernels they replace (the unfused linears are the ``splitk`` records).

Variants: ``column`` (gpu.LinearColumn: a thread per column), ``splitk`` (gpu.SplitKLinear),
``tensorcore`` (gpu.TensorCoreLinear, float16 at W = 16 and 64 only: WMMA, x as hi and lo
float16 terms; a warp loads W's tiles of several k steps before it uses any and stages x
for several steps a barrier pair), ``tensorcore_step`` (the same a k step at a time: a DRAM
round trip and a barrier pair per step), ``tensorcore_rounds`` (the warps a block that stage
x in the fewest rounds, where that is fewer warps than the rule's: SmolLM2's o and qkv at
W = 64 with one warp in 4 rounds, not four in 9), ``tensorcore2`` and ``tensorcore4`` (2 or 4 column
tiles a block on every layer: each block reads all of x, W x K, for 16 J columns of W, so
at W = 64 a 16-column tile reads 8x its weight bytes in x, at the price of a grid of
N / 16 J blocks; the rule takes J = 4 only for the LM head),
``dlight`` (the first of dlight's rules that takes our packed kernel, in gpu_rules' order:
Matmul from W = 2, Fallback at W = 1) and ``dlight_nt`` (dlight's GEMV at W = 1 and
LowBatchGEMV, symbolic width, above: the same product with the weight unpacked ``[n, k]``,
K innermost, the layout those rules are written for; they do not take ours, see
gpu.SplitKLinearRule). Block-quantized weights (q4_0, q4_1, q8_0) have ``column``
(gpu.QuantLinear), ``splitk`` (gpu.QuantSplitKLinear: 32 columns a block, a whole sector
per byte index), ``splitk16`` (the same rule with 16 columns: twice the blocks, each
sector read by two of them; the alternative to time) and, at W = 16 and 64, ``tensorcore``
(gpu.QuantTensorCoreLinear: each warp decodes its W tiles into shared memory as float16 hi
and lo terms, then TensorCoreLinear's products) and ``tensorcore2`` (the same with 2 column
tiles a block: 32 columns, the whole 32-byte row of a panel's byte, where one tile reads
half of it and the neighbouring block the other half); dlight has no rule for them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

from hetcomp import _tvm
from hetcomp.driver.profiling import read_model_shape
from hetcomp.kernels import ops, quant, script_ops
from hetcomp.schedules.apply import rule_name
from hetcomp.schedules.gpu import (
    LinearColumnRule,
    PerStageThreadRule,
    QuantLinearRule,
    QuantSplitKLinearRule,
    QuantTensorCoreLinearRule,
    RMSNormRule,
    SplitKLinearRule,
    TensorCoreLinearRule,
)

c = _tvm.compiler()
KINDS = ("qkv", "o", "gate_up", "down", "lm_head")
WIDTHS = (1, 4, 16, 64)
VARIANTS = ("column", "splitk", "dlight", "dlight_nt")
DTYPES = ("float16", "float32", *quant.QUANT_DTYPES)
# (groups, fan-in): one group of T threads (session 10), the default groups, and the default
# groups reducing in pairs (log2 T barriers a reduction, session 12's kernel)
ATTN_VARIANTS = ((1, script_ops.TREE_REDUCE_FAN_IN), (None, script_ops.TREE_REDUCE_FAN_IN),
                 (None, 2))
ATTN_CACHE = (128, 512, 1984)  # committed keys when timing tree_attention
_SHORT = {"float16": "f16", "float32": "f32", "q4_0": "q40", "q4_1": "q41", "q8_0": "q80"}


def nt_linear(n: int, k: int, wdtype: str, residual: bool, rows):
    """``y = x @ W.T (+ r)`` with W unpacked ``[n, k]`` (dlight's GEMV layout)."""
    te = c.te
    x = te.placeholder((rows, k), "float32", name="x")
    wt = te.placeholder((n, k), wdtype, name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((rows, n), lambda i, j: te.sum(x[i, r] * wt[j, r].astype("float32"), axis=r),
                   name="matmul")
    args = [x, wt]
    if residual:
        res = te.placeholder((rows, n), "float32", name="residual")
        y = te.compute((rows, n), lambda i, j: y[i, j] + res[i, j], name="add_residual")
        args.append(res)
    return te.create_prim_func([*args, y], index_dtype_override="int64")


def _same_warps(n: int, k: int, w: int, halves: int = 1) -> bool:
    """Whether ``fewest_rounds`` picks the tensor-core rule's own warps for a layer of ``n``
    outputs (all halves) at ``w`` rows: no other variant to time."""
    most, fewest = TensorCoreLinearRule(), TensorCoreLinearRule(fewest_rounds=True)
    tiles = most.column_tiles(n // halves, w, halves) if w % 16 == 0 else None
    return tiles is None or (most.slices(w, halves, k, tiles)
                             == fewest.slices(w, halves, k, tiles))


def _first(func, rules, target):
    with target:
        for rule in rules:
            sch = rule.apply(func, target, False)
            if sch is not None:
                sch = sch[0] if isinstance(sch, list | tuple) else sch
                return rule_name(rule), sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return None


def kernels(target, dtypes=DTYPES, kinds=KINDS, widths=WIDTHS):
    """One record per (kind, dtype, W, variant) that a rule schedules: its ``name`` in the
    library (dlight_nt above W = 1 is one symbolic kernel for every W), ``rule``, ``func``
    and the argument shapes (``weight_dtype``: uint8 for the quantized blocks)."""
    shape, _ = read_model_shape("smollm2")
    g = c.dlight.gpu
    dlight = [g.Matmul(), g.GEMV(), g.LowBatchGEMV(), g.Reduction(), g.GeneralReduction(),
              g.Fallback()]
    out = []
    for dtype in dtypes:
        for kind in kinds:
            n, k, res = shape.linear_dims(kind)
            for w in widths:
                if quant.is_quant(dtype):
                    packed = quant.linear_quant(n, k, dtype, res, rows=w)
                    choices = {"column": (packed, [QuantLinearRule()]),
                               "splitk": (packed, [QuantSplitKLinearRule()]),
                               "splitk16": (packed, [QuantSplitKLinearRule(cols=16)]),
                               "tensorcore": (packed, [QuantTensorCoreLinearRule()]),
                               "tensorcore2": (packed, [QuantTensorCoreLinearRule(tiles=2)])}
                else:
                    packed = ops.linear(n, k, dtype, res, rows=w)
                    nt_rows = w if w == 1 else c.tir.Var("w", "int64")
                    choices = {"column": (packed, [LinearColumnRule()]),
                               "splitk": (packed, [SplitKLinearRule()]),
                               "tensorcore": (packed, [TensorCoreLinearRule()]),
                               "tensorcore_step": (packed, [TensorCoreLinearRule(
                                   prefetch=False)]),
                               "tensorcore_rounds": (packed, [TensorCoreLinearRule(
                                   fewest_rounds=True)]),
                               "tensorcore2": (packed, [TensorCoreLinearRule(tiles=2)]),
                               "tensorcore4": (packed, [TensorCoreLinearRule(tiles=4)]),
                               "dlight": (packed, dlight),
                               "dlight_nt": (nt_linear(n, k, dtype, res, nt_rows),
                                             [g.GEMV() if w == 1 else g.LowBatchGEMV()])}
                for variant, (func, rules) in choices.items():
                    fixed = {"tensorcore2": 2, "tensorcore4": 4}.get(variant)
                    if fixed and TensorCoreLinearRule().column_tiles(n, w) == fixed:
                        continue  # the rule's own choice (the LM head's J = 4)
                    if variant == "tensorcore_rounds" and _same_warps(n, k, w):
                        continue  # the rule's own warps already stage in the fewest rounds
                    got = _first(func, rules, target)
                    if got is None:
                        continue
                    sym = variant == "dlight_nt" and w > 1
                    name = f"{variant}_{_SHORT[dtype]}_{kind}_" + ("wsym" if sym else f"w{w}")
                    if quant.is_quant(dtype):
                        wshape, wdtype = list(quant.quant_packed_shape(n, k, dtype)), "uint8"
                    elif variant == "dlight_nt":
                        wshape, wdtype = [n, k], dtype
                    else:
                        wshape, wdtype = list(ops.packed_shape(n, k)), dtype
                    out.append({"name": name, "kind": kind, "n": n, "k": k, "residual": res,
                                "w": w, "dtype": dtype, "variant": variant, "rule": got[0],
                                "func": got[1], "weight_shape": wshape,
                                "weight_dtype": wdtype})
    return out


#: The chains FuseLinearChains fuses in SmolLM2, per linear kind: the gated activation after
#: the linear (a norm precedes both).
CHAINS = {"qkv": None, "gate_up": "silu"}


def chain_kernels(target, widths=WIDTHS) -> list[dict]:
    """SmolLM2's fused chains (float16 weights, and q4_1 blocks) at each W: ``role``
    ``fused`` (the fused linear, gpu.SplitKLinear or gpu.QuantSplitKLinear), ``norm``
    (``rms_norm``, gpu.RMSNorm) and ``act`` (``silu_mul``, gpu.PerStageThread): ``name``,
    ``kind``, ``dtype``, ``w``, ``n``, ``k``, ``eps``, ``activation``, ``cols``, ``rule``,
    ``func``. A fused kernel replaces the norm, the ``splitk`` linear of its dtype and (gated)
    the activation. At W = 16 and 64 the float16 chains also come on tensor cores
    (``fusedtc_f16_*``, gpu.TensorCoreLinear; ``fusedtcstep_*``: a k step at a time;
    ``fusedtcrounds_*``: the warps that stage x in the fewest rounds, where they differ;
    ``fusedtc2_*``, ``fusedtc4_*``: 2 and 4 column tiles a block, ``cols`` 32 and 64,
    where the accumulators fit). The gated q4_1 kernel also comes with 16
    columns a block (``fused16_q41_gate_up_w*``: 96 blocks, not 48, at half-sector reads),
    and the q4_1 chains at W = 16 and 64 on tensor cores (``fusedtc_q41_*``,
    gpu.QuantTensorCoreLinear).

    The fused gate_up's thread holds a gate and an up column, so the rule's 16 columns a
    block (a 32-byte sector of float16) make 96 blocks of its 1536 outputs, half the
    unfused kernel's 192 and fewer than an H200's 132 SMs; ``cols = 8`` (half-sector reads,
    192 blocks) is the alternative to time."""
    shape, _ = read_model_shape("smollm2")
    e, f, eps = shape.hidden, shape.intermediate, 1e-5
    out = []
    for w in widths:
        for kind, act in CHAINS.items():
            n, k, _ = shape.linear_dims(kind)
            func = ops.linear(n, k, "float16", rows=w, norm_eps=eps, activation=act)
            for rule_obj, tag, cols in ((SplitKLinearRule(), "", 16),
                                        *(((SplitKLinearRule(sector_bytes=16), "8", 8),)
                                          if act else ()),
                                        (TensorCoreLinearRule(), "tc", 16),
                                        (TensorCoreLinearRule(prefetch=False), "tcstep", 16),
                                        *(((TensorCoreLinearRule(fewest_rounds=True),
                                            "tcrounds", 16),)
                                          if not _same_warps(n, k, w, 2 if act else 1)
                                          else ()),
                                        (TensorCoreLinearRule(tiles=2), "tc2", 32),
                                        (TensorCoreLinearRule(tiles=4), "tc4", 64)):
                got = _first(func, [rule_obj], target)
                if got is None:  # the tensor cores: W = 16 and 64 only
                    continue
                out.append({"name": f"fused{tag}_f16_{kind}_w{w}", "role": "fused",
                            "kind": kind, "dtype": "float16", "w": w, "n": n, "k": k,
                            "eps": eps, "activation": act, "cols": cols,
                            "rule": got[0], "func": got[1]})
            qfunc = quant.linear_quant(n, k, "q4_1", rows=w, norm_eps=eps, activation=act)
            for rule_obj, tag, cols in ((QuantSplitKLinearRule(), "", 32),
                                        *(((QuantSplitKLinearRule(cols=16), "16", 16),)
                                          if act else ()),
                                        (QuantTensorCoreLinearRule(), "tc", 16)):
                got = _first(qfunc, [rule_obj], target)
                if got is None:  # the tensor cores: W = 16 and 64 only
                    continue
                rule, sched = got
                out.append({"name": f"fused{tag}_q41_{kind}_w{w}", "role": "fused",
                            "kind": kind, "dtype": "q4_1", "w": w, "n": n, "k": k,
                            "eps": eps, "activation": act, "cols": cols, "rule": rule,
                            "func": sched})
        for role, func, rules, n in (
                ("norm", ops.rms_norm(e, eps, rows=w), [RMSNormRule()], e),
                ("act", ops.silu_mul(f, rows=w), [PerStageThreadRule()], 2 * f)):
            rule, sched = _first(func, rules, target)
            out.append({"name": f"{role}_w{w}", "role": role, "kind": role, "w": w, "n": n,
                        "k": 0, "eps": eps, "activation": "silu" if role == "act" else None,
                        "rule": rule, "func": sched})
    return out


def attention_kernels() -> list[dict]:
    """SmolLM2's ``tree_attention`` (float16 cache) per :data:`ATTN_VARIANTS`: ``name``,
    ``groups`` (as built), ``fan_in``, the shape arguments and ``func`` (GPU form)."""
    shape, _ = read_model_shape("smollm2", "float16")
    args = [shape.heads, shape.kv_heads, shape.head_dim, shape.layers, shape.max_context]
    out = []
    for groups, fan_in in ATTN_VARIANTS:
        func = script_ops.for_gpu(script_ops.tree_attention(*args, kv_dtype="float16",
                                                            groups=groups, fan_in=fan_in))
        built = json.loads(str(func.attrs[script_ops.ARGS_ATTR]))["groups"]
        tag = "" if fan_in == script_ops.TREE_REDUCE_FAN_IN else f"_f{fan_in}"
        out.append({"name": f"tree_attention_g{built}{tag}", "groups": built,
                    "fan_in": fan_in, "args": args, "kv_dtype": "float16", "func": func})
    return out


def topk_kernels(target) -> list[dict]:
    """The Medusa draft's top-k at SmolLM2's shipped draft (its heads' rows, its draft
    vocabulary; and the whole vocabulary): ``script_ops.topk_rows`` (the CUDA-graph build's,
    with and without the fused vocabulary map) and TVM's GPU ``topk`` (what the draft ran
    before: ``DispatchSortScan``'s sort). ``name``, ``impl``, ``rows``, ``n``, ``k``,
    ``mapped``, ``func`` (GPU form)."""
    from hetcomp.frontend.llama import MEDUSA_TOPK
    from hetcomp.speculative.medusa import MedusaHeads

    heads = MedusaHeads.load(os.path.join(os.path.dirname(script_ops.__file__), "..", "data",
                                          "smollm2-medusa.npz"))
    shape, _ = read_model_shape("smollm2", "float16")
    rows, k = heads.w.shape[0], MEDUSA_TOPK
    out = []
    for n, mapped in ((len(heads.vocab), True), (len(heads.vocab), False), (shape.vocab, False)):
        func = script_ops.for_gpu(script_ops.topk_rows(n, k, rows, mapped=mapped))
        out.append({"name": f"topk_script_n{n}{'_mapped' if mapped else ''}", "impl": "script",
                    "rows": rows, "n": n, "k": k, "mapped": mapped, "func": func})
    for n in sorted({len(heads.vocab), shape.vocab}):
        out.append({"name": f"topk_tvm_n{n}", "impl": "tvm", "rows": rows, "n": n, "k": k,
                    "mapped": False, "func": _tvm_topk(rows, n, k, target)})
    return out


def _tvm_topk(rows: int, n: int, k: int, target):
    """The kernel TVM makes of ``relax.op.topk`` on ``[rows, n]`` through hetcomp's own
    scheduling pipeline (``DispatchSortScan``'s GPU sort, then our rules): what the draft
    of the CUDA-graph build ran before ``script_ops.topk_rows``."""
    from hetcomp.passes.pipeline import scheduling_pipeline

    bb = c.relax.BlockBuilder()
    x = c.relax.Var("logits", c.TensorType((rows, n), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            top = bb.emit_output(c.relax.op.topk(x, k=k, axis=-1, ret_type="indices"))
        bb.emit_func_output(top)
    with target:
        mod = scheduling_pipeline(target)(bb.get())
    funcs = [f for gv, f in mod.functions_items() if isinstance(f, c.tir.PrimFunc)]
    assert len(funcs) == 1, [gv.name_hint for gv in mod.get_global_vars()]
    return funcs[0]


def launch_shape(func) -> str:
    """``blocks x threads`` of each kernel launch in ``func`` (thread-bound loop extents)."""
    launches, cur = [], {}
    for tag_extent in re.findall(r'T\.thread_binding\((.+?), thread="(\w+\.\w)"\)',
                                 func.script()):
        extent, tag = tag_extent
        value = re.sub(r"T\.int64\((\d+)\)", r"\1", extent.strip())
        if tag in cur and cur[tag] != value:  # a new launch
            launches.append(cur)
            cur = {}
        cur.setdefault(tag, value)
    launches.append(cur)
    text = []
    for launch in launches:
        blocks = "*".join(v for t, v in sorted(launch.items()) if t.startswith("blockIdx"))
        threads = "*".join(v for t, v in sorted(launch.items()) if t.startswith("threadIdx"))
        text.append(f"{blocks or 1} x {threads or 1}")
    return ", ".join(dict.fromkeys(text))


def ptxas(source: str, arch: str = "sm_90") -> dict:
    """Max registers, stack bytes and spill bytes over the kernels of a CUDA source."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cu")
        with open(path, "w") as fh:
            fh.write(source)
        proc = subprocess.run(["nvcc", "--cubin", f"-arch={arch}", "--resource-usage", "-o",
                               os.path.join(tmp, "k.cubin"), path],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", log)]
    stack = [int(v) for v in re.findall(r"(\d+) bytes stack frame", log)]
    spills = [int(a) + int(b) for a, b in
              re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    return {"registers": max(regs), "stack": max(stack), "spills": max(spills)}


def cuda_source(func, target) -> str:
    lib = c.compile(c.IRModule({"main": func.with_attr("global_symbol", "main")}),
                    target=target)
    return lib.mod.imports[0].inspect_source()


def table(dtype: str, arch: str) -> str:
    target = c.Target({"kind": "cuda", "arch": arch})
    lines = [(f"SmolLM2 decode linears, weights {dtype}, CUDA for {arch} "
             f"(`python benchmarks/gemv_kernels.py table --dtype {dtype}`)."), "",
             ("| kernel (n x k) | W | variant | rule | CUDA bytes | regs | stack | spills "
             "| blocks x threads |"), "|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for rec in kernels(target, (dtype,)):
        if rec["name"] in seen:
            continue
        seen.add(rec["name"])
        src = cuda_source(rec["func"], target)
        use = ptxas(src, arch)
        width = "sym" if rec["name"].endswith("wsym") else rec["w"]
        res = " +r" if rec["residual"] else ""
        lines.append(f"| {rec['kind']} {rec['n']}x{rec['k']}{res} | {width} | {rec['variant']} "
                     f"| {rec['rule']} | {len(src)} | {use['registers']} | {use['stack']} "
                     f"| {use['spills']} | {launch_shape(rec['func'])} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def norms(arch: str) -> str:
    """The compile-side table of the RMSNorm kernels: SmolLM2's ``rms_norm`` (hidden 576)
    and Gemma 3 270M's residual norm ``rms_norm_res`` (640) under gpu.PerStageThread (the
    rule before) and gpu.RMSNorm."""
    target = c.Target({"kind": "cuda", "arch": arch})
    lines = [(f"RMSNorm kernels, CUDA for {arch} (`python benchmarks/gemv_kernels.py norms`)."),
             "", ("| kernel (hidden) | W | rule | launches | CUDA bytes | regs | stack | spills "
                  "| blocks x threads |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, hidden, res in (("rms_norm", 576, False), ("rms_norm_res", 640, True)):
        for w in WIDTHS:
            func = ops.rms_norm(hidden, 1e-6, rows=w, residual=res)
            for rule in (PerStageThreadRule(), RMSNormRule()):
                got = _first(func, [rule], target)
                src = cuda_source(got[1], target)
                use = ptxas(src, arch)
                lines.append(f"| {name} ({hidden}) | {w} | {got[0]} "
                             f"| {src.count('__global__') // 2} | {len(src)} "
                             f"| {use['registers']} | {use['stack']} | {use['spills']} "
                             f"| {launch_shape(got[1])} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines) + "\n"


def build(out: str, arch: str, **subset) -> str:
    """The kit for ``run.py gemv``: lib.so, kernels.cu (its CUDA source), kernels.json,
    kcache/ (see the module doc); ``subset``: :func:`kernels`' dtypes, kinds, widths."""
    target = c.Target({"kind": "cuda", "arch": arch})
    d = os.path.join(out, "gemv")
    # An earlier kit's fatbins are never read again (the cache is keyed by the source's
    # hash) and every byte counts against the device call's 64 MiB.
    shutil.rmtree(os.path.join(d, "kcache"), ignore_errors=True)
    os.makedirs(d, exist_ok=True)
    every = kernels(target, **subset)
    attention = attention_kernels()
    topk = topk_kernels(target)
    chains = chain_kernels(target, subset.get("widths", WIDTHS))
    recs = {r["name"]: r for r in every + attention + topk + chains}  # dlight_nt's sym. once
    mod = c.IRModule({name: r["func"].with_attr("global_symbol", name)
                      for name, r in recs.items()})
    lib = c.compile(mod, target=target)
    lib.export_library(os.path.join(d, "lib.so"))
    # The host's nvcc callback (hetcomp._tvm) finds this fatbin by the source's hash.
    source = lib.mod.imports[0].inspect_source()
    env = {"HETCOMP_KERNEL_CACHE": os.path.join(d, "kcache"), "HETCOMP_CUDA_ARCH": arch}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _tvm._nvcc_fatbin(source)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    with open(os.path.join(d, "kernels.cu"), "w") as fh:
        fh.write(source)
    records = [{k: v for k, v in r.items() if k != "func"} for r in every]
    attn = [{k: v for k, v in r.items() if k != "func"} for r in attention]
    tops = [{k: v for k, v in r.items() if k != "func"} for r in topk]
    chain = [{k: v for k, v in r.items() if k != "func"} for r in chains]
    with open(os.path.join(d, "kernels.json"), "w") as fh:
        json.dump({"arch": arch, "kernels": records, "attention": attn,
                   "attention_cache": list(ATTN_CACHE), "topk": tops, "chains": chain},
                  fh, indent=1)
    return d


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["table", "norms", "build"])
    ap.add_argument("out", nargs="?", help="build: the kit folder")
    ap.add_argument("--out", dest="out_file", help="table: write it here")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--cuda-arch", default="sm_90")
    args = ap.parse_args()
    if args.what in ("table", "norms"):
        text = (table(args.dtype, args.cuda_arch) if args.what == "table"
                else norms(args.cuda_arch))
        if args.out_file:
            with open(args.out_file, "w") as fh:
                fh.write(text)
        else:
            print(text)
    else:
        print(build(args.out, args.cuda_arch))
        return _fits_a_call(args.out)
    return 0


def _fits_a_call(folder: str) -> int:
    """Say the kit folder's size beside the working tree; 1 if a device call cannot carry
    both (the kit then needs a folder, and a call, of its own)."""
    from cuda_host.bundle import CALL_BYTES, _tree_bytes

    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)
    total = size + _tree_bytes()
    print(f"{folder}: {size / 2**20:.1f} MiB, {total / 2**20:.1f} MiB with the working tree "
          f"(a call carries {CALL_BYTES / 2**20:.0f})", file=sys.stderr)
    if total > CALL_BYTES:
        print(f"{folder} is too large for one device call: build the kit into a folder of "
              "its own (RUNBOOK: .dev/d)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
