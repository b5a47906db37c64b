"""One float linear kernel from DRAM, under the x86 / generic CPU rule with other tiles: what
sessions 26, 35 and 36 each timed by hand before choosing (or keeping) a tile.

Each tile is ``STREAMSxROWS`` with optional ``/LANES`` (sub-panels; one stream only) and a
suffix ``p`` (prefetch 2 KB ahead where the rows fit one tile, as the rule does) or ``P``
(prefetch in every row tile); ``rule`` is the rule's own choice. The weights are rotated
through ``--pool`` MB of copies, so every call reads them from DRAM as a decode step does;
each tile's output is checked against numpy. Configurations are interleaved, ``--rounds``
times; the median per call is printed in ms.

``python benchmarks/cpu_linear_tiles.py --dtype float16 --widths 4 8 16 --tiles rule 3x4P
1x8 1x8/16``

Session 36 here (2-core Intel Xeon, AVX-512), 3072x576 float16, ms at W = 8: rule (3x4)
0.236-0.259, 3x4P 0.235, 1x8 0.281, 1x8/16 0.288, 3x2 0.265; at W = 16 the rule's 0.343-0.353
is ~160-165 GFLOP/s.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np


def parse_tile(spec: str):
    """``STREAMSxROWS[/LANES][p|P]`` -> ``(LinearTile, prefetch in every tile)``; ``rule`` ->
    None (the rule's own)."""
    from hetcomp.schedules.cpu import LinearTile
    from hetcomp.schedules.x86 import PREFETCH_BYTES

    if spec == "rule":
        return None
    m = re.fullmatch(r"(\d+)x(\d+)(?:/(\d+))?([pP]?)", spec)
    if m is None:
        raise SystemExit(f"bad tile {spec!r}: STREAMSxROWS[/LANES][p|P] or rule")
    streams, rows, lanes, pf = m.groups()
    return (LinearTile(int(streams), int(rows), int(lanes) if lanes else None,
                       PREFETCH_BYTES if pf else 0), pf == "P")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--widths", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--tiles", nargs="+", default=["rule"])
    ap.add_argument("--target", default="host", help="a hetcomp target name (host, x86-64-v3)")
    ap.add_argument("--pool", type=int, default=512, help="MB of weight copies to rotate")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from hetcomp import _tvm
    from hetcomp._tvm import compiler
    from hetcomp.codegen.targets import make_target
    from hetcomp.kernels import ops
    from hetcomp.schedules import cpu, x86

    c = compiler()
    target = make_target(args.target)
    tiles = {spec: parse_tile(spec) for spec in args.tiles}

    class Fixed(x86.LinearRule):
        def __init__(self, tile):
            super().__init__()
            self.fixed = tile

        def tile(self, target, rows):
            return self.fixed if self.fixed is not None else super().tile(target, rows)

    def build(rows: int, choice):
        tile, every = choice if choice is not None else (None, False)
        one_tile = cpu._one_row_tile
        if every:  # (the rule asks this before it prefetches)
            cpu._one_row_tile = lambda sch, io: True
        try:
            sch = Fixed(tile).apply(ops.linear(args.n, args.k, args.dtype, rows=rows), target,
                                    False)
        finally:
            cpu._one_row_tile = one_tile
        if sch is None:
            raise SystemExit(f"the rule does not apply to {target}")
        return c.compile(c.IRModule({"main": sch.mod["main"]}), target=target)["main"]

    nbytes = args.n * args.k * np.dtype(args.dtype).itemsize
    copies = max(4, (args.pool << 20) // nbytes)
    rng = np.random.default_rng(0)
    packed = [ops.pack_linear_weight(rng.standard_normal((args.n, args.k)).astype("float32")
                                     * 0.05, args.dtype) for _ in range(copies)]
    weights = [_tvm.tensor(p) for p in packed]
    last = ops.unpack_linear_weight(packed[-1]).astype(np.float64)
    for rows in args.widths:
        fns = {}
        for s, t in tiles.items():
            if t is not None and rows % t[0].rows:
                continue  # (static rows take exact tiles)
            try:
                fns[s] = build(rows, t)
            except ValueError as e:  # a tile the rule refuses
                print(f"W={rows} {s}: {e}")
        x = rng.standard_normal((rows, args.k)).astype("float32")
        xt, y = _tvm.tensor(x), _tvm.tensor(np.zeros((rows, args.n), "float32"))
        ref = x.astype(np.float64) @ last.T
        times: dict[str, list[float]] = {s: [] for s in fns}
        for _ in range(args.rounds):
            for s, f in fns.items():
                for w in weights:  # one pass to settle, then timed ones
                    f(xt, w, y)
                t0 = time.perf_counter()
                for _ in range(3):
                    for w in weights:
                        f(xt, w, y)
                times[s].append((time.perf_counter() - t0) / (3 * copies))
                np.testing.assert_allclose(y.numpy(), ref, rtol=1e-3, atol=1e-3, err_msg=s)
        print(f"{args.dtype} {args.n}x{args.k} W={rows}: " + "  ".join(
            f"{s} {1e3 * float(np.median(v)):.3f}" for s, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
