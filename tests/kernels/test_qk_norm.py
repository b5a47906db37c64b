"""``script_ops.qk_norm`` (Gemma 3's q/k RMSNorm): its CPU form and its GPU form (a block per
head and row, a thread per element; run here with the thread loops serial) against numpy."""

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.build import cuda_source
from hetcomp.kernels import script_ops
from hetcomp.testing.gpu import kernel_library, serial_threads

H, G, D, EPS = 4, 1, 16, 1e-6


def reference(qkv, qg, kg):
    w = qkv.shape[0]
    heads = qkv.reshape(w, H + 2 * G, D).astype(np.float64)
    out = heads.copy()
    normed = heads / np.sqrt((heads ** 2).mean(axis=-1, keepdims=True) + EPS)
    out[:, :H] = normed[:, :H] * qg
    out[:, H:H + G] = normed[:, H:H + G] * kg
    return out.reshape(w, -1)


@pytest.mark.parametrize("form", ["cpu", "gpu"])
def test_matches_numpy(form):
    func = script_ops.qk_norm(H, G, D, EPS)
    if form == "gpu":
        func = serial_threads(script_ops.for_gpu(func), 2, "a block per (head, row), a thread "
                              "per element (each thread sums its row alone: no reduction)")
    lib = kernel_library(func, "host")
    rng = np.random.default_rng(0)
    qg, kg = rng.standard_normal(D).astype("float32"), rng.standard_normal(D).astype("float32")
    for w in (1, 5):
        qkv = rng.standard_normal((w, (H + 2 * G) * D)).astype("float32")
        out = _tvm.tensor(np.zeros_like(qkv))
        lib["main"](_tvm.tensor(qkv), _tvm.tensor(qg), _tvm.tensor(kg), out)
        np.testing.assert_allclose(out.numpy(), reference(qkv, qg, kg), rtol=1e-5, atol=1e-5)


def test_gpu_form_runs_rows_in_parallel():
    """Every (head, row) its own block: at W = 64 a layer's norm is (H + 2G) * 64 blocks, not
    H + 2G blocks each walking the rows one after another."""
    func = script_ops.for_gpu(script_ops.qk_norm(H, G, D, EPS))
    script = func.script()
    assert f'T.thread_binding(w * T.int64({H + 2 * G}), thread="blockIdx.x")' in script
    assert f'T.thread_binding({D}, thread="threadIdx.x")' in script
    src = cuda_source(kernel_library(func, "cuda"))
    assert f"__launch_bounds__({D})" in src
