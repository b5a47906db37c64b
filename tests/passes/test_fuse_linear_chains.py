"""FuseLinearChains: structure before and after (what fuses, what stays), and the kernel count
of a verify step. The fused model's numerics against numpy are in test_numerics (``fused``),
test_qwen2 and test_gemma3; the fused kernels' GPU schedules in schedules/test_gpu_linear."""

import pytest

from hetcomp import _tvm
from hetcomp.frontend.llama import build_module
from hetcomp.kernels import ops, quant
from hetcomp.passes import FuseLinearChains
from hetcomp.testing import TINY, TINY_GEMMA3, TINY_QWEN2

c = _tvm.compiler()
relax, tt = c.relax, c.TensorType
W, E, F, N = 4, 64, 96, 128  # rows, hidden, intermediate, qkv columns


class _Module:
    """A Relax module built the way llama.py emits its calls (kernels added once)."""

    def __init__(self):
        self.bb = relax.BlockBuilder()
        self.gvs = {}

    def kernel(self, name, func):
        if name not in self.gvs:
            self.gvs[name] = self.bb.add_func(func.with_attr("global_symbol", name), name)
        return self.gvs[name]

    def call(self, name, func, args, shape):
        return self.bb.emit(relax.call_tir(self.kernel(name, func), args,
                                           tt(shape, "float32")))


def _param(name, shape, dtype="float32"):
    return relax.Var(name, tt(shape, dtype))


def _before(rows=W, wdtype="float16"):
    """A layer's two input chains and the final norm: ``norm -> qkv``, ``norm -> gate_up
    -> silu_mul``, and a norm whose output is both the LM head's input and a result."""
    m = _Module()
    x = _param("x", (rows, E))
    g1, g2, g3 = _param("g1", (E,)), _param("g2", (E,)), _param("g3", (E,))
    wqkv = _param("wqkv", ops.packed_shape(N, E), wdtype)
    wgu = _param("wgu", ops.packed_shape(2 * F, E), wdtype)
    whead = _param("whead", ops.packed_shape(320, E), wdtype)
    r = rows if isinstance(rows, int) else None  # static, or the kernels' own symbolic w
    suffix = "" if r is None else f"_w{r}"
    norm = ops.rms_norm(E, 1e-5, rows=r)
    with m.bb.function("f", [x, g1, g2, g3, wqkv, wgu, whead]):
        with m.bb.dataflow():
            h = m.call("rms_norm" + suffix, norm, [x, g1], (rows, E))
            qkv = m.call(f"linear_n{N}_k{E}{suffix}", ops.linear(N, E, wdtype, rows=r),
                         [h, wqkv], (rows, N))
            h2 = m.call("rms_norm" + suffix, norm, [x, g2], (rows, E))
            gu = m.call(f"linear_n{2 * F}_k{E}{suffix}", ops.linear(2 * F, E, wdtype, rows=r),
                        [h2, wgu], (rows, 2 * F))
            a = m.call("silu_mul" + suffix, ops.silu_mul(F, rows=r), [gu], (rows, F))
            hid = m.call("rms_norm" + suffix, norm, [x, g3], (rows, E))
            logits = m.call(f"linear_n320_k{E}{suffix}", ops.linear(320, E, wdtype, rows=r),
                            [hid, whead], (rows, 320))
            out = m.bb.emit_output(relax.Tuple([qkv, a, hid, logits]))
        m.bb.emit_func_output(out)
    return m.bb.finalize()


def test_chains_fuse_and_the_shared_norm_stays():
    after = FuseLinearChains()(_before())

    m = _Module()
    x = _param("x", (W, E))
    g1, g2, g3 = _param("g1", (E,)), _param("g2", (E,)), _param("g3", (E,))
    wqkv = _param("wqkv", ops.packed_shape(N, E), "float16")
    wgu = _param("wgu", ops.packed_shape(2 * F, E), "float16")
    whead = _param("whead", ops.packed_shape(320, E), "float16")
    m.kernel("rms_norm_w4", ops.rms_norm(E, 1e-5, rows=W))
    m.kernel("linear_n320_k64_w4", ops.linear(320, E, "float16", rows=W))
    with m.bb.function("f", [x, g1, g2, g3, wqkv, wgu, whead]):
        with m.bb.dataflow():
            qkv = m.call("linear_norm_n128_k64_w4",
                         ops.linear(N, E, "float16", rows=W, norm_eps=1e-5), [x, g1, wqkv],
                         (W, N))
            a = m.call("linear_norm_silu_n192_k64_w4",
                       ops.linear(2 * F, E, "float16", rows=W, norm_eps=1e-5,
                                  activation="silu"), [x, g2, wgu], (W, F))
            hid = m.call("rms_norm_w4", ops.rms_norm(E, 1e-5, rows=W), [x, g3], (W, E))
            logits = m.call("linear_n320_k64_w4", ops.linear(320, E, "float16", rows=W),
                            [hid, whead], (W, 320))
            out = m.bb.emit_output(relax.Tuple([qkv, a, hid, logits]))
        m.bb.emit_func_output(out)
    expected = m.bb.finalize()
    # The unfused qkv, gate_up and activation kernels, no longer called, leave the module.
    c.tvm.ir.assert_structural_equal(after, expected, map_free_vars=True)


