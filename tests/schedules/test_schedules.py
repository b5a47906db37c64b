"""CPU schedule rules: dispatch by op kind, exact row tiles for static widths, numerics."""

import re

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.targets import make_target
from hetcomp.hardware import machine_cpu_flags, target_dict
from hetcomp.kernels import ops, script_ops
from hetcomp.schedules import x86
from hetcomp.schedules.cpu import (
    ArgmaxRule,
    AttentionRule,
    ElementwiseRule,
    LinearRule,
    RowwiseRule,
)

c = _tvm.compiler()
TARGET = make_target("host")


def test_rules_apply_only_to_their_kind():
    lin, norm = ops.linear(64, 64, "float32"), ops.rms_norm(64, 1e-5)
    assert LinearRule().apply(norm, TARGET, False) is None
    assert RowwiseRule().apply(lin, TARGET, False) is None
    assert AttentionRule().apply(lin, TARGET, False) is None
    assert ElementwiseRule().apply(lin, TARGET, False) is None
    assert LinearRule().apply(lin, TARGET, False) is not None
    gpu = lin.with_attr("target", c.Target({"kind": "cuda", "arch": "sm_90"}))
    assert LinearRule().apply(gpu, TARGET, False) is None


@pytest.mark.parametrize("rows", [1, 2, 8, 16])
def test_static_rows_tile_exactly(rows):
    """No row predicate, so the row tile's accumulators can live in registers."""
    sch = LinearRule().apply(ops.linear(96, 64, "float32", rows=rows), TARGET, False)
    text = sch.mod["main"].script()
    assert "T.where" not in text
    dynamic = LinearRule().apply(ops.linear(96, 64, "float32"), TARGET, False)
    assert "T.where" in dynamic.mod["main"].script()


def _run_linear(sch, target, n, k, w, residual, dtype):
    lib = c.compile(c.IRModule({"main": sch.mod["main"]}), target=target)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((w, k)).astype("float32")
    wt = rng.standard_normal((n, k)).astype(dtype)
    r = rng.standard_normal((w, n)).astype("float32")
    y = _tvm.tensor(np.zeros((w, n), "float32"))
    args = [_tvm.tensor(x), _tvm.tensor(ops.pack_linear_weight(wt.astype("float32"), dtype))]
    lib["main"](*args, *([_tvm.tensor(r)] if residual else []), y)
    ref = x.astype(np.float64) @ wt.astype(np.float64).T + (r if residual else 0)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,residual,dtype", [(1, False, "float32"), (3, True, "float32"),
                                                 (16, False, "float16"), (None, True, "float32")])
def test_linear_numerics(rows, residual, dtype):
    n, k = 96, 80
    sch = LinearRule().apply(ops.linear(n, k, dtype, residual, rows=rows), TARGET, False)
    _run_linear(sch, TARGET, n, k, rows or 5, residual, dtype)


_FLAGS = machine_cpu_flags() or set()
#: x86 targets whose code this machine runs: AVX2 (x86-64-v3) and, where present, AVX-512.
X86_TARGETS = [pytest.param(target_dict("x86-64-v3"), id="avx2", marks=pytest.mark.skipif(
                   not {"avx2", "fma"} <= _FLAGS, reason="no AVX2+FMA here")),
               pytest.param({"kind": "llvm", "mcpu": "skylake-avx512"}, id="avx512",
                            marks=pytest.mark.skipif("avx512f" not in _FLAGS,
                                                     reason="no AVX-512 here"))]


@pytest.mark.parametrize("spec", X86_TARGETS)
@pytest.mark.parametrize("n,rows,residual,dtype", [
    (96, 1, False, "float32"), (96, 8, True, "float32"), (96, 16, False, "float16"),
    (64, 6, True, "float32"),  # 2 panels: groups of 2
    (160, 3, False, "float32"),  # 5 panels: one stream
    (96, None, True, "float32")])
def test_x86_linear_numerics(spec, n, rows, residual, dtype):
    target, k = c.Target(spec), 80
    sch = x86.LinearRule().apply(ops.linear(n, k, dtype, residual, rows=rows), target, False)
    _run_linear(sch, target, n, k, rows or 5, residual, dtype)


def _matmul_loops(sch):
    """``(extent, kind)`` of the linear's reduction block's loops, outermost first (kind:
    ``parallel``, ``unroll``, ``vectorize`` or ``serial``)."""
    kinds = {0: "serial", 1: "parallel", 2: "vectorize", 3: "unroll"}
    block = next(b for b in sch.get_child_blocks(sch.get_sblock("root"))
                 if sch.get(b).name_hint == "matmul_update")
    out = []
    for loop in sch.get_loops(block):
        f = sch.get(loop)
        unrolled = "pragma_auto_unroll_max_step" in f.annotations or int(f.kind) == 3
        extent = int(f.extent) if isinstance(f.extent, c.tir.IntImm) else str(f.extent)
        out.append((extent, "unroll" if unrolled else kinds[int(f.kind)]))
    return out


