"""``gpu.SplitKLinear``, the CUDA schedule of the float decode linears (static widths). No GPU
here: the schedule's arithmetic runs on the CPU with its thread-bound loops made serial, the
CUDA build is checked by TVM's codegen and nvcc's register report, the model by a tiny
`compile --target cuda`, and the GPU host's timing kit by a dry run."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.kernels import ops
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.gpu import LinearColumnRule, SplitKLinearRule, gpu_rules
from hetcomp.testing import TINY, compile_tiny_cuda, fused_linear_reference
from hetcomp.testing.gpu import assert_no_stack, serial_threads, thread_bindings

c = _tvm.compiler()
CUDA = c.Target({"kind": "cuda", "arch": "sm_90"})
HOST = c.Target({"kind": "llvm"})
N, K = 96, 128
# SmolLM2-135M's decode linears (n, k, residual): qkv, o, gate_up, down, LM head.
SMOLLM2 = [(960, 576, False), (576, 576, True), (3072, 576, False), (576, 1536, True),
           (49152, 576, False)]
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BENCH = os.path.join(ROOT, "benchmarks")


def _schedule(dtype, rows, residual=False, n=N, k=K):
    sch = SplitKLinearRule().apply(ops.linear(n, k, dtype, residual, rows=rows), CUDA, False)
    assert sch is not None
    return sch.mod["main"]


def _serial(func):
    """``func`` with its thread-bound loops as serial loops: the same schedule, on the CPU.

    Sound for this schedule because its reduction across threads is not a thread-bound
    reduction (``tvm_thread_allreduce``, whose lowering needs the threads): each thread's
    partial sums (one per row, for its K slice) go to a shared buffer indexed by the slice,
    and a separate stage sums the slices of each output. Run serially, the first loop nest
    fills every slice's partials and the second sums them: the same additions in the same
    order. What serial execution cannot check (the barrier between the two stages, which
    TVM inserts for a shared buffer) is checked on the CUDA source below."""
    return serial_threads(func, 5, "partials over (blockIdx.x, threadIdx.x, threadIdx.y), sums over "
                          "(x, y)")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows", [1, 4, 16, 64])
def test_schedule_matches_numpy(dtype, rows):
    """Each width with and without the residual add, the float16 weights widened in the
    kernel; 64 rows take the 128-thread shape (partials within 32 KB of shared memory)."""
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((N, K)).astype(dtype)
    x = rng.standard_normal((rows, K)).astype("float32")
    r = rng.standard_normal((rows, N)).astype("float32")
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    for residual in (False, True):
        func = _schedule(dtype, rows, residual)
        lib = c.compile(c.IRModule({"main": _serial(func)}), target=HOST)
        y = _tvm.tensor(np.zeros((rows, N), "float32"))
        lib["main"](_tvm.tensor(x), _tvm.tensor(ops.pack_linear_weight(w, dtype)),
                    *([_tvm.tensor(r)] if residual else []), y)
        np.testing.assert_allclose(y.numpy(), ref + r if residual else ref, rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("n,k,residual", SMOLLM2)
def test_applies_to_smollm2_linears_with_k_over_threads(n, k, residual):
    """gpu_rules picks the rule for every SmolLM2 linear at static widths (not dlight, not
    the column rule; float16 at 16-64 rows goes to the tensor cores,
    tests/schedules/test_gpu_tensor_core.py); the K slices are a thread axis (threadIdx.y,
    2 or more), and the grid has at least a block per 32 columns (the column rule had one
    per 64)."""
    for dtype, rows in (("float16", 1), ("float32", 1), ("float32", 64)):
        func = ops.linear(n, k, dtype, residual, rows=rows).with_attr("global_symbol", "main")
        with CUDA:
            mod = ApplyRules(*gpu_rules())(c.IRModule({"main": func}))
        assert str(mod["main"].attrs[RULE_ATTR]) == "gpu.SplitKLinear"
        bind = dict(thread_bindings(mod["main"]))
        assert bind["threadIdx.y"] >= 2 and bind["blockIdx.x"] >= n // 32
        # The partials' K slice loop is the threadIdx.y loop around the accumulation;
        # the final sum reduces over that slice axis.
        text = mod["main"].script()
        assert (text.index('thread="threadIdx.y"') < text.index('"matmul_rf_update"')
                < text.index('"matmul_update"'))
        assert re.search(r'sblock\("matmul_update"\):\s+vk_1 = T\.axis\.reduce', text)
        assert 'scope="shared"' in text


def test_symbolic_width_keeps_the_column_rule():
    func = ops.linear(576, 576, "float32", rows=None)
    assert SplitKLinearRule().apply(func, CUDA, False) is None
    assert LinearColumnRule().apply(func, CUDA, False) is not None


def test_cuda_source_has_one_barrier_between_partials_and_sums():
    """One __syncthreads between the shared partials and their sums, for any width (a
    cross-thread reduction per row would take several per row)."""
    for rows in (1, 16):
        lib = c.compile(c.IRModule({"main": _schedule("float16", rows, True, 576, 576)}),
                        target=CUDA)
        src = lib.mod.imports[0].inspect_source()
        assert src.count("__syncthreads()") == 1 and "__shared__" in src
        assert "tvm_thread_allreduce" not in src and len(src) < 8_000


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("dtype,rows", [("float16", 1), ("float32", 16), ("float16", 64),
                                        ("float32", 64)])
def test_nvcc_keeps_accumulators_in_registers(tmp_path, arch, dtype, rows):
    """ptxas on SmolLM2's down projection (the longest K, with the residual): no stack
    frame, no spills, up to 64 rows, for Jetson Orin (sm_87) and Hopper (sm_90)."""
    assert_no_stack(_schedule(dtype, rows, True, 576, 1536), arch, tmp_path)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compile_for_cuda_uses_split_k(tmp_path, dtype):
    """`compile --target cuda` of a tiny model: the decode and verify linears (static widths)
    are gpu.SplitKLinear's, prefill's (symbolic width) gpu.LinearColumn's, the float16
    ones of the static 64-row prefill chunk gpu.TensorCoreLinear's; nothing else schedules
    a linear; every RMSNorm (any width) is gpu.RMSNorm's."""
    kernels = compile_tiny_cuda(str(tmp_path / "art"), dtype)["kernels"]
    linear = [k for k in kernels if k["name"].startswith("linear")]
    tensor_cores = {k["name"] for k in linear if k["rule"] == "gpu.TensorCoreLinear"}
    assert tensor_cores == ({k["name"] for k in linear if k["name"].endswith("_w64")}
                            if dtype == "float16" else set())
    for k in linear:  # each kernel its own rule, not only each rule some kernel
        static = re.search(r"_w\d+$", k["name"]) is not None
        assert k["rule"] == ("gpu.TensorCoreLinear" if k["name"] in tensor_cores else
                             "gpu.SplitKLinear" if static else "gpu.LinearColumn"), k
    assert {k["rule"] for k in linear} >= {"gpu.SplitKLinear", "gpu.LinearColumn"}
    norms = [k for k in kernels if k["name"].startswith("rms_norm")]
    assert norms and {k["rule"] for k in norms} == {"gpu.RMSNorm"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_gemv_kit_builds_and_dry_runs(tmp_path):
    """The GPU host's timing kit (benchmarks/gemv_kernels.py build, a subset): every variant
    (float16 and q4_1 weights) is in the library, the fatbin made here is found under the hash of the library's own
    CUDA source (so the host compiles nothing), and `run.py gemv --dry` makes each
    kernel's arguments, the tree_attention variants' and the draft top-k's too."""
    sys.path.insert(0, BENCH)
    try:
        import gemv_kernels
    finally:
        sys.path.remove(BENCH)
    stale = tmp_path / "gemv" / "kcache" / "0123.fatbin"  # an earlier kit's
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    kit = gemv_kernels.build(str(tmp_path), "sm_90", dtypes=("float16", "q4_1"),
                             kinds=("down",), widths=(1, 16))
    assert len(os.listdir(os.path.join(kit, "kcache"))) == 1 and not stale.exists()
    with open(os.path.join(kit, "kernels.json")) as fh:
        recs = json.load(fh)["kernels"]
    assert {(r["dtype"], r["variant"], r["w"]) for r in recs} == {
        *((d, v, w) for d, vs in (("float16", gemv_kernels.VARIANTS),
                                  ("q4_1", ("column", "splitk", "splitk16")))
          for v in vs for w in (1, 16)),
        *(("float16", v, 16) for v in ("tensorcore", "tensorcore_step", "tensorcore2",
                                      "tensorcore4")),
        ("q4_1", "tensorcore", 16), ("q4_1", "tensorcore2", 16)}
    assert {r["rule"] for r in recs if r["dtype"] == "q4_1"} == {
        "gpu.QuantLinear", "gpu.QuantSplitKLinear", "gpu.QuantTensorCoreLinear"}
    # Where fewer warps stage x in fewer rounds (o at W = 64), that schedule is timed too.
    o64 = {r["variant"]: r for r in gemv_kernels.kernels(CUDA, ("float16",), ("o",),
                                                         (64,))}
    assert {"tensorcore", "tensorcore_rounds"} <= set(o64)
    assert [dict(thread_bindings(o64[v]["func"]))["threadIdx.y"]
            for v in ("tensorcore", "tensorcore_rounds")] == [4, 1]
    assert {r["weight_dtype"] for r in recs if r["dtype"] == "q4_1"} == {"uint8"}
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "cuda_host", "run.py"), "gemv",
                           str(tmp_path), str(tmp_path / "out"), "--dry"],
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "out" / "gemv.json") as fh:
        out = json.load(fh)
    assert [r["name"] for r in out["kernels"]] and len(out["kernels"]) == len(recs)
    # tree_attention with one group of 64 threads and with four (256 threads), both in the
    # library, each at every width and cache length
    with open(os.path.join(kit, "kernels.cu")) as fh:
        source = fh.read()
    assert {r["name"] for r in out["attention"]} == {"tree_attention_g1", "tree_attention_g4",
                                                     "tree_attention_g4_f2"}
    assert all(f"{r['name']}_kernel" in source for r in out["attention"])
    assert len(out["attention"]) == 3 * 4 * len(gemv_kernels.ATTN_CACHE)
    # The draft's top-k: ours (with and without the vocabulary map) and TVM's sort, at the
    # shipped draft's vocabulary and at the whole one.
    tops = {(r["impl"], r["n"], r["mapped"]) for r in out["topk"]}
    assert tops == {("script", 8192, True), ("script", 8192, False), ("script", 49152, False),
                    ("tvm", 8192, False), ("tvm", 49152, False)}
    assert all(f"{r['name']}_kernel" in source for r in out["topk"])
    # The fused chains and the kernels they replace, at the kit's widths.
    assert {(r["role"], r["kind"], r["w"]) for r in out["chains"]} == {
        (role, kind, w) for w in (1, 16) for role, kind in (
            ("fused", "qkv"), ("fused", "gate_up"), ("norm", "norm"), ("act", "act"))}
    assert {(r["dtype"], r["rule"], r["w"]) for r in out["chains"] if r["role"] == "fused"} == {
        *((d, rule, w) for d, rule in (("float16", "gpu.SplitKLinear"),
                                       ("q4_1", "gpu.QuantSplitKLinear")) for w in (1, 16)),
        ("float16", "gpu.TensorCoreLinear", 16), ("q4_1", "gpu.QuantTensorCoreLinear", 16)}
    assert {r["cols"] for r in out["chains"] if r["rule"] == "gpu.TensorCoreLinear"} == {
        16, 32, 64}  # the rule's choice, and 2 and 4 column tiles a block
    assert all(f"{r['name']}_kernel" in source for r in out["chains"])


