"""``gpu.QuantSplitKLinear``, the CUDA schedule of the block-quantized decode linears (static
widths): k blocks split over threadIdx.y, partials summed in shared memory. No GPU here: the
schedule's arithmetic runs on the CPU with its thread-bound loops made serial, the CUDA build
is checked by TVM's codegen and nvcc's register report, the model by `compile --target
cuda` (tests/schedules/test_gpu_quant.py)."""

import re
import shutil

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.kernels import quant
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.gpu import QuantLinearRule, QuantSplitKLinearRule, gpu_rules
from hetcomp.testing import fused_linear_reference
from hetcomp.testing.gpu import assert_no_stack, serial_threads, thread_bindings

c = _tvm.compiler()
CUDA = c.Target({"kind": "cuda", "arch": "sm_90"})
HOST = c.Target({"kind": "llvm"})
FORMATS = ("q4_0", "q4_1", "q8_0")
# 96 columns (3 blocks of 32) by 6 k blocks: 6 slices, or 3 at W = 64 (the 128-thread cap).
N, K = 96, 192
# SmolLM2-135M's decode linears (n, k, residual): qkv, o, gate_up, down, LM head.
SMOLLM2 = [(960, 576, False), (576, 576, True), (3072, 576, False), (576, 1536, True),
           (49152, 576, False)]


def _schedule(qtype, rows, residual=False, n=N, k=K):
    sch = QuantSplitKLinearRule().apply(quant.linear_quant(n, k, qtype, residual, rows=rows),
                                        CUDA, False)
    assert sch is not None
    return sch.mod["main"]


def _serial(func):
    """``func`` with its thread-bound loops as serial loops: the same schedule, on the CPU
    (sound as for gpu.SplitKLinear, tests/schedules/test_gpu_linear.py: no thread-bound
    reduction, the slices' partials go to a shared buffer a second stage sums)."""
    return serial_threads(func, 5, "partials over (blockIdx.x, threadIdx.x, threadIdx.y), sums over "
                          "(x, y)")


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 4, 16, 64])
def test_schedule_matches_numpy(qtype, rows):
    """W = 1, 2 the factored kernel (raw-quant block sums per slice), 4 to 64 the
    dequantizing one; each with and without the residual add."""
    rng = np.random.default_rng(rows)
    m = quant.QuantMatrix.quantize(rng.standard_normal((N, K)).astype("float32"), qtype)
    x = rng.standard_normal((rows, K)).astype("float32")
    r = rng.standard_normal((rows, N)).astype("float32")
    ref = x.astype(np.float64) @ m.dequantize().astype(np.float64).T
    for residual in (False, True):
        lib = c.compile(c.IRModule({"main": _serial(_schedule(qtype, rows, residual))}),
                        target=HOST)
        y = _tvm.tensor(np.zeros((rows, N), "float32"))
        lib["main"](_tvm.tensor(x), _tvm.tensor(quant.pack_quant_weight(m)),
                    *([_tvm.tensor(r)] if residual else []), y)
        np.testing.assert_allclose(y.numpy(), ref + r if residual else ref, rtol=1e-5,
                                   atol=1e-4)


def test_shape_covers_a_sector_and_divides_the_k_blocks():
    """32 columns (one sector per byte index); slices divide k / 32 (no predicated slice),
    up to 256 threads, 128 where 64 rows of partials fill 32 KB."""
    rule = QuantSplitKLinearRule()
    assert rule.shape(1, 576, 576) == (32, 6)  # 18 k blocks
    assert rule.shape(16, 576, 1536) == (32, 8)  # 48
    assert rule.shape(64, 576, 576) == (32, 3)
    assert rule.shape(64, 576, 1536) == (32, 4)
    assert rule.shape(1, 48, 576) == (16, 9)  # 16 columns: up to 16 slices
    assert rule.shape(1, 576, 32) is None  # one k block: nothing to split


