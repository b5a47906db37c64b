"""CPU schedule rules: dispatch by op kind, exact row tiles for static widths, numerics."""

import numpy as np
import pytest

from hetcomp import _tvm
from hetcomp.codegen.targets import make_target
from hetcomp.frontend import ops
from hetcomp.schedules.cpu import AttentionRule, ElementwiseRule, LinearRule, RowwiseRule

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


@pytest.mark.parametrize("rows,residual,dtype", [(1, False, "float32"), (3, True, "float32"),
                                                 (16, False, "float16"), (None, True, "float32")])
def test_linear_numerics(rows, residual, dtype):
    n, k, w = 96, 80, rows or 5
    sch = LinearRule().apply(ops.linear(n, k, dtype, residual, rows=rows), TARGET, False)
    lib = c.compile(c.IRModule({"main": sch.mod["main"]}), target=TARGET)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((w, k)).astype("float32")
    wt = rng.standard_normal((n, k)).astype(dtype)
    r = rng.standard_normal((w, n)).astype("float32")
    y = _tvm.tensor(np.zeros((w, n), "float32"))
    args = [_tvm.tensor(x), _tvm.tensor(ops.pack_linear_weight(wt.astype("float32"), dtype))]
    lib["main"](*args, *([_tvm.tensor(r)] if residual else []), y)
    ref = x.astype(np.float64) @ wt.astype(np.float64).T + (r if residual else 0)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4)