def test_x86_linear_tile_streams_three_panels():
    """AVX-512: three 32-column panels a k step, 4 rows a tile (24 zmm accumulators); AVX2:
    three panels, one row (12 ymm) below 16 rows, one panel of 2 rows from there; a panel
    count three does not divide streams fewer;
    prefill (symbolic rows) streams one, 4 rows (AVX-512) or 2 (AVX2); other targets: no
    rule."""
    rule = x86.LinearRule()
    avx512, avx2 = c.Target({"kind": "llvm", "mcpu": "skylake-avx512"}), c.Target(
        target_dict("x86-64-v3"))
    loops = _matmul_loops(rule.apply(ops.linear(192, 64, "float32", rows=8), avx512, False))
    # 6 panels -> 2 groups (parallel) > 2 row tiles > k > 3 panels > 4 rows > 32 lanes
    assert loops == [(2, "parallel"), (2, "serial"), (64, "serial"), (3, "unroll"),
                     (4, "unroll"), (32, "vectorize")]
    loops = _matmul_loops(rule.apply(ops.linear(192, 64, "float32", rows=8), avx2, False))
    assert loops == [(2, "parallel"), (8, "serial"), (64, "serial"), (3, "unroll"),
                     (1, "unroll"), (32, "vectorize")]
    loops = _matmul_loops(rule.apply(ops.linear(192, 64, "float32", rows=16), avx2, False))
    assert loops == [(6, "parallel"), (8, "serial"), (64, "serial"), (2, "unroll"),
                     (32, "vectorize")]  # AVX2 from 16 rows: compute-bound, 2-row tiles
    loops = _matmul_loops(rule.apply(ops.linear(128, 64, "float32", rows=8), avx512, False))
    assert loops[0] == (2, "parallel") and (2, "unroll") in loops  # 4 panels: groups of 2
    loops = _matmul_loops(LinearRule().apply(ops.linear(192, 64, "float32", rows=8), avx512,
                                             False))
    assert loops == [(6, "parallel"), (1, "serial"), (64, "serial"), (8, "unroll"),
                     (32, "vectorize")]  # the generic rule: one stream, 8-row tiles
    for target, rows in ((avx512, 4), (avx2, 2)):  # prefill: one stream
        prefill = _matmul_loops(rule.apply(ops.linear(192, 64, "float32"), target, False))
        assert prefill[0] == (6, "parallel") and prefill[3:] == [(rows, "unroll"),
                                                                 (32, "vectorize")]
    for other in ({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}, target_dict("aarch64")):
        assert rule.apply(ops.linear(192, 64, "float32", rows=8), c.Target(other), False) is None



def test_linear_refuses_sub_panels_of_several_streams():
    """Several panel streams with sub-panels would write back each row tile's columns as
    one range, over sub-panels not yet computed: the rule refuses such a tile rather than
    build a wrong kernel (one stream of sub-panels, ARM's, stays exact)."""
    from hetcomp.schedules.cpu import LinearTile

    class Tiled(LinearRule):
        def __init__(self, tile):
            super().__init__()
            self.fixed = tile

        def tile(self, target, rows):
            return self.fixed

    f = ops.linear(192, 64, "float32", rows=4)
    with pytest.raises(ValueError, match="3 panel streams runs whole 32-column panels"):
        Tiled(LinearTile(3, 4, lanes=16)).apply(f, TARGET, False)
    assert Tiled(LinearTile(3, 4)).apply(f, TARGET, False) is not None
    sch = Tiled(LinearTile(1, 4, lanes=16)).apply(f, TARGET, False)
    _run_linear(sch, TARGET, 192, 64, 4, False, "float32")

def _prefetched(sch) -> list[str]:
    """The weight elements the linear's k loop prefetches each step, as TVMScript prints
    them (``wp[panel, k ahead, column]``), in order."""
    text = sch.mod["main"].script()
    return re.findall(r'call_llvm_intrin\("void", "llvm\.prefetch[^"]*", '
                      r"T\.address_of\((wp\[[^\]]*\])\)", text)


