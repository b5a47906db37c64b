"""``gpu.RMSNorm``, the CUDA schedule of ``rms_norm`` and ``rms_norm_res``: a thread block per
row, the sum of squares reduced across threadIdx.x. No GPU here: the schedule's arithmetic
runs on the CPU with its thread-bound loops made serial, the reduction's lowering (warp
shuffles) and the launch shape are checked on the CUDA source, registers by nvcc."""

import re
import shutil

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.kernels import ops
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.gpu import RMSNormRule, gpu_rules
from hetcomp.testing.gpu import assert_no_stack, serial_threads

c = _tvm.compiler()
CUDA = c.Target({"kind": "cuda", "arch": "sm_90"})
HOST = c.Target({"kind": "llvm"})
EPS = 1e-5


def _schedule(hidden, rows, residual=False):
    sch = RMSNormRule().apply(ops.rms_norm(hidden, EPS, rows=rows, residual=residual), CUDA,
                              False)
    assert sch is not None
    return sch.mod["main"]


def _serial(func):
    """``func`` with its thread-bound loops as serial loops: the same arithmetic on the CPU
    (the cross-thread sum becomes a serial one; its lowering is checked on the CUDA source)."""
    return serial_threads(func, 3, "rows over blockIdx.x; the sum and the scaling over threadIdx.x")


def _reference(x, g, r):
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + EPS) * g
    return y if r is None else y + r


@pytest.mark.parametrize("rows", [1, 4, 64, None])
@pytest.mark.parametrize("hidden", [576, 640, 100, 1000])
def test_schedule_matches_numpy(rows, hidden):
    """SmolLM2's 576 (2.25 x 256 threads), 640, 100 (128 threads, 28 idle) and 1000 (the
    last of 4 strides 232 wide); 1, 4 and 64 rows and a symbolic count (5); with and
    without the residual."""
    w = rows or 5
    rng = np.random.default_rng(hidden + w)
    x = rng.standard_normal((w, hidden)).astype("float32") * 3
    g = rng.standard_normal(hidden).astype("float32")
    r = rng.standard_normal((w, hidden)).astype("float32")
    for residual in (False, True):
        lib = c.compile(c.IRModule({"main": _serial(_schedule(hidden, rows, residual))}),
                        target=HOST)
        y = _tvm.tensor(np.zeros((w, hidden), "float32"))
        lib["main"](_tvm.tensor(x), _tvm.tensor(g), *([_tvm.tensor(r)] if residual else []), y)
        np.testing.assert_allclose(y.numpy(), _reference(x, g, r if residual else None),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rows", [1, 64, None])
def test_gpu_rules_pick_it_with_one_launch_and_a_thread_reduction(rows, residual):
    """gpu_rules gives SmolLM2's norm (and Gemma's residual norm) to gpu.RMSNorm, not
    PerStageThread; one launch (a block per row, 256 threads); the sum of squares reduces
    over the threadIdx.x loop."""
    func = ops.rms_norm(576, EPS, rows=rows, residual=residual)
    with CUDA:
        mod = ApplyRules(*gpu_rules())(c.IRModule({"main": func.with_attr("global_symbol",
                                                                             "main")}))
    assert str(mod["main"].attrs[RULE_ATTR]) == "gpu.RMSNorm"
    text = mod["main"].script()
    assert len(re.findall(r'thread="blockIdx\.x"', text)) == 1
    assert re.findall(r'T\.thread_binding\(T\.int64\((\d+)\), thread="threadIdx\.x"\)',
                      text) == ["256", "256"]
    sumsq = re.search(r'thread="threadIdx\.x"\):\s+with T\.sblock\("sumsq"\):\s+v_i = [^\n]+'
                      r'\s+v_k = T\.axis\.reduce\(T\.int64\(576\), \w+ \* T\.int64\(256\) \+ '
                      r'(\w+)\)', text)
    assert sumsq, "the sum of squares reduces over the threadIdx.x loop"


@pytest.mark.parametrize("rows", [1, None])
def test_cuda_source_reduces_with_warp_shuffles_and_no_race(rows):
    """One kernel; the sum of squares by warp shuffles (then one shared step across the 8
    warps); the shared result written once (by thread 0) and only read after the barrier:
    a per-thread rstd merged into that buffer would be written by every thread."""
    lib = c.compile(c.IRModule({"main": _schedule(576, rows, True)}), target=CUDA)
    src = lib.mod.imports[0].inspect_source()
    assert src.count("__global__") == 2  # declaration and definition of one kernel
    assert "__shfl_down_sync" in src
    shared = re.findall(r"__shared__ alignas\(\d+\) float (\w+)\[", src)
    writes = [ln for ln in src.splitlines() for b in shared
              if re.search(rf"{b}\)?\[[^\]]*\] =", ln)]
    assert len(writes) == 2, writes  # the warps' partials and the result
    assert len(src) < 8_000


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
@pytest.mark.parametrize("residual", [False, True])
def test_nvcc_builds_without_stack(tmp_path, arch, residual):
    assert_no_stack(_schedule(576, 4, residual), arch, tmp_path)