@pytest.mark.parametrize("n,k,residual", SMOLLM2)
def test_applies_to_smollm2_linears_with_k_over_threads(n, k, residual):
    """gpu_rules picks the rule for every SmolLM2 linear at static widths in each format (W
    = 1 factored, 64 dequantizing: without tensor cores, which take 16-64 rows by default);
    the k slices are a thread axis (threadIdx.y, 2 or more), the grid has a block per 32
    columns, and the slices' sum reduces over the slice axis."""
    for qtype in FORMATS:
        for rows in (1, 64):
            func = quant.linear_quant(n, k, qtype, residual, rows=rows)
            with CUDA:
                mod = ApplyRules(*gpu_rules(tensor_cores=rows < 16))(c.IRModule({
                    "main": func.with_attr("global_symbol", "main")}))
            assert str(mod["main"].attrs[RULE_ATTR]) == "gpu.QuantSplitKLinear"
            bind = dict(thread_bindings(mod["main"]))
            assert bind["threadIdx.y"] >= 2 and bind["blockIdx.x"] >= n // 32
            text = mod["main"].script()
            assert (text.index('thread="threadIdx.y"') < text.index('"matmul_rf_update"')
                    < text.index('"matmul_update"'))
            reduce = r'sblock\("matmul_update"\):\s+v\w+ = T\.axis\.reduce\(T\.int64\((\d+)\)'
            assert int(re.search(reduce, text).group(1)) == bind["threadIdx.y"]
            assert 'scope="shared"' in text


def test_symbolic_width_keeps_the_column_rule():
    func = quant.linear_quant(576, 576, "q4_1", rows=None)
    assert QuantSplitKLinearRule().apply(func, CUDA, False) is None
    assert QuantLinearRule().apply(func, CUDA, False) is not None
    with CUDA:
        mod = ApplyRules(*gpu_rules())(c.IRModule({"main": func.with_attr("global_symbol",
                                                                             "main")}))
    assert str(mod["main"].attrs[RULE_ATTR]) == "gpu.QuantLinear"


@pytest.mark.parametrize("qtype,rows", [("q4_1", 1), ("q4_0", 2), ("q8_0", 16)])
def test_cuda_source_decodes_in_registers_with_one_barrier(qtype, rows):
    """Per slice the scale (min) and block sums in registers; one __syncthreads between the
    shared partials and their sums; constant nibble selects in the factored kernel (its 32
    quants unrolled by nvcc, not in the source, which stays a few KB)."""
    func = _schedule(qtype, rows, True, 576, 576)
    local = set(re.findall(r'(\w+) = T\.sblock_alloc_buffer\(.*scope="local"\)',
                           func.script()))
    assert {"matmul_local", "scale_local"} <= local
    if rows <= quant.FACTORED_MAX_ROWS:
        assert "inner_local" in local
    src = c.compile(c.IRModule({"main": func}), target=CUDA).mod.imports[0].inspect_source()
    assert src.count("__syncthreads()") == 1 and "__shared__" in src
    assert "tvm_thread_allreduce" not in src and len(src) < 12_000
    if rows <= quant.FACTORED_MAX_ROWS and qtype != "q8_0":
        assert "#pragma unroll" in src and re.search(r"if \(ax\d+ < 16\)", src)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("qtype,rows", [("q4_1", 1), ("q4_0", 2), ("q4_1", 16), ("q8_0", 64),
                                        ("q4_0", 64)])
def test_nvcc_keeps_accumulators_in_registers(tmp_path, arch, qtype, rows):
    """ptxas on SmolLM2's down projection (the longest K, with the residual): no stack
    frame, no spills, up to 64 rows, for Jetson Orin (sm_87) and Hopper (sm_90)."""
    assert_no_stack(_schedule(qtype, rows, True, 576, 1536), arch, tmp_path)


@pytest.mark.parametrize("qtype,rows", [("q4_1", 1), ("q4_0", 4), ("q8_0", 64)])
def test_sixteen_column_blocks_match_numpy(qtype, rows):
    """The kit's ``splitk16`` alternative (half a sector per block) computes
    the same product."""
    rng = np.random.default_rng(7)
    m = quant.QuantMatrix.quantize(rng.standard_normal((N, K)).astype("float32"), qtype)
    x = rng.standard_normal((rows, K)).astype("float32")
    rule = QuantSplitKLinearRule(cols=16)
    func = rule.apply(quant.linear_quant(N, K, qtype, rows=rows), CUDA, False).mod["main"]
    assert dict(thread_bindings(func))["threadIdx.x"] == 16
    lib = c.compile(c.IRModule({"main": _serial(func)}), target=HOST)
    y = _tvm.tensor(np.zeros((rows, N), "float32"))
    lib["main"](_tvm.tensor(x), _tvm.tensor(quant.pack_quant_weight(m)), y)
    np.testing.assert_allclose(y.numpy(), x.astype(np.float64) @ m.dequantize().T, rtol=1e-5,
                               atol=1e-4)