def test_one_tile_x86_linears_prefetch_their_weight_streams():
    """Where a kernel's rows fit one tile (each weight read once, from DRAM), each k step
    prefetches every stream's weights 2 KB ahead, one cache line each: float32 panels (128 B
    a k row) two lines, 16 k rows ahead; float16 one, 32 ahead; clamped to the last row.
    Kernels whose tiles re-read the panels from cache (more rows than a tile, prefill), and
    the generic rule (ARM's too), do not."""
    rule = x86.LinearRule()
    avx512, avx2 = c.Target({"kind": "llvm", "mcpu": "skylake-avx512"}), c.Target(
        target_dict("x86-64-v3"))
    f32 = _prefetched(rule.apply(ops.linear(192, 64, "float32", rows=4), avx512, False))
    assert f32 == [f"wp[j_0 * T.int64(3){p}, T.min(k + T.int64(16), T.int64(63)), "
                   f"T.int64({col})]" for p in ("", " + T.int64(1)", " + T.int64(2)")
                   for col in (0, 16)]
    f16 = _prefetched(rule.apply(ops.linear(192, 64, "float16", rows=2), avx512, False))
    assert [re.sub(r"\s+", "", e) for e in f16] == [
        f"wp[j_0*T.int64(3){p},T.min(k+T.int64(32),T.int64(63)),T.int64(0)]"
        for p in ("", "+T.int64(1)", "+T.int64(2)")]
    assert len(_prefetched(rule.apply(ops.linear(192, 64, "float32", rows=1), avx2, False))) == 6
    for target, rows in ((avx512, 8), (avx2, 2), (avx512, None), (avx2, None)):
        assert _prefetched(rule.apply(ops.linear(192, 64, "float32", rows=rows), target,
                                      False)) == []
    assert _prefetched(LinearRule().apply(ops.linear(192, 64, "float32", rows=1), avx512,
                                          False)) == []
    lib = c.compile(c.IRModule({"main": rule.apply(ops.linear(192, 64, "float16", rows=2),
                                                   avx512, False).mod["main"]}),
                    target=avx512)
    assert "prefetcht0" in lib.mod.inspect_source("s")  # what LLVM made of it


def test_prefetching_follows_the_cpu():
    """Which one-tile kernels prefetch is the CPU's (``mcpu``): on Intel's cores and CPUs
    not named (``x86-64-v3``) every kind; on AMD Zen not the float linear, the dequantizing
    quantized linear still, the int8-dot one only with 8 rows (its 8-row tile)."""
    from hetcomp.kernels import quant
    from hetcomp.schedules.int8_dot import use_int8_dot_kernels

    def quant_prefetches(func):
        return "llvm.prefetch" in func.script()

    int8 = c.IRModule({f"k{rows}": quant.linear_quant(64, 64, "q8_0", rows=rows).with_attr(
        "global_symbol", f"k{rows}") for rows in (1, 4, 8)})
    for mcpu, linear, int8_rows in (("sapphirerapids", True, [1, 4, 8]),
                                    ("skylake-avx512", True, None),
                                    ("znver4", False, [8]), ("znver3", False, None),
                                    ("x86-64-v3", True, None)):
        target = c.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
        for rows in (1, 2, 4):
            sch = x86.LinearRule().apply(ops.linear(192, 64, "float16", rows=rows), target,
                                         False)
            want = linear and (rows == 1 or x86.is_llvm_with(target, "avx512f"))
            assert bool(_prefetched(sch)) == want, (mcpu, rows)
        sch = x86.QuantLinearRule().apply(quant.linear_quant(64, 64, "q4_1", rows=1), target,
                                          False)
        assert quant_prefetches(sch.mod["main"]), mcpu
        if int8_rows is not None:
            out = use_int8_dot_kernels(int8, target)
            assert [r for r in (1, 4, 8) if quant_prefetches(out[f"k{r}"])] == int8_rows, mcpu


@pytest.mark.skipif(x86.LinearRule().tile(TARGET, 1) is None,
                    reason="not an x86 CPU with AVX2 or AVX-512")
def test_compile_builds_prefetching_decode_linears(tmp_path, tiny_loaded):
    """What ``hetcomp compile`` builds for this CPU (``compile_model``, the tiny model):
    the W = 1 decode step's linears prefetch their weights where this CPU gains by it (not
    on AMD Zen: :func:`hetcomp.schedules.x86.prefetch_for`); the widest verify's and
    prefill's (tiles that re-read panels from cache) never do."""
    from hetcomp.driver.compile import CompileOptions, compile_model
    from hetcomp.testing.gpu import capture_scheduled

    scheduled = []
    with capture_scheduled(scheduled):
        compile_model(CompileOptions(model="tiny"), str(tmp_path / "art"), quiet=True,
                      weights=tiny_loaded)
    linears = {gv.name_hint: f for gv, f in scheduled[0].functions_items()
               if isinstance(f, c.tir.PrimFunc) and f.attrs is not None
               and str(f.attrs.get("hetcomp.op_kind", "")) == "linear"}
    by_width = {}
    for name, f in linears.items():
        width = re.search(r"_w(\d+)$", name)
        by_width.setdefault(int(width.group(1)) if width else None, []).append(
            bool(_prefetched(c.Schedule(f))))
    # q/k/v, gate/up, o, down, the LM head
    assert by_width.pop(1) == [bool(x86.prefetch_for(TARGET).linear)] * 5
    assert by_width and all(not any(v) for v in by_width.values()), by_width


