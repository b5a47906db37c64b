"""Which kernels a compiled verify step runs, and which rule scheduled each (issue 16): the
sparse tree-attention kernel is part of every wide verify, tensorized by the target's ISA rule.
"""

import re
import subprocess

import pytest

from hetcomp.codegen.build import kernel_table, schedule_module
from hetcomp.codegen.cross import CrossToolchain
from hetcomp.codegen.targets import make_target
from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend.llama import build_module
from hetcomp.frontend.weights import random_weights
from hetcomp.testing import TINY, byte_tokenizer_spec

ATTENTION = ("attention_dense_w16", "sparse_tree_attention", "attention_merge_w16")


def verify_kernels(target: str, width: int = 16):
    mod = schedule_module(build_module(TINY, static_widths=(1, width)), make_target(target))
    rows = kernel_table(mod, [{"name": "cpu", "device": "cpu"}])
    return ({(k["name"], k["rule"]) for k in rows if k["function"] == f"verify_w{width}"},
            {(k["name"], k["rule"]) for k in rows if k["function"] == "verify_w1"})


@pytest.mark.parametrize("target,rule", [("host", "x86.SparseTreeAttention"),
                                         ("x86-64-v3", "x86.SparseTreeAttention"),
                                         ("aarch64", "arm.SparseTreeAttention")])
def test_verify_w16_runs_the_tensorized_sparse_kernel(target, rule):
    wide, narrow = verify_kernels(target)
    names = {k for k, _ in wide}
    assert set(ATTENTION) <= names and "attention_w16" not in names
    assert ("sparse_tree_attention", rule) in wide
    assert ("attention_dense_w16", "cpu.Attention") in wide
    assert ("attention_merge_w16", "cpu.Merge") in wide
    # Every kernel is scheduled by a rule (rope_kv: a script kernel written scheduled).
    assert {k for k, r in wide if r is None} == set()
    assert ("rope_kv", "script.rope") in wide
    # W = 1 keeps the fused kernel (measured faster: FUSED_WIDTHS).
    assert ("attention_w1", "cpu.Attention") in narrow


@pytest.mark.skipif(CrossToolchain.find() is None, reason="no aarch64 cross toolchain")
def test_aarch64_library_has_neon_fmas(tmp_path):
    cfg, w = TINY, random_weights(TINY, seed=2)
    out = tmp_path / "arm"
    compile_model(CompileOptions(model="tiny.gguf", target="aarch64", verify_widths=(16,),
                                 max_context=cfg.max_context), str(out), quiet=True,
                  weights=(cfg, w, byte_tokenizer_spec(cfg.vocab_size), __file__))
    asm = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(out / "lib.so")],
                         capture_output=True, text=True, check=True).stdout
    # The sparse kernel's functions (its entry and the parallel body it launches).
    bodies = [f for f in asm.split("\n\n") if re.match(r"[0-9a-f]+ <[^>]*sparse_tree_attention", f)]
    assert bodies, "the library has the sparse tree-attention kernel"
    assert any(re.search(r"\bfmla\s+v\d+\.4s", f) for f in bodies)