# FuseLinearChains' quantized forms: a norm before, a gated activation after, a bias.
FUSED = [{"norm_eps": 1e-5, "activation": "silu"}, {"norm_eps": 1e-6, "bias": True},
         {"activation": "gelu_tanh"}]


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 16, 64])
@pytest.mark.parametrize("form", FUSED, ids=lambda f: "_".join(f))
def test_fused_forms_match_numpy(qtype, rows, form):
    """The fused quantized kernels under the epilogue-anchored split K (a gated kernel's
    thread decodes the gate's and the up column's scales in its loop over halves), thread
    loops serial, against numpy on the dequantized weights: the factored kernel (W = 1, 2)
    and the dequantizing one (16, 64: 3 slices at 64)."""
    n, k = 192, K
    rng = np.random.default_rng(rows)
    m = quant.QuantMatrix.quantize(rng.standard_normal((n, k)).astype("float32"), qtype)
    x = rng.standard_normal((rows, k)).astype("float32")
    g, b = rng.standard_normal(k).astype("float32"), rng.standard_normal(n).astype("float32")
    func = QuantSplitKLinearRule().apply(quant.linear_quant(n, k, qtype, rows=rows, **form),
                                         CUDA, False).mod["main"]
    lib = c.compile(c.IRModule({"main": serial_threads(func, len(thread_bindings(func)),
                                                       "every thread loop")}), target=HOST)
    norm, gated = "norm_eps" in form, "activation" in form
    y = _tvm.tensor(np.zeros((rows, n // 2 if gated else n), "float32"))
    args = [x, *([g] if norm else []), quant.pack_quant_weight(m), *([b] if "bias" in form else [])]
    lib["main"](*map(_tvm.tensor, args), y)
    want = fused_linear_reference(x, m.dequantize(), g if norm else None, form.get("norm_eps"),
                           form.get("activation"), b if "bias" in form else None)
    # float32 sums of unnormed rows reach ~1e3: the error relative to the output's scale
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 64])
def test_fused_sixteen_column_blocks_match_numpy(rows):
    """The kit's ``fused16`` gated kernel (16 columns a block: twice the blocks) computes the
    same norm -> linear -> SiLU."""
    n, k = 192, K
    rng = np.random.default_rng(3)
    m = quant.QuantMatrix.quantize(rng.standard_normal((n, k)).astype("float32"), "q4_1")
    x = rng.standard_normal((rows, k)).astype("float32")
    g = rng.standard_normal(k).astype("float32")
    func = QuantSplitKLinearRule(cols=16).apply(quant.linear_quant(
        n, k, "q4_1", rows=rows, norm_eps=1e-5, activation="silu"), CUDA, False).mod["main"]
    assert dict(thread_bindings(func))["threadIdx.x"] == 16
    lib = c.compile(c.IRModule({"main": serial_threads(func, len(thread_bindings(func)),
                                                       "every thread loop")}), target=HOST)
    y = _tvm.tensor(np.zeros((rows, n // 2), "float32"))
    lib["main"](*map(_tvm.tensor, (x, g, quant.pack_quant_weight(m))), y)
    want = fused_linear_reference(x, m.dequantize(), g, 1e-5, "silu")
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_fused_cuda_source_keeps_one_barrier(rows):
    """SmolLM2's fused q4_1 gate_up: the squares' partials go to shared memory before the
    one barrier the matmul's partials need; each half's scale and min decoded in registers;
    one kernel."""
    func = QuantSplitKLinearRule().apply(quant.linear_quant(
        3072, 576, "q4_1", rows=rows, norm_eps=1e-5, activation="silu"), CUDA, False).mod["main"]
    local = set(re.findall(r'(\w+) = T\.sblock_alloc_buffer\(.*scope="local"\)',
                           func.script()))
    assert {"scale_local", "min_local", "matmul_local"} <= local
    src = c.compile(c.IRModule({"main": func}), target=CUDA).mod.imports[0].inspect_source()
    assert src.count("__syncthreads()") == 1 and "tvm_thread_allreduce" not in src
    assert len(re.findall(r"__global__ void __launch_bounds__\(\d+\) \w+\(.*\) \{", src)) == 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("qtype,rows", [("q4_1", 1), ("q4_0", 16), ("q8_0", 64)])
def test_nvcc_keeps_fused_accumulators_in_registers(tmp_path, arch, qtype, rows):
    """ptxas on SmolLM2's fused gate_up (gate and up sums per row: the most registers): no
    stack frame, no spills."""
    func = QuantSplitKLinearRule().apply(quant.linear_quant(
        3072, 576, qtype, rows=rows, norm_eps=1e-5, activation="silu"), CUDA, False).mod["main"]
    assert_no_stack(func.with_attr("global_symbol", "main"), arch, tmp_path)