# The fused forms (FuseLinearChains): a norm before, a gated activation after, or both.
FUSED = [(1e-5, None), (None, "silu"), (1e-6, "gelu_tanh")]


def _run_fused(func, rows, eps, act, dtype, seed, n=192, k=128):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)).astype("float32")
    g = rng.standard_normal(k).astype("float32")
    w = rng.standard_normal((n, k)).astype(dtype)
    lib = c.compile(c.IRModule({"main": serial_threads(func, len(thread_bindings(func)),
                                                       "every thread loop")}), target=HOST)
    y = _tvm.tensor(np.zeros((rows, n // 2 if act else n), "float32"))
    args = [x, *([g] if eps is not None else []), ops.pack_linear_weight(w, dtype)]
    lib["main"](*[_tvm.tensor(a) for a in args], y)
    return y.numpy(), fused_linear_reference(x, w, g if eps is not None else None, eps, act)


@pytest.mark.parametrize("eps,act", FUSED, ids=["norm", "silu", "norm_gelu"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows", [1, 4, 16, 64])
def test_fused_split_k_matches_numpy(eps, act, dtype, rows):
    """The split-K schedule of each fused form, its thread loops serial on the CPU (sound as
    for the plain kernel: the squares' and the matmul's partials are reduced across slices
    by a later stage, not by a thread-bound reduction), against numpy; rows fewer than the
    block's columns or slices (W = 1, 4) leave threads idle under predicates."""
    func = ops.linear(192, 128, dtype, rows=rows, norm_eps=eps, activation=act)
    sch = SplitKLinearRule().apply(func, CUDA, False)
    got, want = _run_fused(sch.mod["main"], rows, eps, act, dtype, seed=rows)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("eps,act", FUSED, ids=["norm", "silu", "norm_gelu"])
@pytest.mark.parametrize("rows", [3, None])
def test_fused_column_rule_matches_numpy(eps, act, rows):
    """The column rule's form (the fallback where split K does not apply, and any symbolic
    width): a thread per output column, the norm's squares summed serially in it."""
    func = ops.linear(192, 128, "float16", rows=rows, norm_eps=eps, activation=act)
    sch = LinearColumnRule().apply(func, CUDA, False)
    got, want = _run_fused(sch.mod["main"], rows or 5, eps, act, "float16", seed=7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_fused_cuda_source_keeps_one_barrier():
    """SmolLM2's fused gate_up (norm, SiLU): the squares' partials are written before the
    one barrier the matmul's partials need, so the kernel still has one; each thread keeps
    its outputs' gate and up sums in registers from the slices' sum to the epilogue."""
    for rows in (1, 16, 64):
        func = SplitKLinearRule().apply(ops.linear(3072, 576, "float16", rows=rows,
                                                   norm_eps=1e-5, activation="silu"),
                                        CUDA, False).mod["main"]
        src = c.compile(c.IRModule({"main": func}), target=CUDA).mod.imports[0].inspect_source()
        assert src.count("__syncthreads()") == 1 and "tvm_thread_allreduce" not in src
        # a thread-local array (ptxas keeps it in registers: the nvcc test below)
        assert re.search(r"\n  alignas\(64\) float matmul_local_ptr\[\d+\];", src)
        assert len(re.findall(r"__global__ void __launch_bounds__\(\d+\) \w+\(.*\) \{", src)) == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("rows", [1, 64])
def test_nvcc_keeps_fused_accumulators_in_registers(tmp_path, arch, rows):
    """ptxas on SmolLM2's fused gate_up (the most registers: gate and up sums per row)."""
    func = SplitKLinearRule().apply(ops.linear(3072, 576, "float16", rows=rows, norm_eps=1e-5,
                                               activation="silu"), CUDA, False).mod["main"]
    assert_no_stack(func.with_attr("global_symbol", "main"), arch, tmp_path)


def test_compile_for_cuda_fuses_unless_told_not_to(tmp_path):
    """`compile --target cuda` runs FuseLinearChains: a tiny model's verify step has three
    kernels a layer fewer than with `--no-fuse`, the fused linears scheduled by split K (by
    the tensor cores in the 64-row prefill chunk)."""
    got = {fuse: compile_tiny_cuda(str(tmp_path / f"art{fuse}"), fuse_linears=fuse)
           for fuse in (None, False)}
    assert got[None]["fused_linears"] and not got[False]["fused_linears"]
    for fn in ("verify_w1", "prefill_w64"):
        assert (got[False]["launches"][fn]["kernels"] - got[None]["launches"][fn]["kernels"]
                == 3 * TINY.num_layers)
    fused = {k["name"]: k["rule"] for k in got[None]["kernels"] if k["name"].startswith("linear_norm")}
    assert set(fused) == {"linear_norm_n128_k64_w1", "linear_norm_silu_n192_k64_w1",
                          "linear_norm_n128_k64_w64", "linear_norm_silu_n192_k64_w64"}
    assert {name: rule for name, rule in fused.items() if name.endswith("_w1")} == {
        "linear_norm_n128_k64_w1": "gpu.SplitKLinear",
        "linear_norm_silu_n192_k64_w1": "gpu.SplitKLinear"}
    assert {rule for name, rule in fused.items() if name.endswith("_w64")} == {
        "gpu.TensorCoreLinear"}


@pytest.mark.parametrize("eps", [1e-5, None], ids=["norm_bias", "bias"])
@pytest.mark.parametrize("rule,rows", [(SplitKLinearRule(), 1), (SplitKLinearRule(), 16),
                                       (LinearColumnRule(), None)],
                         ids=["splitk_w1", "splitk_w16", "column_wsym"])
def test_fused_bias_matches_numpy(eps, rule, rows):
    """Qwen2's qkv: the q/k/v bias added in the fused kernel's epilogue (after the norm's
    scale), under both rules, thread loops serial."""
    rng = np.random.default_rng(11)
    n, k, w = 96, 64, rows or 5
    x = rng.standard_normal((w, k)).astype("float32")
    g, b = rng.standard_normal(k).astype("float32"), rng.standard_normal(n).astype("float32")
    wt = rng.standard_normal((n, k)).astype("float16")
    func = rule.apply(ops.linear(n, k, "float16", rows=rows, norm_eps=eps, bias=True), CUDA,
                      False).mod["main"]
    lib = c.compile(c.IRModule({"main": serial_threads(func, len(thread_bindings(func)),
                                                       "every thread loop")}), target=HOST)
    y = _tvm.tensor(np.zeros((w, n), "float32"))
    args = [x, *([g] if eps else []), ops.pack_linear_weight(wt, "float16"), b]
    lib["main"](*[_tvm.tensor(a) for a in args], y)
    np.testing.assert_allclose(y.numpy(), fused_linear_reference(x, wt, g if eps else None, eps,
                                                                 bias=b), rtol=1e-5, atol=1e-4)
