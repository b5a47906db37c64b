"""``x86.Int8DotLinear`` / ``arm.Int8DotLinear``: block-quantized linears on int8 activations
and integer dot products (AVX-512 VNNI, NEON ``sdot``).

Numerics against numpy (gguf's dequantized weights, the activations quantized per row and
32-weight block as the module doc defines it; the NEON kernel under qemu), which kernels the
swap takes (eligible formats, panels and targets), and that the swapped kernel keeps the
signature it replaces.
"""

import re

import numpy as np
import pytest
import tvm

from hetcomp import _tvm
from hetcomp.codegen.build import schedule_module
from hetcomp.codegen.cross import CrossToolchain, QemuKernel
from hetcomp.codegen.targets import make_target
from hetcomp.hardware import target_dict
from hetcomp.kernels import ops, quant
from hetcomp.schedules.apply import RULE_ATTR
from hetcomp.schedules.int8_dot import (
    INT8_DOT_RULE,
    NEON_DOT,
    has_int8_dot,
    linear_int8_dot,
    use_int8_dot_kernels,
)

c = _tvm.compiler()
HOST = make_target("host")
TOOLCHAIN = CrossToolchain.find()
needs_vnni = pytest.mark.skipif(not has_int8_dot(HOST),
                                reason="this CPU lacks AVX-512 VNNI/VBMI")


