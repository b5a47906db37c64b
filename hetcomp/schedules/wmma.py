"""The WMMA 16x16x16 tensor intrinsics that ``gpu.TensorCoreLinear`` and
``gpu.QuantTensorCoreLinear`` tensorize with.

Float16 fragments in, float32 accumulators: A loaded from shared memory, B straight from
global memory (float16 weights) or from shared memory (weights dequantized there), the
accumulators stored to dynamic shared memory. They are TVM's own
definitions (``tvm.s_tir.tensor_intrin.cuda``'s ``get_wmma_*_intrin`` generators, Apache
2.0), written out here for the one shape and layout we use: importing that module registers
every tensor intrinsic TVM has for every GPU, about 280 TVMScript functions, which took
30-45 s of each float16 ``compile --target cuda`` here (and over 90 s under pytest, where the
parser's ``inspect.stack()`` walks deeper stacks). These six parse in well under a second.

Registered on first use under hetcomp's names (another library's registrations of TVM's
names are left alone).
"""

from __future__ import annotations

import functools

from tvm.script import tirx as T

from .._tvm import compiler

M = N = K = 16  # the fragment shape: every intrinsic here is 16 x 16 (x 16)
PREFIX = "hetcomp_wmma_16x16x16"


def _fragment_index(buffer, stride):
    """Which 16 x 16 fragment of a fragment buffer (of row ``stride``) ``buffer`` starts at."""
    return (buffer.elem_offset // stride // M) * (stride // N) + buffer.elem_offset % stride // N


def _copy(dtype: str, src: str, dst: str, block: str):
    """The description of a load or store: a 16 x 16 tile copied from ``src`` to ``dst``
    memory, element by element (block ``block``)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (M, N), dtype, align=64, offset_factor=N, scope=src)
        C = T.match_buffer(c, (M, N), dtype, align=64, offset_factor=N, scope=dst)
        with T.sblock("root"):
            T.reads(A[0:M, 0:N])
            T.writes(C[0:M, 0:N])
            for i, j in T.grid(M, N):
                with T.sblock(block):
                    vii, vjj = T.axis.remap("SS", [i, j])
                    C[vii, vjj] = A[vii, vjj]

    return desc


def load(fragment: str, scope: str):
    """``(desc, impl)``: a row-major float16 16 x 16 tile from ``scope`` memory into a
    ``wmma.matrix_a``/``wmma.matrix_b`` fragment (``fragment``: "a" or "b")."""
    frag_scope = f"wmma.matrix_{fragment}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1 = T.int32()
        s0 = T.int32()
        d1 = T.int32()
        d0 = T.int32()
        A = T.match_buffer(a, (M, N), "float16", align=64, offset_factor=N, scope=scope,
                           strides=[s1, s0])
        C = T.match_buffer(c, (M, N), "float16", align=64, offset_factor=N, scope=frag_scope,
                           strides=[d1, d0])
        with T.sblock("root"):
            T.reads(A[0:M, 0:N])
            T.writes(C[0:M, 0:N])
            T.evaluate(T.tvm_load_matrix_sync(C.data, M, N, K, _fragment_index(C, d1),
                                              A.access_ptr("r", ptr_type="float16"), s1,
                                              "row_major", dtype="void"))

    return _copy("float16", scope, frag_scope, "load"), impl


def fill():
    """``(desc, impl)``: a float32 accumulator fragment set to zero."""

    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=N,
                           scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:M, 0:N])
            for i, j in T.grid(M, N):
                with T.sblock("init"):
                    vii, vjj = T.axis.remap("SS", [i, j])
                    C[vii, vjj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        d1 = T.int32()
        d0 = T.int32()
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=N,
                           scope="wmma.accumulator", strides=[d1, d0])
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:M, 0:N])
            T.evaluate(T.tvm_fill_fragment(C.data, M, N, K, _fragment_index(C, d1),
                                           T.float32(0), dtype="void"))

    return desc, impl


def store(scope: str):
    """``(desc, impl)``: a float32 accumulator fragment stored row-major to ``scope``."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1 = T.int32()
        s0 = T.int32()
        d1 = T.int32()
        d0 = T.int32()
        A = T.match_buffer(a, (M, N), "float32", align=64, offset_factor=N,
                           scope="wmma.accumulator", strides=[d1, d0])
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=N, scope=scope,
                           strides=[s1, s0])
        with T.sblock("root"):
            T.reads(A[0:M, 0:N])
            T.writes(C[0:M, 0:N])
            T.evaluate(T.tvm_store_matrix_sync(A.data, M, N, K, _fragment_index(A, d1),
                                               C.access_ptr("w", ptr_type="float32"), s1,
                                               "row_major", dtype="void"))

    return _copy("float32", "wmma.accumulator", scope, "store"), impl


def sync():
    """``(desc, impl)``: C[16, 16] (float32) += A[16, 16] @ B[16, 16] (float16 fragments,
    B not transposed)."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (M, K), "float16", align=64, offset_factor=K,
                           scope="wmma.matrix_a")
        B = T.match_buffer(b, (K, N), "float16", align=64, offset_factor=N,
                           scope="wmma.matrix_b")
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=N,
                           scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads(C[0:M, 0:N], A[0:M, 0:K], B[0:K, 0:N])
            T.writes(C[0:M, 0:N])
            for i, j, k in T.grid(M, N, K):
                with T.sblock(""):
                    vii, vjj, vkk = T.axis.remap("SSR", [i, j, k])
                    C[vii, vjj] = C[vii, vjj] + T.Cast("float32", A[vii, vkk]) * T.Cast(
                        "float32", B[vkk, vjj])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a1 = T.int32()
        a0 = T.int32()
        b1 = T.int32()
        b0 = T.int32()
        c1 = T.int32()
        c0 = T.int32()
        A = T.match_buffer(a, (M, K), "float16", align=64, offset_factor=K,
                           scope="wmma.matrix_a", strides=[a1, a0])
        B = T.match_buffer(b, (K, N), "float16", align=64, offset_factor=N,
                           scope="wmma.matrix_b", strides=[b1, b0])
        C = T.match_buffer(c, (M, N), "float32", align=64, offset_factor=N,
                           scope="wmma.accumulator", strides=[c1, c0])
        with T.sblock("root"):
            T.reads(C[0:M, 0:N], A[0:M, 0:K], B[0:K, 0:N])
            T.writes(C[0:M, 0:N])
            T.evaluate(T.tvm_mma_sync(C.data, _fragment_index(C, c1), A.data,
                                      _fragment_index(A, a1), B.data, _fragment_index(B, b1),
                                      C.data, _fragment_index(C, c1), dtype="void"))

    return desc, impl


@functools.cache
def intrinsics() -> dict[str, str]:
    """Register the six intrinsics (once a process) and return their names by role:
    ``load_a`` (shared), ``load_b`` (global), ``load_b_shared``, ``fill``, ``store`` (dynamic
    shared), ``mma``."""
    builders = {"load_a": lambda: load("a", "shared"), "load_b": lambda: load("b", "global"),
                "load_b_shared": lambda: load("b", "shared"),
                "fill": fill, "store": lambda: store("shared.dyn"), "mma": sync}
    names = {}
    for role, build in builders.items():
        names[role] = f"{PREFIX}_{role}"
        compiler().TensorIntrin.register(names[role], *build(), override=True)
    return names
