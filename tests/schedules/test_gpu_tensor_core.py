"""``gpu.TensorCoreLinear``: float16 linears at 16-64 rows on WMMA tensor cores. No GPU here:
the schedule with its WMMA tiles as plain blocks (``tensorize=False``: the same loops,
buffers and thread bindings) runs on the CPU with its thread loops serial, against numpy;
the tensorized kernel is checked by TVM's CUDA codegen (which fragments, which loads, how
many barriers) and nvcc's register report."""

import re
import shutil

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.kernels import ops
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.gpu import TensorCoreLinearRule, gpu_rules
from hetcomp.testing import fused_linear_reference
from hetcomp.testing.gpu import assert_no_stack, cpu_form, thread_bindings

c = _tvm.compiler()
CUDA = c.Target({"kind": "cuda", "arch": "sm_90"})
HOST = c.Target({"kind": "llvm"})
# (norm eps, activation, bias, residual): every form FuseLinearChains makes, and the plain
# linear with and without the residual add.
FORMS = {"plain": (None, None, False, False), "residual": (None, None, False, True),
         "norm": (1e-5, None, False, False), "norm_silu": (1e-5, "silu", False, False),
         "silu": (None, "silu", False, False), "norm_gelu": (1e-6, "gelu_tanh", False, False),
         "norm_bias": (1e-5, None, True, False), "bias": (None, None, True, False)}


def _inputs(rows, n, k, seed, scale=4.0):
    rng = np.random.default_rng(seed)
    return {"x": (rng.standard_normal((rows, k)) * scale).astype("float32"),
            "g": rng.standard_normal(k).astype("float32"),
            "b": rng.standard_normal(n).astype("float32"),
            "r": rng.standard_normal((rows, n)).astype("float32"),
            "w": (rng.standard_normal((n, k)) * 0.1).astype("float16")}