def int8_reference(x: np.ndarray, m: quant.QuantMatrix) -> np.ndarray:
    """``dequant(xq) @ dequant(W).T`` in float64: ``x`` quantized per row and block of 32,
    ``dx = max|x| / 127``, ``xq = rint(x * (127 / max|x|))`` (float32, as the kernel)."""
    w, k = x.shape
    xb = x.reshape(w, k // 32, 32)
    amax = np.abs(xb).max(-1)
    safe = np.where(amax > 0, amax, np.float32(1))
    inv = np.where(amax > 0, np.float32(127) / safe, np.float32(0)).astype(np.float32)
    xq = np.rint(xb * inv[..., None])
    assert np.abs(xq).max() <= 127
    dx = (amax / np.float32(127)).astype(np.float32)
    xd = (xq.astype(np.float64) * dx[..., None]).reshape(w, k)
    return xd @ m.dequantize().astype(np.float64).T


def _run(func, args):
    f = c.compile(c.IRModule({"main": func}), target=HOST)["main"]
    dev = tvm.cpu()
    bufs = [tvm.runtime.tensor(a, dev) for a in args]
    f(*bufs)
    return bufs[-1].numpy()


@needs_vnni
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("rows,n,k,residual", [
    (1, 96, 128, False),   # one row: no tile loop
    (4, 64, 96, True),     # one 4-row tile, with the residual
    (6, 96, 64, False),    # 2-row tiles (8 and 4 do not divide 6)
    (16, 128, 256, False),  # two 8-row tiles
    (None, 96, 128, True),  # symbolic rows (11 here): one 8-row tile, then 3 rows one by one
])
def test_matches_numpy_on_int8_activations(qtype, rows, n, k, residual):
    rng = np.random.default_rng(5)
    m = quant.QuantMatrix.quantize(rng.standard_normal((n, k)).astype("float32"), qtype)
    w = rows or 11
    x = rng.standard_normal((w, k)).astype("float32")
    x[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    x[-1, 32:64] *= 1000.0  # a block far larger than its neighbours: its own scale
    r = rng.standard_normal((w, n)).astype("float32")
    new = linear_int8_dot(quant.linear_quant(n, k, qtype, residual, rows=rows))
    args = [x, quant.pack_quant_weight(m)] + ([r] if residual else []) + [
        np.zeros((w, n), "float32")]
    got = _run(new, args)
    want = int8_reference(x, m) + (r if residual else 0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    # ... and it is not the float activations' result: the int8 rounding shows.
    exact = x.astype(np.float64) @ m.dequantize().astype(np.float64).T + (r if residual else 0)
    assert np.abs(got - exact).max() > 1e-4 * np.abs(exact).max()


def test_one_tile_kernels_prefetch_each_block_ahead():
    """A kernel whose rows fit one tile (each block read once, from DRAM) prefetches the
    cache lines 2 KB ahead of each k block (q4_1's 640-byte block: ten lines; clamped to the
    weights' last byte); more rows than a tile, symbolic rows and NEON's passes do not."""
    def prefetched(func):
        """``(k blocks, block bytes, bytes ahead, last byte)`` of each prefetch, in order:
        the address is ``min((panel * blocks + k block) * block bytes + ahead, last)``."""
        return [tuple(map(int, m)) for m in re.findall(
            r'llvm\.prefetch[^"]*", T\.address_of\(\w+\[T\.min\(\(\w+ \* T\.int64\((\d+)\) '
            r"\+ \w+\) \* T\.int64\((\d+)\) \+ T\.int64\((\d+)\), T\.int64\((\d+)\)\)\]",
            func.script())]

    got = prefetched(linear_int8_dot(quant.linear_quant(96, 128, "q4_1", rows=4)))
    assert got == [(4, 640, 2048 + line, 3 * 4 * 640 - 1) for line in range(0, 640, 64)]
    assert len(prefetched(linear_int8_dot(quant.linear_quant(96, 128, "q8_0", rows=1)))) == 17
    for rows in (16, 6, None):
        assert prefetched(linear_int8_dot(quant.linear_quant(96, 128, "q4_1", rows=rows))) == []
    assert prefetched(linear_int8_dot(quant.linear_quant(96, 128, "q4_1", rows=4),
                                      NEON_DOT)) == []


def _nan_case():
    rng = np.random.default_rng(8)
    m = quant.QuantMatrix.quantize(rng.standard_normal((64, 64)).astype("float32"), "q4_0")
    x = rng.standard_normal((4, 64)).astype("float32")
    x[0, 5], x[2, 40] = np.nan, np.inf
    return m, x


def _assert_nan_rows(got, x, m):
    """Rows with a NaN or inf input are NaN throughout (as the dequantizing kernel's); the
    others are the numpy result."""
    assert np.isnan(got[[0, 2]]).all()
    want = int8_reference(x[[1, 3]], m)
    np.testing.assert_allclose(got[[1, 3]], want, rtol=0, atol=2e-6 * np.abs(want).max())


@needs_vnni
def test_nan_and_inf_inputs_propagate():
    """A NaN used to vanish: the block maximum skipped it (maxnum) and rint(NaN) became an
    int8 0, so a blown-up activation gave a finite, wrong row."""
    m, x = _nan_case()
    func = linear_int8_dot(quant.linear_quant(64, 64, "q4_0", rows=4))
    _assert_nan_rows(_run(func, [x, quant.pack_quant_weight(m), np.zeros((4, 64), "float32")]),
                     x, m)


@pytest.mark.skipif(TOOLCHAIN is None, reason="aarch64-linux-gnu-gcc or qemu-aarch64 missing")
def test_neon_nan_and_inf_inputs_propagate(tmp_path):
    m, x = _nan_case()
    func = linear_int8_dot(quant.linear_quant(64, 64, "q4_0", rows=4), NEON_DOT)
    kern = QemuKernel(func, "linear_quant", num_outputs=1, workdir=str(tmp_path),
                      toolchain=TOOLCHAIN, target=target_dict("aarch64-dotprod"))
    (got,) = kern(x, quant.pack_quant_weight(m))
    _assert_nan_rows(got, x, m)


def _module(*funcs):
    return c.IRModule({f"k{i}": f.with_attr("global_symbol", f"k{i}")
                       for i, f in enumerate(funcs)})


def test_swap_takes_only_unfused_quantized_linears_of_whole_panels():
    """q4_0 / q4_1 / q8_0 linears with 32-column panels are swapped; a float linear, a
    fused quantized linear, 16-column panels (n = 48) and a kernel already scheduled (a
    tuning record) are not; neither on a CPU without VNNI (AVX2, aarch64)."""
    vnni = c.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    funcs = [quant.linear_quant(64, 64, "q4_0", rows=4),
             quant.linear_quant(64, 64, "q8_0", True, rows=None),
             quant.linear_quant(64, 64, "q4_1", rows=1),
             ops.linear(64, 64, "float32", rows=4),
             quant.linear_quant(64, 64, "q4_0", rows=4, norm_eps=1e-5),
             quant.linear_quant(48, 64, "q4_0", rows=4),
             quant.linear_quant(64, 64, "q4_0", rows=2).with_attr("tirx.is_scheduled", True)]
    mod = _module(*funcs)
    out = use_int8_dot_kernels(mod, vnni)
    rules = [str(out[f"k{i}"].attrs.get(RULE_ATTR, "")) for i in range(len(funcs))]
    assert rules == [INT8_DOT_RULE] * 3 + [""] * 4
    for i in range(3):  # the signature (buffers, shapes, dtypes) and attributes are kept
        old, new = mod[f"k{i}"], out[f"k{i}"]
        assert [(str(p.shape), p.dtype) for p in old.params] == [
            (str(p.shape), p.dtype) for p in new.params]
        for key in ("global_symbol", "hetcomp.op_kind", "hetcomp.n", "hetcomp.qtype",
                    "hetcomp.residual"):
            assert str(new.attrs[key]) == str(old.attrs[key])
    assert mod["k0"].attrs.get(RULE_ATTR) is None  # the input module is not modified
    for target in ("x86-64-v3", "aarch64"):
        assert use_int8_dot_kernels(mod, make_target(target)).same_as(mod), target
    arm = use_int8_dot_kernels(mod, make_target("aarch64-dotprod"))
    assert [str(arm[f"k{i}"].attrs.get(RULE_ATTR, "")) for i in range(len(funcs))] == [
        "arm.Int8DotLinear"] * 3 + [""] * 4


@pytest.mark.skipif(TOOLCHAIN is None, reason="aarch64-linux-gnu-gcc or qemu-aarch64 missing")
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
@pytest.mark.parametrize("rows,n,k,residual", [
    (1, 96, 128, False), (6, 64, 96, True), (16, 96, 128, False), (None, 96, 128, True)])
def test_neon_sdot_matches_numpy_under_qemu(tmp_path, qtype, rows, n, k, residual):
    """The NEON ``sdot`` kernel (``--target aarch64-dotprod``), cross-compiled and run under
    qemu: the same numerics as the x86 one, to float rounding."""
    rng = np.random.default_rng(6)
    m = quant.QuantMatrix.quantize(rng.standard_normal((n, k)).astype("float32"), qtype)
    w = rows or 11
    x = rng.standard_normal((w, k)).astype("float32")
    x[0, :32] = 0.0
    r = rng.standard_normal((w, n)).astype("float32")
    func = linear_int8_dot(quant.linear_quant(n, k, qtype, residual, rows=rows), NEON_DOT)
    kern = QemuKernel(func, "linear_quant", num_outputs=1, workdir=str(tmp_path),
                      toolchain=TOOLCHAIN, target=target_dict("aarch64-dotprod"))
    (got,) = kern(x, quant.pack_quant_weight(m), *([r] if residual else []))
    want = int8_reference(x, m) + (r if residual else 0.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max())
    # (a block's 8 sdot a row and 4-column part, both parts of a pass unrolled)
    assert len(re.findall(r"\bsdot\b", kern.asm)) >= 16


@needs_vnni
def test_schedule_units_swaps_by_default_and_not_when_told():
    """ScheduleUnits (what compile and the profiler run) picks the int8 kernel on this
    host, the dequantizing rule with ``int8_dot=False``; the two agree to the activations'
    int8 rounding."""
    from hetcomp.passes.schedule_units import ScheduleUnits

    n, k, w = 96, 128, 4
    mod = _module(quant.linear_quant(n, k, "q4_1", rows=w))
    with HOST:
        on = schedule_module(mod, HOST)
        off = ScheduleUnits(HOST, int8_dot=False)(mod)
    assert str(on["k0"].attrs[RULE_ATTR]) == INT8_DOT_RULE
    assert str(off["k0"].attrs[RULE_ATTR]) == "x86.QuantLinear"
    rng = np.random.default_rng(2)
    m = quant.QuantMatrix.quantize(rng.standard_normal((n, k)).astype("float32"), "q4_1")
    x = rng.standard_normal((w, k)).astype("float32")
    args = [x, quant.pack_quant_weight(m), np.zeros((w, n), "float32")]
    a = _run(on["k0"].with_attr("global_symbol", "main"), args)
    b = _run(off["k0"].with_attr("global_symbol", "main"), args)
    scale = np.abs(b).max()
    assert 1e-5 * scale < np.abs(a - b).max() < 3e-2 * scale
