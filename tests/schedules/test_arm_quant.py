"""The block-quantized linear kernels scheduled by ``arm.QuantLinear``, cross-compiled for
aarch64 and run under qemu: numerics against numpy (gguf's dequantize, then matmul) and the
register use that is the rule's reason to exist."""

import re
import shutil

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.cross import AARCH64_NEON, CrossToolchain, QemuKernel, apply_rules
from hetcomp.codegen.targets import make_target
from hetcomp.hardware import target_dict
from hetcomp.kernels import quant
from hetcomp.schedules.apply import RULE_ATTR, ApplyRules
from hetcomp.schedules.arm import QuantLinearRule as ArmQuantLinearRule
from hetcomp.schedules.cpu import QuantLinearRule
from hetcomp.schedules.llvm import llvm_rules

TOOLCHAIN = CrossToolchain.find()
needs_qemu = pytest.mark.skipif(
    TOOLCHAIN is None, reason="aarch64-linux-gnu-gcc or qemu-aarch64(-static) not installed "
    "(Debian: gcc-aarch64-linux-gnu qemu-user-static)")
FORMATS = ("q4_0", "q4_1", "q8_0")
N, K = 96, 128  # three 32-column panels, four blocks a row
c = _tvm.compiler()


def _case(qtype: str, w: int, seed: int):
    rng = np.random.default_rng(seed)
    m = quant.QuantMatrix.quantize(rng.standard_normal((N, K)).astype("float32"), qtype)
    x = rng.standard_normal((w, K)).astype("float32")
    r = rng.standard_normal((w, N)).astype("float32")
    return m, x, r, x.astype(np.float64) @ m.dequantize().astype(np.float64).T


def _kernel(tmp_path, qtype, rows, residual=False, rule=None):
    func = apply_rules(quant.linear_quant(N, K, qtype, residual, rows=rows),
                       [rule or ArmQuantLinearRule()], AARCH64_NEON)
    assert func is not None, "the NEON rule must apply to aarch64 +neon"
    return QemuKernel(func, "linear_quant", num_outputs=1, workdir=str(tmp_path),
                      toolchain=TOOLCHAIN)


@needs_qemu
@pytest.mark.parametrize("qtype", FORMATS)
@pytest.mark.parametrize("w", [1, 4, 16, 64])
def test_neon_quant_linear_matches_numpy(tmp_path, qtype, w):
    """Static widths: W = 1 the factored kernel (raw-quant block sums), 4 / 16 / 64 the
    dequantizing one with 4- and 8-row tiles; W = 4 also with the residual add."""
    m, x, r, ref = _case(qtype, w, seed=w)
    wp = quant.pack_quant_weight(m)
    (y,) = _kernel(tmp_path, qtype, w)(x, wp)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    if w == 4:
        (y,) = _kernel(tmp_path / "res", qtype, w, residual=True)(x, wp, r)
        np.testing.assert_allclose(y, ref + r, rtol=1e-5, atol=1e-4)


@needs_qemu
def test_neon_quant_linear_symbolic_width(tmp_path):
    """The symbolic-width kernel (prefill's last short chunk): 5 rows, a partial row tile."""
    m, x, _, ref = _case("q4_1", 5, seed=9)
    (y,) = _kernel(tmp_path, "q4_1", None)(x, quant.pack_quant_weight(m))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)


def _stack_reloads(asm: str) -> int:
    """``q`` registers loaded back from the stack: register spills in the vector code."""
    return len(re.findall(r"\b(?:ldr|ldp)\s+q\d+,.*\[sp", asm))


