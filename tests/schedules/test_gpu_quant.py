"""``gpu.QuantLinear``, the CUDA schedule of the block-quantized linear kernels. No GPU here:
the schedule's arithmetic is checked by running the scheduled function on the CPU with its
two thread-bound loops made serial, the CUDA build by TVM's codegen and (where installed)
nvcc's register report, and the model by `compile --dtype q4_1 --target cuda`."""

import re
import shutil

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.artifact_format import read_manifest
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.kernels import ops, quant
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.gpu import (
    LinearColumnRule,
    QuantLinearRule,
    QuantSplitKLinearRule,
    SplitKLinearRule,
    gpu_rules,
)
from hetcomp.testing import TINY, byte_tokenizer_spec
from hetcomp.testing.gpu import assert_no_stack, serial_threads

c = _tvm.compiler()
CUDA = c.Target({"kind": "cuda", "arch": "sm_90"})
HOST = c.Target({"kind": "llvm"})
FORMATS = ("q4_0", "q4_1", "q8_0")
N, K = 96, 128  # 96 columns over 64-thread blocks: the second block's tail is predicated


def _schedule(qtype, rows, residual=False, n=N, k=K):
    sch = QuantLinearRule().apply(quant.linear_quant(n, k, qtype, residual, rows=rows), CUDA,
                                  False)
    assert sch is not None
    return sch.mod["main"]


def _serial(func):
    """``func`` with its thread-bound loops as serial loops: the same schedule, on the CPU."""
    return serial_threads(func, 2, "one blockIdx.x and one threadIdx.x loop")


