"""``gpu.QuantTensorCoreLinear``: block-quantized linears (q4_0, q4_1, q8_0) at 16-64 rows on
WMMA tensor cores, each warp dequantizing its W tiles into shared memory as float16 hi and
lo terms. No GPU here: the schedule with its WMMA tiles as plain blocks runs on the CPU with
its thread loops serial, against float64 numpy; the tensorized kernel is checked by TVM's
CUDA codegen and ptxas (registers, shared memory)."""

import re
import shutil

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.kernels import quant
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.gpu import QuantTensorCoreLinearRule, gpu_rules
from hetcomp.testing import fused_linear_reference
from hetcomp.testing.gpu import assert_no_stack, cpu_form

c = _tvm.compiler()
CUDA = c.Target({"kind": "cuda", "arch": "sm_90"})
HOST = c.Target({"kind": "llvm"})
# (norm eps, activation, bias, residual): the plain linear, with the residual add, and the
# fused forms FuseLinearChains makes of a quantized qkv (Qwen2's with its bias) and gate_up.
FORMS = {"plain": (None, None, False, False), "residual": (None, None, False, True),
         "norm": (1e-5, None, False, False), "norm_silu": (1e-5, "silu", False, False),
         "norm_bias": (1e-5, None, True, False)}


def _kernel(qtype, form, rows, n=256, k=128):
    """The quantized linear kernel of a form."""
    eps, act, bias, res = FORMS[form]
    return quant.linear_quant(n, k, qtype, res, rows=rows, norm_eps=eps, activation=act,
                              bias=bias)


def _case(qtype, form, rows, n=256, k=128, seed=0):
    """(kernel, its arguments, the float64 reference) of one quantized linear."""
    eps, act, bias, res = FORMS[form]
    rng = np.random.default_rng(seed)
    m = quant.QuantMatrix.quantize((rng.standard_normal((n, k)) * 0.1).astype("float32"), qtype)
    x = (rng.standard_normal((rows, k)) * 4).astype("float32")
    g, b = rng.standard_normal(k).astype("float32"), rng.standard_normal(n).astype("float32")
    r = rng.standard_normal((rows, n)).astype("float32")
    args = [x, *([g] if eps else []), quant.pack_quant_weight(m), *([b] if bias else []),
            *([r] if res else [])]
    want = fused_linear_reference(x, m.dequantize(), g if eps else None, eps, act,
                                  bias=b if bias else None)
    return _kernel(qtype, form, rows, n, k), args, want + r if res else want


def _run(func, args, shape):
    lib = c.compile(c.IRModule({"main": func}), target=HOST)
    y = _tvm.tensor(np.zeros(shape, "float32"))
    lib["main"](*[_tvm.tensor(v) for v in args], y)
    return y.numpy()


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("form,rows,tiles", [("plain", 16, 1), ("residual", 64, 4),
                                             ("norm", 32, 1), ("norm_silu", 64, 1),
                                             ("norm_silu", 16, 2), ("norm_bias", 16, 4)])
def test_schedule_matches_numpy(qtype, form, rows, tiles):
    """Every format and form at 16 to 64 rows, one, two or four column tiles a block, the
    WMMA tiles as plain blocks and the thread loops serial (sound: each warp writes and reads
    only its own x and W terms between two barriers; the warps' partials meet in shared
    memory and a later stage sums them), against float64 numpy on the dequantized weights:
    within 2e-6 of the result's scale."""
    func, args, want = _case(qtype, form, rows, seed=rows + tiles)
    rule = (QuantTensorCoreLinearRule(tensorize=False, tiles=tiles) if tiles > 1 else
            QuantTensorCoreLinearRule(tensorize=False, min_blocks=10**6))
    sch = rule.apply(func, CUDA, False)
    got = _run(cpu_form(sch.mod["main"]), args, want.shape)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def test_the_weights_lo_term_is_what_keeps_float32_accuracy():
    """Each dequantized weight ``d q + m`` goes in as two float16 terms: the kernel stays
    within 1e-6 of float64 where the same weights rounded to float16 (one term) miss by
    ~1e-4 of the scale, two orders more."""
    func, args, want = _case("q4_1", "plain", 16)
    sch = QuantTensorCoreLinearRule(tensorize=False).apply(func, CUDA, False)
    err = np.abs(_run(cpu_form(sch.mod["main"]), args, want.shape) - want).max()
    m = quant.unpack_quant_weight(args[1], "q4_1")
    rounded = args[0].astype(np.float64) @ m.dequantize().astype("float16").astype(
        np.float64).T
    assert err <= 1e-6 * np.abs(want).max() and err * 100 < np.abs(rounded - want).max()


def test_same_arguments_as_the_kernel_it_replaces():
    """The rule schedules the ``split_x`` form: the same parameters and attributes, so the
    Relax call that passed them to the original still fits."""
    for form in FORMS:
        func = _kernel("q4_1", form, 32)
        sched = QuantTensorCoreLinearRule().apply(func, CUDA, False).mod["main"]
        assert [(str(p.name), [int(d) for d in p.shape], str(p.dtype)) for p in func.params] == [
            (str(p.name), [int(d) for d in p.shape], str(p.dtype)) for p in sched.params]
        for key, value in func.attrs.items():
            assert str(sched.attrs[key]) == str(value)