@needs_qemu
@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_neon_tiles_fit_the_register_file(tmp_path, qtype):
    """The reason for the rule: the x86 rule's whole-panel tile (32 columns = 8 NEON
    registers a row) spills on aarch64, the 8-column sub-panels do not (W = 16 measured:
    2128 / 1844 reloads against 36 / 1). Both emit vector FMAs on 4-lane ``v`` registers."""
    arm = _kernel(tmp_path / "arm", qtype, 16)
    generic = _kernel(tmp_path / "generic", qtype, 16, rule=QuantLinearRule())
    assert _stack_reloads(arm.asm) <= 64
    assert _stack_reloads(generic.asm) > 10 * max(_stack_reloads(arm.asm), 16)
    # x's element broadcast (``v.s[i]``) or a vector: 8 rows x 2 registers x 32 weights of
    # a block, unrolled.
    fmla = re.findall(r"\bfmla\s+v\d+\.4s, v\d+\.4s, v\d+\.(?:4s|s\[\d\])", arm.asm)
    assert len(fmla) >= 8 * 2 * 32


def test_rule_choice_by_target():
    """aarch64 +neon builds get arm.QuantLinear, x86 builds x86.QuantLinear, a bare x86
    target (no AVX2) cpu.QuantLinear."""
    func = quant.linear_quant(N, K, "q4_1", rows=4).with_attr("global_symbol", "main")
    for target, rule in ((make_target("aarch64"), "arm.QuantLinear"),
                         (make_target("x86-64-v3"), "x86.QuantLinear"),
                         (c.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}),
                          "cpu.QuantLinear")):
        with target:
            mod = ApplyRules(*llvm_rules())(c.IRModule({"main": func}))
        assert str(mod["main"].attrs[RULE_ATTR]) == rule
    assert ArmQuantLinearRule().apply(func, make_target("x86-64-v3"), False) is None


# ----------------------------------------------------------------------------- the model


def _quantized_tiny(qtype: str, seed: int):
    """TINY's random weights in ``qtype`` blocks (the embedding / LM head q8_0, as compile
    packs it) and the float32 weights those blocks hold."""
    from hetcomp.frontend.weights import random_weights
    from hetcomp.testing import TINY

    w = random_weights(TINY, seed=seed)
    wq, ref = dict(w), dict(w)
    for name, arr in w.items():
        if arr.ndim == 2:
            m = quant.QuantMatrix.quantize(arr, "q8_0" if name == "embed" else qtype)
            wq[name], ref[name] = m, m.dequantize()
    return wq, ref


@needs_qemu
@pytest.mark.parametrize("target,rule", [("aarch64", "arm.QuantLinear"),
                                         ("aarch64-dotprod", "arm.Int8DotLinear")])
