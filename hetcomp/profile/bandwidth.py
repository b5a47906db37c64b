"""Measure this machine's achievable DRAM read bandwidth with a compiled, multi-threaded kernel."""

from __future__ import annotations

import time

import numpy as np

from .._tvm import compiler, tensor


def measure_read_bandwidth(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Best-of-``repeat`` GB/s for streaming ``nbytes`` (well past the last-level cache)."""
    from ..codegen.targets import make_target

    c = compiler()
    cols = 64
    rows = nbytes // 4 // cols
    te = c.te
    a = te.placeholder((rows, cols), "float32", name="a")
    # A 2-way parallel split of the rows, each thread streaming half the array.
    k = te.reduce_axis((0, rows // 2), name="r")
    part = te.compute((2, cols), lambda p, j: te.sum(a[p * (rows // 2) + k, j], axis=k),
                      name="part")
    func = te.create_prim_func([a, part])
    sch = c.Schedule(func)
    blk = sch.get_sblock("part")
    p, j, r = sch.get_loops(blk)
    sch.reorder(p, r, j)
    sch.parallel(p)
    sch.vectorize(j)
    sch.decompose_reduction(blk, r)
    lib = c.compile(c.IRModule({"main": sch.mod["main"]}), target=make_target("host"))
    x = tensor(np.ones((rows, cols), "float32"))
    y = tensor(np.zeros((2, cols), "float32"))
    f = lib["main"]
    f(x, y)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        f(x, y)
        best = min(best, time.perf_counter() - t)
    return rows * cols * 4 / best / 1e9
