"""Every hand-written GPU kernel (``script_ops``) gives the same result whatever order its
threads run in: its GPU form, on the CPU, with the thread-bound loops ascending and
descending (``hetcomp.testing.gpu.thread_orders``), against its CPU form. A GPU runs the
threads between two barriers in any order, so a kernel where one thread reads in a phase
what another writes there would differ between the orders: a race no CPU test of the CPU
form can see, and one that costs a device session to find."""

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.kernels import script_ops
from hetcomp.testing import depths, tree_mask
from hetcomp.testing.gpu import kernel_library, thread_orders

H, G, D, NL, CTX = 4, 2, 16, 2, 80
rng = np.random.default_rng(7)


def _f32(*shape):
    return rng.standard_normal(shape).astype("float32")


def _tree_inputs(n, parents):
    return tree_mask(parents).astype("int32"), (n + depths(parents)).astype("int32")


def _cases():
    """(name, CPU-form kernel, arguments (numpy arrays and scalars), indices written)."""
    w = 6
    parents = [-1, 0, 0, 1, 3, 2]
    mask, pos = _tree_inputs(37, parents)
    qkv, cs = _f32(w, (H + 2 * G) * D), _f32(w, D)
    kc, vc = _f32(NL, G, D, CTX).astype("float16"), _f32(NL, G, CTX, D).astype("float16")
    rope_out = [np.zeros((H, w, D), "float32"), np.zeros((G, w, D), "float32"),
                np.zeros((G, w, D), "float32")]
    yield ("rope_kv", script_ops.rope_kv(H, G, D, NL, CTX, kv_dtype="float16"),
           [qkv, cs, kc, vc, 1, 37, *rope_out], [2, 3, 6, 7, 8])
    yield ("kv_commit", script_ops.kv_commit(G, D, NL, CTX, kv_dtype="float16"),
           [kc, vc, np.array([0, 2, 3, 5], "int32"), 37], [0, 1])
    yield ("qk_norm", script_ops.qk_norm(H, G, D, 1e-6),
           [qkv, _f32(D), _f32(D), np.zeros_like(qkv)], [3])
    yield ("stage_tree", script_ops.stage_tree(),
           [pos, mask, np.zeros_like(pos), np.zeros_like(mask)], [2, 3])
    yield ("stage_draft", script_ops.stage_draft(300),
           [_f32(5, 300), np.array([[3, 0, 0], [9, 4, 2]], "int32"),
            np.zeros((1, 300), "float32"), np.zeros(1, "int32")], [2, 3])
    # The row, then 70 nodes (past one 64-thread stride): candidate references and ids.
    nodes = rng.permutation(np.concatenate([-1 - rng.integers(0, 20, 40),
                                            rng.integers(0, 1000, 30)]))
    yield ("draft_tokens", script_ops.draft_tokens(2, 10),
           [rng.permutation(1000)[:20].reshape(2, 10).astype("int32"),
            np.stack([np.full(70, 1), nodes]).astype("int32"), np.zeros(70, "int32")], [2])
    for groups in (None, 1, 3):
        for n, par in ((0, [-1]), (37, parents), (73, [-1, 0, 1, 1, 0, 4, 2])):
            m, p = _tree_inputs(n, par)
            w = len(par)  # the output, and the caches it writes the tree's K/V into
            yield (f"tree_attention_g{groups}_n{n}",
                   script_ops.tree_attention(H, G, D, NL, CTX, kv_dtype="float16",
                                             window=0, groups=groups),
                   [_f32(w, (H + 2 * G) * D), _f32(w, D), kc, vc, m, p, 1,
                    np.zeros((w, H, D), "float32")], [7, 2, 3])
    # Gemma's q/k norm inside (two gammas after the table: the caches move to 4, 5).
    yield ("tree_attention_qk_norm", script_ops.tree_attention(
        H, G, D, NL, CTX, kv_dtype="float16", window=5, qk_norm_eps=1e-6),
        [_f32(w, (H + 2 * G) * D), _f32(w, D), _f32(D), _f32(D), kc, vc, m, p, 1,
         np.zeros((w, H, D), "float32")], [9, 4, 5])


CASES = list(_cases())


def _run(func, args, written):
    lib = kernel_library(func, "host")
    tensors = [_tvm.tensor(a.copy()) if isinstance(a, np.ndarray) else a for a in args]
    lib["main"](*tensors)
    return [tensors[i].numpy() for i in written]


@pytest.mark.parametrize("name,func,args,written", CASES, ids=[c[0] for c in CASES])
def test_any_thread_order_gives_the_cpu_forms_result(name, func, args, written):
    want = _run(func, args, written)
    orders = thread_orders(script_ops.for_gpu(func))
    got = {order: _run(f, args, written) for order, f in orders.items()}
    for a, b, ref in zip(got["forward"], got["reverse"], want):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}: thread order changes the result")
        np.testing.assert_allclose(a, ref, rtol=1e-6, atol=1e-6, err_msg=name)


def test_the_orders_expose_an_in_place_race():
    """The check itself: compacting cache slots with a thread per moved slot (kv_commit's
    elements-per-thread layout avoids this) reads slots another thread overwrites first
    when the threads run in the other order."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def racy(var_k: T.handle, var_idx: T.handle, n: T.int64):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        k = T.match_buffer(var_k, (16,), "float32")
        idx = T.match_buffer(var_idx, (4,), "int32")
        for b in T.thread_binding(T.int64(1), thread="blockIdx.x"):
            for j in T.thread_binding(T.int64(4), thread="threadIdx.x"):
                k[n + b + j] = k[n + T.Cast("int64", idx[j])]

    args = [np.arange(16, dtype="float32"), np.array([0, 2, 3, 5], "int32"), 2]
    got = {o: _run(f, args, [0])[0][2:6] for o, f in thread_orders(racy).items()}
    np.testing.assert_array_equal(got["forward"], [2, 4, 5, 7])  # the sequential result
    assert not np.array_equal(got["reverse"], got["forward"])