def _run(func, form, a, rows, n):
    eps, act, bias, res = FORMS[form]
    lib = c.compile(c.IRModule({"main": func}), target=HOST)
    y = _tvm.tensor(np.zeros((rows, n // 2 if act else n), "float32"))
    args = [a["x"], *([a["g"]] if eps else []), ops.pack_linear_weight(a["w"], "float16"),
            *([a["b"]] if bias else []), *([a["r"]] if res else [])]
    lib["main"](*[_tvm.tensor(v) for v in args], y)
    return y.numpy()


def _reference(form, a):
    eps, act, bias, res = FORMS[form]
    want = fused_linear_reference(a["x"], a["w"], a["g"] if eps else None, eps, act,
                                  bias=a["b"] if bias else None)
    return want + a["r"] if res else want


def _linear(form, rows, n=192, k=128):
    eps, act, bias, res = FORMS[form]
    return ops.linear(n, k, "float16", res, rows=rows, norm_eps=eps, activation=act, bias=bias)


# Four column tiles of a gated kernel at 64 rows would be 32 accumulators a warp, more than
# the registers hold (test_warps_and_column_tiles_fit): two there.
@pytest.mark.parametrize("form,rows,tiles", [
    (form, rows, 2 if FORMS[form][1] and (rows, tiles) == (64, 4) else tiles)
    for form in FORMS for rows, tiles in ((16, 1), (64, 1), (16, 4), (64, 4), (32, 2))])
def test_schedule_matches_numpy(form, rows, tiles):
    """Every form at 16 and 64 rows, one or four 16-column tiles a block (the rule takes
    four where the grid stays large: ``min_blocks``; two when told: the device kit's
    ``tensorcore2``), the WMMA tiles as plain blocks and the
    thread loops serial (sound: the warps' partials meet in shared memory and a later stage
    sums them; a fused norm's squares are a reduction over the lanes, a plain reduction when
    serial), against float64 numpy: within 2e-6 of the result's scale. x split into hi and lo
    float16 terms is what keeps it there: x in float16 alone misses by ~1e-4 (the next
    test)."""
    n = 256
    a = _inputs(rows, n, 128, seed=rows)
    rule = (TensorCoreLinearRule(tensorize=False, tiles=2) if tiles == 2 else
            TensorCoreLinearRule(tensorize=False, min_blocks=1 if tiles > 1 else 10**6))
    halves = 2 if FORMS[form][1] else 1
    assert rule.column_tiles(n // halves, rows, halves) == tiles
    sch = rule.apply(_linear(form, rows, n=n), CUDA, False)
    got, want = _run(cpu_form(sch.mod["main"]), form, a, rows, n), _reference(form, a)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


def _staging(rule, rows, n, k, halves=1):
    """(warps a block, x's staging rounds) the rule picks for a layer."""
    tiles = rule.column_tiles(n, rows, halves)
    slices = rule.slices(rows, halves, k, tiles)
    return slices, rule.staging_rounds(rows, halves, k, tiles, slices)


@pytest.mark.parametrize("form", ["residual", "norm"])
def test_fewest_rounds_trades_warps_for_barriers(form):
    """``fewest_rounds`` (the device kit's ``tensorcore_rounds``): SmolLM2's o and qkv at 64
    rows stage x in 4 rounds with one warp a block, not 9 with four; its down at 32 rows in
    6 with four warps, not 12 with eight; at 16 rows (one round already) nothing changes. The
    one-warp schedule still matches float64 numpy."""
    most, fewest = TensorCoreLinearRule(), TensorCoreLinearRule(fewest_rounds=True)
    assert _staging(most, 64, 576, 576) == (4, 9) and _staging(fewest, 64, 576, 576) == (1, 4)
    assert _staging(most, 32, 576, 1536) == (8, 12)
    assert _staging(fewest, 32, 576, 1536) == (4, 6)
    assert _staging(most, 16, 960, 576) == _staging(fewest, 16, 960, 576) == (4, 1)
    rows, n, k = 64, 128, 576
    rule = TensorCoreLinearRule(tensorize=False, fewest_rounds=True)
    assert _staging(rule, rows, n, k) == (1, 4)
    sch = rule.apply(_linear(form, rows, n=n, k=k), CUDA, False)
    assert ("threadIdx.y", 1) in thread_bindings(sch.mod["main"])
    a = _inputs(rows, n, k, seed=5)
    got, want = _run(cpu_form(sch.mod["main"]), form, a, rows, n), _reference(form, a)
    assert np.abs(got - want).max() <= 2e-6 * np.abs(want).max()


@pytest.mark.parametrize("form", ["residual", "norm_silu"])
def test_rows_beyond_float16_range(form):
    """Rows of magnitude 1e6 (past float16's 65504) and an all-zero row: each row is split
    over its largest magnitude, so the result keeps its accuracy (unscaled, hi would be
    inf)."""
    rows = 16
    a = _inputs(rows, 256, 128, seed=9)
    a["x"][3] *= 2.5e5
    a["x"][5] = 0.0
    sch = TensorCoreLinearRule(tensorize=False).apply(_linear(form, rows, n=256), CUDA, False)
    got, want = _run(cpu_form(sch.mod["main"]), form, a, rows, 256), _reference(form, a)
    assert np.isfinite(got).all()
    for row in range(rows):
        scale = np.abs(want[row]).max() or 1.0
        assert np.abs(got[row] - want[row]).max() <= 2e-6 * scale, row


def test_the_lo_term_is_what_keeps_float32_accuracy():
    """The same kernel with x's lo term zeroed (x in float16 alone) misses numpy by more
    than 20x the bound above: the split is needed, and the test above can fail."""
    rows, form = 16, "plain"
    a = _inputs(rows, 192, 128, seed=3)
    func = cpu_form(TensorCoreLinearRule(tensorize=False).apply(_linear(form, rows), CUDA,
                                                                False).mod["main"])
    text = func.script()
    # the lo rows' value (x - f16(x), in float16) -> 0
    lo = re.search(r'T\.Cast\("float16", (x\[.+?\]) - T\.Cast\("float32", T\.Cast\("float16", '
                   r'\1\)\)\)', text)
    assert lo is not None
    broken = _tvm.tvm.script.from_source(text.replace(lo.group(0), 'T.float16(0.0)'))
    got, want = _run(broken, form, a, rows, 192), _reference(form, a)
    assert np.abs(got - want).max() > 4e-5 * np.abs(want).max()


def test_same_arguments_as_the_kernel_it_replaces():
    """The rule schedules the ``split_x`` form: the same parameters (names, shapes, dtypes)
    and attributes, so the Relax call that passed them to the original still fits."""
    for form in FORMS:
        func = _linear(form, 32)
        sched = TensorCoreLinearRule().apply(func, CUDA, False).mod["main"]
        assert [(str(p.name), [int(d) for d in p.shape], str(p.dtype)) for p in func.params] == [
            (str(p.name), [int(d) for d in p.shape], str(p.dtype)) for p in sched.params]
        for key, value in func.attrs.items():
            assert str(sched.attrs[key]) == str(value)


@pytest.mark.parametrize("form,rows,fragments,w_tiles,x_steps", [
    ("residual", 16, 1, 9, 9), ("norm_silu", 64, 8, 12, 3), ("norm", 64, 16, 4, 1)])
def test_cuda_source_multiplies_on_tensor_cores(form, rows, fragments, w_tiles, x_steps):
    """The CUDA kernel: WMMA fragments (16x16x16, float16 in, float32 accumulators), one per
    row tile and column tile (and half; the LM head takes four column tiles a block); W's
    tiles of the next D steps loaded straight from the packed weights (global memory,
    leading dimension the pack block) into D x J (x halves) fragments before any is used,
    x's terms from shared memory, staged D_x steps at a time by each warp for its own slice
    of K; two barriers around each staging, one before the partials are summed; a fused
    norm's squares by warp shuffles in the same pass as the rows' largest magnitudes, a few
    rows at a time. SmolLM2's o at 16 rows (4 warps of 9 steps): every W tile of a warp's
    slice at once, first in the kernel, x staged once; gate_up at
    64 rows (2 warps of 18 steps): 6 steps of both halves, x 3 steps at a time; the LM head
    at 64 rows (4 column tiles, 2 warps): a step at a time."""
    n = {"residual": 576, "norm_silu": 3072, "norm": 49152}[form]  # o, gate_up, LM head
    rule = TensorCoreLinearRule()
    halves = 2 if form == "norm_silu" else 1
    tiles = rule.column_tiles(n // halves, rows, halves)
    slices = rule.slices(rows, halves, 576, tiles)
    assert rule.depths(rows, halves, 576, tiles, slices) == (w_tiles // (halves * tiles),
                                                             x_steps)
    sch = rule.apply(_linear(form, rows, n=n, k=576), CUDA, False)
    src = c.compile(sch.mod, target=CUDA).mod.imports[0].inspect_source()
    assert re.search(rf"fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> "
                     rf"\w+\[{fragments}\];", src)
    assert "fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half, nvcuda::wmma::row_major>" in src
    assert re.search(rf"fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, "
                     rf"nvcuda::wmma::row_major> wp_wmma_matrix_b_ptr\[{w_tiles}\];", src)
    body = kernel = src[src.rindex("main_kernel("):]
    load_b = re.search(
        r"load_matrix_sync\(wp_wmma_matrix_b_ptr\[.+?\], \(&\(wp_ptr\[.+\]\)\), 32\)", body)
    store = re.search(r"\n\s*(x_split\w*_shared_ptr)\[(.+?)\] = ", body)
    load_a = re.search(r"load_matrix_sync\(\w+_matrix_a_ptr\[0\], \(&\(x_split\w*_shared_ptr"
                       r"\[(.+?)\]\)\)", body)
    assert load_b and store and load_a
    # W's loads come first, then x's staging (barriers between), then the products; with
    # all of a warp's steps in fragments (D = S: o at 16 rows), ahead of the rows' reductions
    assert load_b.start() < store.start() < load_a.start()
    whole = w_tiles // (halves * tiles) == 576 // (16 * slices)
    assert (load_b.start() < kernel.index("__shfl_down_sync")) == whole
    # x's terms: a buffer of every warp's D_x steps of 2W rows; each warp writes and reads
    # its own part (threadIdx.y * (D_x x 2W x 16)): no warp reads what another writes
    # between two barriers (a race serial emulation would hide)
    part = x_steps * 2 * rows * 16
    assert re.search(rf"half {store.group(1)}\[{slices * part}\];", src)
    assert f"((int)threadIdx.y) * {part})" in store.group(2)
    assert f"((int)threadIdx.y) * {part})" in load_a.group(1)
    assert src.count("mma_sync(") == 1 and src.count("__syncthreads()") == 3
    # the rows' largest magnitudes and a norm's sums of squares by warp shuffles, in one
    # pass over the rows before the first barrier, 4 rows (18 loads a lane each) unrolled
    prologue = kernel[:kernel.index("__syncthreads()")]
    stats = ("x_max", "sumsq") if form.startswith("norm") else ("x_max",)
    assert all(re.search(rf"\n\s*{b}_shared_ptr\[.+\] = red_buf", prologue) for b in stats)
    assert len(re.findall(r"__shfl_down_sync\(mask_ptr", prologue)) == 5 * len(stats)
    assert len(re.findall(r"__shfl_down_sync\(mask_ptr", src)) == 5 * len(stats)
    loops = re.findall(r"#pragma unroll\n\s*for \(int (\w+) = 0; \1 < (\d+); ",
                       prologue[:prologue.index("__shfl_down_sync")])
    assert loops and loops[-1][1] == "4"  # the rows' loop, the last unrolled one before
    # x's staging: a lane's values 8 at a time, hi and lo of each from one load
    staging = kernel[kernel.index("__syncthreads()"):kernel.index(load_a.group(0))]
    assert re.search(r"#pragma unroll\n\s*for \(int (\w+) = 0; \1 < 8; \+\+\1\) \{\n"
                     r"\s*#pragma unroll\n\s*for \(int (\w+) = 0; \2 < 2; ", staging)


@pytest.mark.parametrize("k,unrolled", [(576, 4), (1536, 2), (4864, 1)])
def test_row_reduction_unrolls_within_registers(k, unrolled):
    """The rows' reductions unroll as many of a warp's rows as keep K / 32 values a lane
    within 96 registers: 4 for SmolLM2's K = 576, 2 for its down (1536), none for
    Qwen2.5-Coder-0.5B's down (4864), which the rule still takes."""
    src = c.compile(TensorCoreLinearRule().apply(_linear("residual", 16, n=896, k=k), CUDA,
                                                 False).mod, target=CUDA).mod.imports[0]
    kernel = src.inspect_source()
    kernel = kernel[kernel.rindex("main_kernel("):]
    head = kernel[:kernel.index("__shfl_down_sync")]
    init = r"\{\n\s*in_thread_x_max\w*\[0\] = -"  # a row's reduction begins
    rows = re.findall(r"for \(int (\w+) = 0; \1 < (\d+); \+\+\1\) " + init, head)
    pragma = re.search(r"#pragma unroll\n\s*for \(int \w+ = 0; \w+ < \d+; \+\+\w+\) " + init,
                       head)
    assert rows and (rows[-1][1] == str(unrolled) if unrolled > 1 else pragma is None)


@pytest.mark.parametrize("dtype,rows,applies", [("float16", 16, True), ("float16", 32, True),
                                                ("float16", 64, True), ("float16", 1, False),
                                                ("float16", 4, False), ("float16", 24, False),
                                                ("float16", None, False),
                                                ("float32", 64, False)])
def test_gpu_rules_pick_it_for_float16_wide_steps(dtype, rows, applies):
    """gpu_rules gives SmolLM2's float16 gate_up (fused) to the tensor cores at 16, 32 and 64
    rows; narrower or odd widths, prefill's symbolic width and float32 weights keep split K
    (or the column rule)."""
    func = ops.linear(3072, 576, dtype, rows=rows, norm_eps=1e-5, activation="silu")
    with CUDA:
        mod = ApplyRules(*gpu_rules())(c.IRModule({"main": func.with_attr("global_symbol",
                                                                          "main")}))
    assert (str(mod["main"].attrs[RULE_ATTR]) == "gpu.TensorCoreLinear") == applies


def test_needs_volta_or_later_and_cuda():
    """WMMA needs sm_70 or later: not for Pascal, not for other GPU kinds."""
    func = _linear("plain", 16)
    rule = TensorCoreLinearRule()
    assert rule.apply(func, c.Target({"kind": "cuda", "arch": "sm_61"}), False) is None
    assert rule.apply(func, c.Target({"kind": "vulkan"}), False) is None
    assert rule.apply(func, c.Target({"kind": "cuda", "arch": "sm_87"}), False) is not None


def test_warps_and_column_tiles_fit():
    """K slices (warps): 8 where K and 48 KB allow; fewer for 64 rows of a gated kernel
    (its partials are twice as large), four column tiles, or a K of fewer 16-row steps.
    Four column tiles a block only where 256 blocks remain: SmolLM2's LM head (768), not
    its gate_up (24 blocks of 64 columns a half) or qkv."""
    rule = TensorCoreLinearRule()
    assert rule.slices(16, 1, 576) == 4  # 576 = 9 x 64: not a multiple of 128
    assert rule.slices(16, 1, 1536) == 8
    assert rule.slices(64, 1, 1536) == 4
    assert rule.slices(64, 2, 576) == 2
    assert rule.slices(64, 1, 576, tiles=4) == 2
    assert rule.slices(16, 1, 8) is None
    assert [rule.column_tiles(n) for n in (49152, 1536, 960, 576)] == [4, 1, 1, 1]
    # Told J, the rule takes the layers whose 16-column tiles J divides: SmolLM2's (qkv's
    # 960 columns are 30 blocks of 32 or 15 of 64), not 80 columns' five tiles.
    fixed = [TensorCoreLinearRule(tiles=t) for t in (2, 4)]
    assert [[r.column_tiles(n) for n in (1536, 960, 576, 80)] for r in fixed] == [
        [2, 2, 2, None], [4, 4, 4, None]]
    func = ops.linear(80, 128, "float16", rows=16)
    assert TensorCoreLinearRule(tiles=2).apply(func, CUDA, False) is None
    assert TensorCoreLinearRule().apply(func, CUDA, False) is not None
    # The accumulators (8 registers a thread each) within 128 registers: a gated layer at
    # 64 rows takes two column tiles at most; four where the grid would allow is one.
    assert rule.column_tiles(65536, 64, 2) == 1 and rule.column_tiles(65536, 64, 1) == 4
    assert [r.column_tiles(1536, 64, 2) for r in fixed] == [2, None]
    gated = ops.linear(3072, 576, "float16", rows=64, norm_eps=1e-5, activation="silu")
    assert TensorCoreLinearRule(tiles=4).apply(gated, CUDA, False) is None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])
def test_nvcc_keeps_fragments_in_registers(tmp_path, arch):
    """ptxas on SmolLM2's fused gate_up and LM head at 64 rows (8 and 16 accumulator
    fragments a warp, the most) and its down at 64 rows (24 W fragments loaded ahead, the
    most: an array nvcc keeps in registers only with every loop indexing it unrolled): no
    stack frame, no spills, for Jetson Orin (sm_87) and Hopper (sm_90)."""
    for form, n, k in (("norm_silu", 3072, 576), ("norm", 49152, 576),
                       ("residual", 576, 1536)):
        func = TensorCoreLinearRule().apply(_linear(form, 64, n=n, k=k), CUDA,
                                            False).mod["main"]
        assert_no_stack(func.with_attr("global_symbol", "main"), arch, tmp_path)


@pytest.mark.parametrize("dtype,prefix", [("float16", "gpu."), ("q4_1", "gpu.Quant")])
def test_compile_uses_tensor_cores_unless_told_not_to(tmp_path, monkeypatch, dtype, prefix):
    """`compile --target cuda` (float16, and q4_1 on gpu.QuantTensorCoreLinear) puts the
    64-row prefill chunk's linears on the tensor cores; `--no-tensor-cores`
    (CompileOptions.tensor_cores=False) leaves every linear to split K or the column rule."""
    from hetcomp import cli
    from hetcomp.driver import compile as driver
    from hetcomp.testing import compile_tiny_cuda

    rules = {}
    for tc in (True, False):
        kernels = compile_tiny_cuda(str(tmp_path / f"art{tc}"), dtype,
                                    tensor_cores=tc)["kernels"]
        rules[tc] = {k["name"]: k["rule"] for k in kernels if k["name"].startswith("linear")}
    assert set(rules[True]) == set(rules[False])
    on = {name for name, rule in rules[True].items() if rule == f"{prefix}TensorCoreLinear"}
    assert on and all(name.endswith("_w64") for name in on)
    assert not any("TensorCore" in rule for rule in rules[False].values())
    assert {rules[False][name] for name in on} == {f"{prefix}SplitKLinear"}
    if dtype != "float16":
        return
    # the command line's flag reaches the options
    seen = []
    monkeypatch.setattr(driver, "compile_model", lambda opts, *a, **k: seen.append(opts))
    for flag, want in (([], True), (["--no-tensor-cores"], False)):
        assert cli.main(["compile", "--target", "cuda", "--no-heads", "-o",
                         str(tmp_path / "x"), *flag]) == 0
        assert seen[-1].tensor_cores is want


def test_wmma_intrinsics_are_tvms(tmp_path):
    """schedules/wmma.py's six intrinsics are TVM's: its ``get_wmma_*_intrin`` generators,
    cut out of ``tvm/s_tir/tensor_intrin/cuda.py`` (importing that module registers every
    intrinsic TVM has, 30-95 s) into a module of their own, make structurally equal
    descriptions and implementations."""
    import ast
    import importlib.util
    import os

    import tvm

    from hetcomp.schedules import wmma

    src = os.path.join(os.path.dirname(tvm.__file__), "s_tir", "tensor_intrin", "cuda.py")
    with open(src) as fh:
        tree = ast.parse(fh.read())
    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)) or (
        isinstance(n, ast.FunctionDef) and n.name.startswith("get_wmma_"))]
    assert {f"get_wmma_{g}" for g in ("fragment_index", "load_intrin", "fill_intrin",
                                      "store_intrin", "sync_intrin")} <= {
        n.name for n in keep if isinstance(n, ast.FunctionDef)}
    path = tmp_path / "tvm_wmma.py"  # TVMScript parses functions from a real file
    path.write_text(ast.unparse(ast.Module(body=keep, type_ignores=[])))
    spec = importlib.util.spec_from_file_location("tvm_wmma", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    theirs = {"load_a": ref.get_wmma_load_intrin(16, 16, 16, "float16", "shared", False, False),
              "load_b": ref.get_wmma_load_intrin(16, 16, 16, "float16", "global", True, False),
              "load_b_shared": ref.get_wmma_load_intrin(16, 16, 16, "float16", "shared", True,
                                                        False),
              "fill": ref.get_wmma_fill_intrin(16, 16, 16, "float32"),
              "store": ref.get_wmma_store_intrin(16, 16, 16, "float32", "shared.dyn"),
              "mma": ref.get_wmma_sync_intrin(16, 16, 16, "float16", "float32", False)}
    names = wmma.intrinsics()
    assert set(names) == set(theirs)
    for role, pair in theirs.items():
        ours = c.TensorIntrin.get(names[role])
        for got, want in zip((ours.desc, ours.impl), pair):  # (named apart)
            c.assert_structural_equal(got.with_attr("global_symbol", "f"),
                                      want.with_attr("global_symbol", "f"), map_free_vars=True)