def test_tiny_q4_1_model_under_qemu_matches_numpy(tmp_path, target, rule):
    """A tiny q4_1 model scheduled for aarch64 (arm.QuantLinear in every linear; with the
    dot-product extension arm.Int8DotLinear, on int8 activations), every kernel run under
    qemu: prefill (symbolic width), verify_w4 of a tree, verify_w1 (the factored kernel)
    after committing a branch; logits against numpy's forward on the dequantized weights
    (float16 KV cache, as a quantized build's; for the int8 kernel the linears' inputs rounded
    to int8 blocks, and a float32 cache: numpy does not model the float16 one, whose rounding
    moves activations across int8 rounding boundaries)."""
    from hetcomp.codegen.build import schedule_module
    from hetcomp.codegen.cross import QemuModule
    from hetcomp.frontend.config import kv_cache_shapes
    from hetcomp.frontend.llama import build_module
    from hetcomp.frontend.weights import pack_weights, param_specs
    from hetcomp.speculative.tree import csr_from_mask
    from hetcomp.testing import TINY, depths, full_mask, tree_mask
    from hetcomp.testing import numpy_llama as ref

    cfg = TINY
    wq, w = _quantized_tiny("q4_1", seed=4)
    packed = pack_weights(cfg, wq, "q4_1")
    params = [packed[name] for name, _, _ in param_specs(cfg, "q4_1")]
    int8 = rule == "arm.Int8DotLinear"
    kv = "float32" if int8 else "float16"
    mod = schedule_module(build_module(cfg, "q4_1", static_widths=(1, 4), kv_dtype=kv),
                          make_target(target))
    rules = {str(f.attrs[RULE_ATTR]) for _, f in mod.functions_items()
             if isinstance(f, c.tir.PrimFunc) and str(f.attrs.get("hetcomp.op_kind")) == "linear"}
    assert rules == {rule}
    run = QemuModule(mod, workdir=str(tmp_path), toolchain=TOOLCHAIN,
                     target=target_dict(target))
    tol = 1e-4 if int8 else 2e-3
    ks, vs = kv_cache_shapes(cfg)
    kc, vc = np.zeros(ks, kv), np.zeros(vs, kv)
    prompt = [5, 17, 99, 3, 42]
    t = len(prompt)
    _, hidden, ids, kc, vc = run("prefill", np.array(prompt, "int32"), np.arange(t, dtype="int32"),
                                 np.tril(np.ones((t, t), "int32")), kc, vc, 0, *params)
    ref_logits, ref_hidden = ref.forward(cfg, w, prompt, int8_inputs=int8)
    np.testing.assert_allclose(hidden[0], ref_hidden[-1], atol=tol, rtol=tol)
    assert int(ids[0]) == int(ref_logits[-1].argmax())

    parents = [-1, 0, 0, 1]
    mask = tree_mask(parents)
    toks = np.array([10, 11, 12, 13], "int32")
    pos = (depths(parents) + t).astype("int32")
    logits, hidden, ids, kc, vc = run("verify_w4", toks, pos, mask, *csr_from_mask(mask), kc, vc,
                                      t, *params)
    ref_logits, _ = ref.forward(cfg, w, np.concatenate([prompt, toks]),
                                positions=np.concatenate([np.arange(t), pos]),
                                mask=full_mask(t, mask), int8_inputs=int8)
    np.testing.assert_allclose(logits, ref_logits[t:], atol=tol, rtol=tol)
    np.testing.assert_array_equal(ids, ref_logits[t:].argmax(-1))

    kc, vc = run("commit", kc, vc, np.array([0, 1, 3], "int32"), t)  # the branch 0 -> 1 -> 3
    seq = prompt + [10, 11, 13]
    one = np.ones((1, 1), "int32")
    logits, *_ = run("verify_w1", np.array([20], "int32"), np.array([len(seq)], "int32"), one,
                     *csr_from_mask(one), kc, vc, len(seq), *params)
    ref_logits, _ = ref.forward(cfg, w, seq + [20], int8_inputs=int8)
    np.testing.assert_allclose(logits, ref_logits[-1:], atol=tol, rtol=tol)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                    reason="needs the aarch64 cross linker")
@pytest.mark.parametrize("target,rule,features", [
    ("aarch64", "arm.QuantLinear", ["neon"]),
    ("aarch64-dotprod", "arm.Int8DotLinear", ["dotprod", "neon"])])
def test_compile_q4_1_for_aarch64(tmp_path, target, rule, features):
    """`compile --dtype q4_1 --target aarch64`: an aarch64 library whose linear kernels are
    all arm.QuantLinear's (the Medusa heads' float16 linears aside), weights kept as blocks;
    `--target aarch64-dotprod` puts them on int8 dot products (arm.Int8DotLinear), and the
    artifact says its CPU needs ``dotprod`` (the loader refuses it elsewhere)."""
    from hetcomp.artifact_format import read_manifest
    from hetcomp.driver.compile import CompileOptions, compile_model
    from hetcomp.testing import TINY, byte_tokenizer_spec

    wq, _ = _quantized_tiny("q4_1", seed=5)
    compile_model(CompileOptions(model="tiny.gguf", dtype="q4_1", target=target,
                                 max_context=64), str(tmp_path / "art"), quiet=True,
                  weights=(TINY, wq, byte_tokenizer_spec(TINY.vocab_size), __file__))
    m = read_manifest(str(tmp_path / "art"))
    linear = [k for k in m["kernels"] if k["name"].startswith("linear")]
    assert linear and {k["rule"] for k in linear} == {rule}
    assert m["cpu"] == {"arch": "aarch64", "features": features}
    assert {p["name"]: p["dtype"] for p in m["params"]}["layers.1.wo"] == "uint8"
    with open(tmp_path / "art" / "lib.so", "rb") as fh:
        head = fh.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