@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("rows", [1, 2, 4, 16, None])
def test_schedule_matches_numpy(qtype, rows):
    """W = 1, 2 the factored kernel (raw-quant block sums in registers), 4 and 16 the
    dequantizing one with rows inside the reduction, the symbolic width (5 rows) with rows
    outside; each with and without the residual add."""
    w = rows or 5
    rng = np.random.default_rng(w)
    m = quant.QuantMatrix.quantize(rng.standard_normal((N, K)).astype("float32"), qtype)
    x = rng.standard_normal((w, K)).astype("float32")
    r = rng.standard_normal((w, N)).astype("float32")
    ref = x.astype(np.float64) @ m.dequantize().astype(np.float64).T
    for residual in (False, True):
        lib = c.compile(c.IRModule({"main": _serial(_schedule(qtype, rows, residual))}),
                        target=HOST)
        y = _tvm.tensor(np.zeros((w, N), "float32"))
        lib["main"](_tvm.tensor(x), _tvm.tensor(quant.pack_quant_weight(m)),
                    *([_tvm.tensor(r)] if residual else []), y)
        np.testing.assert_allclose(y.numpy(), ref + r if residual else ref, rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("qtype,rows", [("q4_1", 1), ("q4_0", 16), ("q8_0", None)])
def test_builds_for_cuda_with_threads_and_registers(qtype, rows):
    """A thread per column over (blockIdx.x, threadIdx.x); accumulators, scales and block
    sums in registers; CUDA source that nvcc unrolls (``#pragma unroll``) rather than source
    TVM unrolled (a few KB a kernel: nvcc compiles it when the library loads)."""
    func = _schedule(qtype, rows)
    text = func.script()
    assert 'thread="blockIdx.x"' in text and 'thread="threadIdx.x"' in text
    local = set(re.findall(r'(\w+) = T\.sblock_alloc_buffer\(.*scope="local"\)', text))
    assert {"matmul_local", "scale_local"} <= local
    if rows == 1:
        assert {"inner_local", "min_local", "xsum_local"} <= local
    lib = c.compile(c.IRModule({"main": func}), target=CUDA)
    src = lib.mod.imports[0].inspect_source()
    assert "__global__" in src and "threadIdx.x" in src
    assert len(src) < 16_000
    if rows == 1:  # the factored kernel's block sums
        assert "#pragma unroll" in src and "inner_local" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("qtype,rows", [("q4_1", 1), ("q4_1", 2), ("q8_0", 64)])
def test_nvcc_keeps_accumulators_in_registers(tmp_path, qtype, rows):
    """ptxas on the generated CUDA (SmolLM2's 576x576): no stack frame, so no local-memory
    accumulators, up to 64 rows."""
    assert_no_stack(_schedule(qtype, rows, n=576, k=576), "sm_90", tmp_path)


def test_rules_split_float_and_quantized_linears():
    """The float rules leave quantized kernels alone and the quantized rules float ones;
    gpu_rules gives a static width to the split-K rule, a symbolic one to the column rule."""
    for rows, rule in ((4, "gpu.QuantSplitKLinear"), (None, "gpu.QuantLinear")):
        q = quant.linear_quant(64, 64, "q4_1", rows=rows)
        assert LinearColumnRule().apply(q, CUDA, False) is None
        assert SplitKLinearRule().apply(q, CUDA, False) is None
        for quant_rule in (QuantLinearRule(), QuantSplitKLinearRule()):
            assert quant_rule.apply(ops.linear(64, 64, "float32", rows=rows), CUDA,
                                    False) is None
            assert quant_rule.apply(q, HOST, False) is None
        with CUDA:
            mod = ApplyRules(*gpu_rules())(c.IRModule({"main": q.with_attr("global_symbol",
                                                                              "main")}))
        assert str(mod["main"].attrs[RULE_ATTR]) == rule


def test_compile_q4_1_for_cuda(tmp_path):
    """`compile --dtype q4_1 --target cuda` of a tiny model: the decode and verify linears
    (static widths under 16) are gpu.QuantSplitKLinear's, the 64-row prompt chunk's
    gpu.QuantTensorCoreLinear's, prefill's (symbolic) gpu.QuantLinear's, nothing else
    schedules a linear, and the weights stay blocks. The norms and the SiLU run inside the
    quantized qkv and gate_up kernels (FuseLinearChains, on by default for cuda): three
    kernels a layer fewer than with `--no-fuse`."""
    from hetcomp.frontend.weights import random_weights

    w = random_weights(TINY, seed=2)
    wq = {n: quant.QuantMatrix.quantize(a, "q4_1") if a.ndim == 2 else a for n, a in w.items()}
    got = {}
    for fuse in (None, False):
        out = str(tmp_path / f"art{fuse}")
        compile_model(CompileOptions(model="tiny.gguf", dtype="q4_1", target="cuda",
                                     max_context=64, fuse_linears=fuse), out, quiet=True,
                      weights=(TINY, wq, byte_tokenizer_spec(TINY.vocab_size), __file__))
        got[fuse] = read_manifest(out)
    m = got[None]
    assert m["units"][0]["device"] == "cuda" and m["dtype"] == "q4_1" and m["fused_linears"]
    linear = [k for k in m["kernels"] if k["name"].startswith("linear")]
    assert {k["rule"] for k in linear} == {"gpu.QuantSplitKLinear", "gpu.QuantLinear",
                                           "gpu.QuantTensorCoreLinear"}
    for k in linear:  # each kernel its own rule: static widths split K or tensor cores
        width = re.search(r"_w(\d+)$", k["name"])
        assert k["rule"] == ("gpu.QuantLinear" if width is None else
                             "gpu.QuantSplitKLinear" if int(width.group(1)) < 16 else
                             "gpu.QuantTensorCoreLinear"), k
    fused = {k["name"]: k["rule"] for k in linear if k["name"].startswith("linear_norm")}
    assert fused == {"linear_norm_n128_k64_w1": "gpu.QuantSplitKLinear",
                     "linear_norm_silu_n192_k64_w1": "gpu.QuantSplitKLinear",
                     "linear_norm_n128_k64_w64": "gpu.QuantTensorCoreLinear",
                     "linear_norm_silu_n192_k64_w64": "gpu.QuantTensorCoreLinear"}
    for fn in ("verify_w1", "prefill_w64"):
        assert (got[False]["launches"][fn]["kernels"] - m["launches"][fn]["kernels"]
                == 3 * TINY.num_layers)
    params = {p["name"]: p["dtype"] for p in m["params"]}
    assert params["layers.0.w_down"] == "uint8" and params["embed"] == "uint8"
