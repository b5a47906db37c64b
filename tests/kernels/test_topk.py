"""``script_ops.topk_rows``: the Medusa draft's candidates in the CUDA-graph build (a top-k
per thread, merged pairwise in shared memory), its CPU form and its GPU form (run on the
CPU in both thread orders) against a numpy ranking, ties and -inf included."""

import re
import shutil

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.build import cuda_source
from hetcomp.kernels import script_ops
from hetcomp.testing.gpu import assert_no_stack, kernel_library, thread_orders


def reference(logits, k):
    """Each row's k largest, descending, ties to the lower column (a stable sort)."""
    return np.argsort(-logits, axis=1, kind="stable")[:, :k].astype("int32")


def _logits(rows, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype("float32")
    x[0, [3, n - 2, n // 2]] = 7.0  # a three-way tie for first place, far apart
    if rows > 1:
        x[1] = np.round(x[1])  # a handful of distinct values: ties everywhere
    if rows > 2:
        x[2, : n - 4] = -np.inf  # fewer finite values than k: -inf columns still rank
    return x


def _run(func, logits, k, vocab=None):
    lib = kernel_library(func, "host")
    out = _tvm.tensor(np.zeros((logits.shape[0], k), "int32"))
    extra = [] if vocab is None else [_tvm.tensor(vocab)]
    lib["main"](_tvm.tensor(logits), *extra, out)
    return out.numpy()


# (columns, k, rows): the draft's shape (8192-column draft vocabulary, 10 candidates), a
# row shorter than the block's columns per batch, and k > 16 (the 64-thread block).
SHAPES = [(8192, 10, 4), (300, 10, 3), (1000, 20, 3)]


@pytest.mark.parametrize("n,k,rows", SHAPES, ids=[f"n{s[0]}_k{s[1]}" for s in SHAPES])
@pytest.mark.parametrize("mapped", [False, True], ids=["indices", "token_ids"])
def test_every_form_ranks_as_numpy(n, k, rows, mapped):
    logits = _logits(rows, n, seed=n + k)
    vocab = np.random.default_rng(1).permutation(4 * n)[:n].astype("int32") if mapped else None
    want = reference(logits, k)
    if mapped:
        want = vocab[want]
    func = script_ops.topk_rows(n, k, rows, mapped=mapped)
    forms = {"cpu": func, **thread_orders(script_ops.for_gpu(func))}
    for name, form in forms.items():
        np.testing.assert_array_equal(_run(form, logits, k, vocab), want, err_msg=name)


def test_gpu_form_is_one_block_per_row_and_merges_in_shared_memory():
    """One launch: a block per row of 256 threads, the lists in shared memory (30 KiB at
    k = 10), three barriers in the source (after the scan; two per pair of merge levels)."""
    func = script_ops.for_gpu(script_ops.topk_rows(8192, 10, 4, mapped=True))
    script = func.script()
    assert 'T.thread_binding(T.int64(4), thread="blockIdx.x")' in script
    assert script.count('thread="threadIdx.x"') == 4  # scan, two merge levels, write
    src = cuda_source(kernel_library(func, "cuda"))
    kernels = re.findall(r"__global__ void __launch_bounds__\((\d+)\) (\w+)\(.*\) \{", src)
    assert kernels == [("256", "main_kernel")]
    assert src.count("__syncthreads()") == 3
    assert "float lists_v_ptr[2560]" in src and "float half_v_ptr[1280]" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_lists_stay_in_registers(tmp_path, arch):
    """A thread's top-k is indexed only by unrolled loops: registers, no stack."""
    func = script_ops.for_gpu(script_ops.topk_rows(8192, 10, 4, mapped=True))
    report = assert_no_stack(func.with_attr("global_symbol", "main"), arch, tmp_path)
    assert "30720 bytes smem" in report


def test_k_beyond_the_shared_lists_is_refused():
    with pytest.raises(ValueError, match="at most 64"):
        script_ops.topk_rows(8192, 65, 1)
    with pytest.raises(ValueError, match="columns"):
        script_ops.topk_rows(8, 10, 1)
