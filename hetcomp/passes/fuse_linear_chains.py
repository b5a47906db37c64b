"""FuseLinearChains: take the RMSNorm before a linear and the gated activation after it into
the linear's kernel.

A LLaMA layer calls nine kernels, four of them around its two input linears: ``rms_norm``
then the qkv linear, ``rms_norm`` then gate_up then ``silu_mul``. On a GPU each is a launch
(a node of the step's CUDA graph) that reads and writes a few KB, so a step is bound by their
number, not by bytes. This pass rewrites

    h = rms_norm(x, gamma);  y = linear(h, W)          ->  y = linear[norm](x, gamma, W)
    g = linear(h, W);        a = silu_mul(g)           ->  a = linear[act](h, W)
    y = linear(h, W);        z = bias_add(y, b)        ->  z = linear[bias](h, W, b)

(norm and activation at once for the MLP, ``a = linear[norm, act](x, gamma, W)``; norm and
bias for Qwen2's qkv, ``z = linear[norm, bias](x, gamma, W, b)``): the fused forms of
:func:`hetcomp.kernels.ops.linear`, which the GPU linear rules schedule. A SmolLM2 verify
step goes from 246 kernels to 156 (the CUDA-graph build's).

What is fused: a linear (float or block-quantized: :func:`hetcomp.kernels.quant.linear_quant`
has the same fused forms) without a residual, at a static width
(``verify_w{W}``, ``prefill_w{C}``: the functions a CUDA graph captures), whose input is an
``rms_norm`` without a residual (Gemma's post-norm adds one) or whose output feeds an
activation kernel (``silu_mul``, ``gelu_mul``) or a ``bias_add``, when that intermediate has
no other use (the final norm's output is also the Medusa heads' input, so it stays).
Everything else is left as it is. Run before LegalizeOps and the schedule rules, on a module that is not partitioned
(PartitionHetero splits linears by columns; a split gate_up would separate gate from up).
"""

from __future__ import annotations

from .._tvm import compiler
from ..kernels.ops import OP_KIND, is_fused_linear, linear
from ..kernels.quant import linear_quant

_c = compiler()


def _attr(func, key, default=None):
    attrs = func.attrs
    return attrs[key] if attrs is not None and key in attrs else default


def _callee(mod, value):
    """``(GlobalVar, PrimFunc, op kind)`` of a ``call_tir`` binding, else None."""
    if not (isinstance(value, _c.relax.Call) and value.op.same_as(_c.call_tir_op)):
        return None
    gv = value.args[0]
    func = mod[gv]
    kind = _attr(func, OP_KIND)
    return (gv, func, str(kind)) if kind is not None else None


def _fusible_linear(func) -> bool:
    """A linear without a residual, its rows static: what the fused forms cover."""
    return (str(_attr(func, OP_KIND, "")) == "linear"
            and not int(_attr(func, "hetcomp.residual", 0))
            and not is_fused_linear(func)
            and isinstance(func.params[0].shape[0], _c.tir.IntImm))


def _use_counts(func) -> dict:
    """How many bindings (and the function's result) read each variable."""
    counts: dict = {}

    def count(expr):
        for v in _c.relax.analysis.free_vars(expr):
            counts[v] = counts.get(v, 0) + 1

    for block in func.body.blocks:
        for b in block.bindings:
            count(b.value)
    count(func.body.body)
    return counts