@pytest.mark.parametrize("spec", X86_TARGETS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_prefetching_x86_linear_numerics(spec, dtype):
    """A prefetching kernel (one row tile) whose k loop is shorter than the distance ahead
    (every step's prefetch clamped) and one barely longer."""
    target = c.Target(spec)
    rows = 4 if spec.get("mcpu") == "skylake-avx512" else 1  # one tile: AVX-512 holds 4 rows
    for k in (8, 40):
        sch = x86.LinearRule().apply(ops.linear(96, k, dtype, rows=rows), target, False)
        assert _prefetched(sch)
        _run_linear(sch, target, 96, k, rows, False, dtype)


@pytest.mark.parametrize("rows", [1, 8, 24, None])
def test_rms_norm_matches_numpy(rows):
    """The sum of squares runs in vector partials (rfactor); rows use threads only where the
    kernel is big enough (24 x 576 here, and prefill's symbolic rows)."""
    e, w = 576, rows or 5
    sch = RowwiseRule().apply(ops.rms_norm(e, 1e-5, rows=rows), TARGET, False)
    text = sch.mod["main"].script()
    assert 'T.sblock("sumsq_rf")' in text
    assert ("T.parallel" in text) == (rows in (24, None))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((w, e)).astype("float32")
    g = rng.standard_normal(e).astype("float32")
    y = _tvm.tensor(np.zeros((w, e), "float32"))
    _build(sch)(_tvm.tensor(x), _tvm.tensor(g), y)
    xd = x.astype(np.float64)
    ref = xd / np.sqrt((xd * xd).mean(-1, keepdims=True) + 1e-5) * g
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3])
def test_rope_table_and_rope_kv_match_numpy(rows):
    """The step's cos/sin table, then one layer's rotation: queries returned, roped K and the
    V rows written to the cache slots ``n + i`` of that layer only and returned row-major."""
    from hetcomp.testing.numpy_llama import rope

    hq, g, d, layers, context, theta, layer, n = 4, 2, 16, 2, 32, 10000.0, 1, 7
    table = _build(ElementwiseRule().apply(ops.rope_table(d, theta, rows=rows), TARGET, False))
    rope_kv = _build(script_ops.rope_kv(hq, g, d, layers, context)
                     .with_attr("global_symbol", "main"))
    rng = np.random.default_rng(4)
    pos = (n + np.arange(rows)).astype("int32")
    qkv = rng.standard_normal((rows, (hq + 2 * g) * d)).astype("float32")
    cs = _tvm.tensor(np.zeros((rows, d), "float32"))
    table(_tvm.tensor(pos), cs)
    ang = pos[:, None].astype(np.float64) / theta ** (np.arange(0, d, 2) / d)
    np.testing.assert_allclose(cs.numpy(), np.concatenate([np.cos(ang), np.sin(ang)], 1),
                               rtol=1e-5, atol=1e-5)
    kc = _tvm.tensor(np.zeros((layers, g, d, context), "float32"))
    vc = _tvm.tensor(np.zeros((layers, g, context, d), "float32"))
    q = _tvm.tensor(np.zeros((hq, rows, d), "float32"))
    k_tree = _tvm.tensor(np.zeros((g, rows, d), "float32"))
    v_tree = _tvm.tensor(np.zeros((g, rows, d), "float32"))
    rope_kv(_tvm.tensor(qkv), cs, kc, vc, layer, n, q, k_tree, v_tree)
    heads = qkv.reshape(rows, hq + 2 * g, d).astype(np.float64)
    np.testing.assert_allclose(q.numpy(), rope(heads[:, :hq], pos, theta).transpose(1, 0, 2),
                               rtol=1e-5, atol=1e-5)
    k_ref = np.zeros((layers, g, d, context))
    k_ref[layer, :, :, n: n + rows] = rope(heads[:, hq: hq + g], pos, theta).transpose(1, 2, 0)
    np.testing.assert_allclose(kc.numpy(), k_ref, rtol=1e-5, atol=1e-5)
    # The same keys row-major, as the sparse tree-attention kernel reads them.
    np.testing.assert_array_equal(k_tree.numpy(), kc.numpy()[layer, :, :, n: n + rows]
                                  .transpose(0, 2, 1))
    v_ref = np.zeros((layers, g, context, d))
    v_ref[layer, :, n: n + rows] = heads[:, hq + g:].transpose(1, 0, 2)
    np.testing.assert_array_equal(vc.numpy(), v_ref.astype("float32"))
    # The values in the keys' layout: all the sparse part reads of this layer's tree.
    np.testing.assert_array_equal(v_tree.numpy(), v_ref[layer, :, n: n + rows].astype("float32"))