def test_symbolic_widths_stay():
    """Prefill and the generic verify (a symbolic width) keep their kernels: the fused
    forms are for the static widths a CUDA graph captures."""
    before = _before(rows=c.tir.Var("w", "int64"))
    c.tvm.ir.assert_structural_equal(FuseLinearChains()(before), before)


def test_what_is_not_a_chain_stays():
    """A residual linear and Gemma's residual norm (its output joins the residual stream) are
    left as they are."""
    m = _Module()
    x, r = _param("x", (W, E)), _param("r", (W, E))
    g = _param("g", (E,))
    wo = _param("wo", ops.packed_shape(E, E), "float16")
    with m.bb.function("f", [x, r, g, wo]):
        with m.bb.dataflow():
            hr = m.call("rms_norm_res_w4", ops.rms_norm(E, 1e-5, rows=W, residual=True),
                        [x, g, r], (W, E))
            o = m.call("linear_res_n64_k64_w4", ops.linear(E, E, "float16", True, rows=W),
                       [hr, wo, r], (W, E))
            out = m.bb.emit_output(o)
        m.bb.emit_func_output(out)
    before = m.bb.finalize()
    c.tvm.ir.assert_structural_equal(FuseLinearChains()(before), before)


def _quant_chain(fused: bool):
    """rms_norm -> q8_0 linear -> silu_mul, or the one fused quantized kernel."""
    m = _Module()
    x, g = _param("x", (W, E)), _param("g", (E,))
    wq = _param("wq", quant.quant_packed_shape(N, E, "q8_0"), "uint8")
    with m.bb.function("f", [x, g, wq]):
        with m.bb.dataflow():
            if fused:
                a = m.call("linear_norm_silu_q8_0_n128_k64_w4", quant.linear_quant(
                    N, E, "q8_0", rows=W, norm_eps=1e-5, activation="silu"), [x, g, wq],
                    (W, N // 2))
            else:
                h = m.call("rms_norm_w4", ops.rms_norm(E, 1e-5, rows=W), [x, g], (W, E))
                y = m.call("linear_q8_0_n128_k64_w4",
                           quant.linear_quant(N, E, "q8_0", False, rows=W), [h, wq], (W, N))
                a = m.call("silu_mul_w4", ops.silu_mul(N // 2, rows=W), [y], (W, N // 2))
            out = m.bb.emit_output(a)
        m.bb.emit_func_output(out)
    return m.bb.finalize()


def test_a_quantized_chain_fuses_into_the_quantized_kernel():
    """A block-quantized linear takes its norm and activation as a float one does, into
    ``linear_quant``'s fused form."""
    c.tvm.ir.assert_structural_equal(FuseLinearChains()(_quant_chain(False)),
                                     _quant_chain(True))


def _kernel_calls(mod, fn):
    return [b.value.args[0].name_hint for blk in mod[fn].body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and b.value.op.same_as(c.call_tir_op)]


@pytest.mark.parametrize("cfg,act", [(TINY, "silu"), (TINY_GEMMA3, "gelu_tanh"),
                                     (TINY_QWEN2, "silu")], ids=["llama", "gemma3", "qwen2"])
def test_a_layer_runs_three_kernels_fewer(cfg, act):
    """The CUDA-graph build's verify_w4: per layer the two norms and the activation (and
    Qwen2's q/k/v bias) go into the qkv and gate_up kernels (9 kernels a layer become 6;
    Gemma's post-norms and q/k norms stay), and nothing else changes."""
    mod = build_module(cfg, "float16", static_widths=(4,), device_len=True)
    before, after = _kernel_calls(mod, "verify_w4"), _kernel_calls(
        FuseLinearChains()(mod), "verify_w4")
    assert len(before) - len(after) == (4 if cfg.qkv_bias else 3) * cfg.num_layers
    fused = [n for n in after if n.startswith("linear_norm")]
    qkv = "_bias" if cfg.qkv_bias else ""
    assert fused == [f"linear_norm{qkv}_n{cfg.qkv_size}_k{cfg.hidden_size}_w4",
                     f"linear_norm_{act}_n{2 * cfg.intermediate_size}_k{cfg.hidden_size}_w4"
                     ] * cfg.num_layers
    dropped = {"rms_norm_w4": 2 * cfg.num_layers,
               ("silu_mul_w4" if act == "silu" else "gelu_mul_w4"): cfg.num_layers,
               "bias_add_w4": cfg.num_layers if cfg.qkv_bias else 0}
    for name, count in dropped.items():
        assert before.count(name) - after.count(name) == count, name
    assert after.count("rms_norm_w4") == 1  # the final norm: the Medusa heads read it too