def _shared_bytes(ptxas: str, rule, rows, halves, k, tiles) -> int:
    """The block's shared memory: ptxas' static bytes and the partials (dynamic)."""
    slices = rule.slices(rows, halves, k, tiles)
    static = int(re.search(r"(\d+) bytes smem", ptxas).group(1))
    return static + 4 * slices * rows * 16 * tiles * halves


# SmolLM2's q4_1 layers and q8_0 LM head at the verify widths that take tensor cores:
# (qtype, form, rows, n, k, column tiles, warps, (D, D_x))
SMOLLM2 = [("q4_1", "residual", 16, 576, 576, 1, 4, (3, 3)),  # o
           ("q4_1", "norm_silu", 64, 3072, 576, 1, 2, (2, 2)),  # gate_up
           ("q4_1", "residual", 64, 576, 1536, 1, 4, (1, 1)),  # down
           ("q8_0", "norm", 64, 49152, 576, 4, 1, (1, 1))]  # the LM head


@pytest.mark.parametrize("qtype,form,rows,n,k,tiles,warps,depths", SMOLLM2)
def test_cuda_source_decodes_into_shared_memory(qtype, form, rows, n, k, tiles, warps,
                                                depths):
    """The CUDA kernel: one accumulator fragment per row tile and column tile (and half),
    x's and W's terms staged in shared memory in the same rounds (``D = D_x``: as many k
    steps as fit 48 KB and, for W's decoded weights, the registers beside the
    accumulators), W's fragments loaded from shared memory (leading dimension 16), four
    products of each tile (hi and lo of x by hi and lo of W) on one ``mma_sync``; each warp
    writes its own part of the W terms (threadIdx.y * D x 2 x halves x J x 256: no warp
    reads what another writes between two barriers, a race serial emulation would hide)."""
    rule = QuantTensorCoreLinearRule()
    halves = 2 if FORMS[form][1] else 1
    assert rule.column_tiles(n // halves, rows, halves) == tiles
    assert rule.slices(rows, halves, k, tiles) == warps
    assert rule.depths(rows, halves, k, tiles, warps) == depths
    func = _kernel(qtype, form, rows, n=n, k=k)
    src = c.compile(rule.apply(func, CUDA, False).mod, target=CUDA).mod.imports[0]
    src = src.inspect_source()
    frags = rows // 16 * tiles * halves
    assert re.search(rf"fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> "
                     rf"\w+\[{frags}\];", src)
    part = depths[1] * 2 * halves * tiles * 256
    assert re.search(rf"__shared__ alignas\(64\) half w_split\w*_shared_ptr\[{warps * part}\];",
                     src)
    store = re.search(r"\n\s*w_split\w*_shared_ptr\[(.+?)\] = ", src)
    assert store and (warps == 1 or f"((int)threadIdx.y) * {part})" in store.group(1))
    assert re.search(r"load_matrix_sync\(w_split\w*_matrix_b_ptr\[\w+\], "
                     r"\(&\(w_split\w*_shared_ptr\[.+?\]\)\), 16\)", src)
    assert "wp_wmma_matrix_b" not in src  # no float16 W fragment straight from the weights
    assert src.count("mma_sync(") == 1 and src.count("__syncthreads()") == 3


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_nvcc_keeps_registers_and_shared_memory_within_bounds(tmp_path, arch):
    """ptxas on SmolLM2's layers at their widest (the LM head at 64 rows: 16 accumulator
    fragments a warp; gate_up at 64 rows: two halves), Qwen2.5-Coder-0.5B's down at 16 rows
    (K = 4864: the most shared memory, 8 warps of 38 k steps) and Gemma 3's 262,144-row LM
    head: no stack frame, no spills, for Jetson Orin (sm_87) and Hopper (sm_90), and each
    block's shared memory (static, plus the partials') within the 48 KB a launch gets
    without opting in."""
    rule = QuantTensorCoreLinearRule()
    others = [("q4_1", "residual", 16, 896, 4864), ("q8_0", "norm", 64, 262144, 640)]
    for qtype, form, rows, n, k in [case[:5] for case in SMOLLM2] + others:
        func = rule.apply(_kernel(qtype, form, rows, n=n, k=k), CUDA, False).mod["main"]
        ptxas = assert_no_stack(func.with_attr("global_symbol", "main"), arch, tmp_path)
        halves = 2 if FORMS[form][1] else 1
        tiles = rule.column_tiles(n // halves, rows, halves)
        assert _shared_bytes(ptxas, rule, rows, halves, k, tiles) <= 48 << 10


@pytest.mark.parametrize("qtype,rows,applies", [("q4_1", 16, True), ("q8_0", 32, True),
                                                ("q4_0", 64, True), ("q4_1", 4, False),
                                                ("q4_1", 1, False), ("q4_1", 24, False),
                                                ("q4_1", None, False)])
def test_gpu_rules_pick_it_for_wide_quantized_steps(qtype, rows, applies):
    """gpu_rules gives a quantized gate_up (fused) to the tensor cores at 16, 32 and 64
    rows; narrower or odd widths and prefill's symbolic width keep the CUDA-core rules, as
    every width does without tensor cores (``--no-tensor-cores``)."""
    func = quant.linear_quant(3072, 576, qtype, rows=rows, norm_eps=1e-5, activation="silu")
    mod = c.IRModule({"main": func.with_attr("global_symbol", "main")})
    for tensor_cores in (True, False):
        with CUDA:
            got = ApplyRules(*gpu_rules(tensor_cores))(mod)["main"].attrs[RULE_ATTR]
        assert (str(got) == "gpu.QuantTensorCoreLinear") == (applies and tensor_cores)