def _build(sch_or_func):
    func = sch_or_func.mod["main"] if hasattr(sch_or_func, "mod") else sch_or_func
    return c.compile(c.IRModule({"main": func}), target=TARGET)["main"]


def test_fast_exp_matches_numpy():
    """Within a float32 ulp on the softmax/SiLU range; -inf gives exactly 0."""
    te = c.te
    n = 4099
    x = te.placeholder((n,), "float32", name="x")
    y = te.compute((n,), lambda i: ops.fast_exp(x[i]), name="y")
    sch = c.Schedule(te.create_prim_func([x, y]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("y"))[0], [None, 16])
    sch.vectorize(inner)
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.uniform(-87, 88, n - 3), [-np.inf, 0.0, -200.0]]).astype("float32")
    out = _tvm.tensor(np.zeros(n, "float32"))
    _build(sch)(_tvm.tensor(xs), out)
    got, ref = out.numpy().astype(np.float64), np.exp(xs.astype(np.float64))
    np.testing.assert_allclose(got[:-3], ref[:-3], rtol=2e-7)
    assert got[-3] == 0.0 and got[-2] == 1.0 and got[-1] == 0.0


@pytest.mark.parametrize("rows,vocab", [(1, 1000), (5, 1000), (None, 1000), (2, 1001)])
def test_argmax_first_index_of_maximum(rows, vocab):
    """numpy's rule: the first index of the maximum, also across vector lanes and ties."""
    w = rows or 3
    lib = _build(ArgmaxRule().apply(ops.argmax(vocab, rows=rows), TARGET, False))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((w, vocab)).astype("float32")
    x[0, [17, 18, 700]] = 9.0  # tie across lanes and tiles: 17 wins
    x[-1, [999, 300]] = 30.0  # tie in the last row: 300 wins over 999 (a later lane tile)
    out = _tvm.tensor(np.zeros(w, "int32"))
    lib(_tvm.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), x.argmax(axis=1))
    assert out.numpy()[-1] == 300 and (w == 1 or out.numpy()[0] == 17)


@pytest.mark.parametrize("context,rows,n", [(64, 4, 37), (64, 8, 56), (60, 3, 9), (61, 2, 0),
                                            (61, 1, 5)])
def test_attention_matches_numpy(context, rows, n):
    """Keys rounded up to whole tiles (16, 4 and 1 here) up to the cache end; the masked and
    padded keys get weight 0 even where the cache holds other values."""
    hq, g, d, layers, layer = 4, 2, 16, 2, 1
    assert ops.key_tile(context) == {64: 16, 60: 4, 61: 1}[context]
    lib = _build(AttentionRule().apply(ops.attention(hq, g, d, layers, context, rows=rows),
                                       TARGET, False))
    rng = np.random.default_rng(2)
    q = rng.standard_normal((hq, rows, d)).astype("float32")
    kt = rng.standard_normal((layers, g, d, context)).astype("float32") * 3  # stale beyond n+w
    vc = rng.standard_normal((layers, g, context, d)).astype("float32")
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, rows)]
    mask = np.eye(rows, dtype="int32")
    for i, p in enumerate(parents):
        while p >= 0:
            mask[i, p], p = 1, parents[p]
    out = _tvm.tensor(np.zeros((rows, hq, d), "float32"))
    lib(*[_tvm.tensor(a) for a in (q, kt, vc, mask)], layer, n, out)
    k = np.repeat(kt[layer], hq // g, axis=0)[:, :, : n + rows]
    v = np.repeat(vc[layer], hq // g, axis=0)[:, : n + rows]
    s = np.einsum("hid,hdj->hij", q.astype(np.float64), k) / np.sqrt(d)
    valid = np.concatenate([np.ones((rows, n), bool), mask != 0], axis=1)
    s = np.where(valid[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("hij,hjd->ihd", p / p.sum(-1, keepdims=True), v)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)