class _Chains:
    """The fusions of one function: which bindings go, and what replaces each chain's last."""

    def __init__(self, mod, bb, func):
        self.mod, self.bb = mod, bb
        self.uses = _use_counts(func)
        self.defs = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        self.dropped: set = set()
        self.kernels: dict[str, object] = {}
        # The linears whose output an activation or a bias takes in: fused there (with
        # their norm).
        self.into_tail = {b.value.args[1].fields[0] for b in
                          (b for block in func.body.blocks for b in block.bindings)
                          if self._tail_input(b.value) is not None}

    def _tail_input(self, value):
        """The linear call (GlobalVar, PrimFunc, kind) the kernel after a linear (an
        activation, a bias add: ``value``) can take in, else None."""
        found = _callee(self.mod, value)
        if found is None or found[2] != "elementwise" or not (
                "hetcomp.activation" in found[1].attrs or "hetcomp.bias" in found[1].attrs):
            return None
        lin = self._single_use_call(value.args[1].fields[0], "linear")
        if lin is None or not _fusible_linear(lin[1]):
            return None
        gated = "hetcomp.activation" in found[1].attrs
        return None if gated and int(lin[1].attrs["hetcomp.n"]) % 2 else lin

    def _single_use_call(self, var, kind: str):
        """The call defining ``var`` when it is a ``kind`` kernel's and ``var`` has one use."""
        if not isinstance(var, _c.relax.Var) or self.uses.get(var, 0) != 1:
            return None
        found = _callee(self.mod, self.defs.get(var))
        return found if found is not None and found[2] == kind else None

    def _kernel(self, gv, func, norm_eps, activation, bias):
        tags = "".join(t for t, on in (("_norm", norm_eps is not None),
                                       (f"_{activation}", activation is not None),
                                       ("_bias", bias)) if on)
        name = gv.name_hint.replace("linear", "linear" + tags, 1)
        if name not in self.kernels:
            n, k = int(func.attrs["hetcomp.n"]), int(func.attrs["hetcomp.k"])
            rows = int(func.params[0].shape[0])
            kw = {"rows": rows, "norm_eps": norm_eps, "activation": activation, "bias": bias}
            qtype = _attr(func, "hetcomp.qtype")
            fused = (linear_quant(n, k, str(qtype), **kw) if qtype is not None
                     else linear(n, k, str(func.params[1].dtype), **kw))
            fused = fused.with_attr("global_symbol", name)
            self.kernels[name] = self.bb.add_func(fused, name)
        return self.kernels[name]

    def rewrite(self, binding):
        """The binding that replaces ``binding`` (the last of a chain), or None."""
        relax = _c.relax
        found = _callee(self.mod, binding.value)
        if found is None:
            return None
        _, func, kind = found
        act, bias, lin = None, [], self._tail_input(binding.value)
        if lin is not None:  # an activation (its one argument) or a bias add (x, b)
            y, *bias = binding.value.args[1].fields
            act = str(func.attrs["hetcomp.activation"]) if not bias else None
            lin_call = self.defs[y]
            self.dropped.add(y)
        elif kind == "linear" and _fusible_linear(func) and binding.var not in self.into_tail:
            lin, lin_call = found, binding.value
        else:
            return None
        x, weight = lin_call.args[1].fields
        norm = self._single_use_call(x, "rms_norm")
        if norm is not None and "hetcomp.residual" not in norm[1].attrs:
            eps = float(norm[1].attrs["hetcomp.norm_eps"])
            args = [*self.defs[x].args[1].fields, weight, *bias]  # x, gamma, W (, b)
            self.dropped.add(x)
        elif act is not None or bias:
            eps, args = None, [x, weight, *bias]
        else:
            return None
        gv = self._kernel(lin[0], lin[1], eps, act, bool(bias))
        return relax.VarBinding(binding.var, relax.call_tir(gv, args, binding.var.ty))


@_c.module_pass(opt_level=0, name="FuseLinearChains")
class FuseLinearChains:
    """Fuse each RMSNorm -> linear -> activation chain into one fused linear kernel (module
    doc). Kernels no call uses any more leave the module. The input module is not
    modified."""

    def transform_module(self, mod, _ctx):
        relax = _c.relax
        bb = relax.BlockBuilder(mod)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            chains = _Chains(mod, bb, func)
            blocks, changed = [], False
            for block in func.body.blocks:
                bindings = [chains.rewrite(b) or b for b in block.bindings]
                changed |= any(a is not b for a, b in zip(bindings, block.bindings, strict=True))
                bindings = [b for b in bindings if b.var not in chains.dropped]
                kind = relax.DataflowBlock if isinstance(block, relax.DataflowBlock) else (
                    relax.BindingBlock)
                blocks.append(kind(bindings))
            if changed:
                body = bb.normalize(relax.SeqExpr(blocks, func.body.body))
                bb.update_func(gv, relax.Function(func.params, body, None, func.is_pure,
                                                  func.attrs))
        out = bb.get()
        for gv in _called(mod) - _called(out):
            del out[gv]
        return relax.transform.Normalize()(out)


def _called(mod) -> set:
    """The kernels the module's Relax functions call."""
    relax, found = _c.relax, set()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, _c.Op) and e.args and isinstance(
                e.args[0], _c.tvm.ir.GlobalVar):
            found.add(e.args[0])

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return found
