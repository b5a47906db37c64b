"""PartitionHetero: split linear layers by output columns and attention by affinity across units.

A linear layer ``y = x @ W`` becomes ``concat([x @ W[:, :c], x @ W[:, c:]])`` with each slice on
its own unit; there is no all-reduce. The weight is split at compile time: the function gets
one parameter per slice in place of the original, recorded in the function attribute
``hetcomp.param_split`` (``{new name: [old name, first block, end block]}`` over axis 0 of
the packed layout, ``[N / B, K, B]``, or ``[N / B, K / 32, bytes, B]`` for GGUF blocks) so
the artifact stores the slices. A block-quantized layer's slices run the same dequantizing
kernel (:mod:`hetcomp.kernels.quant`) on their columns. Tree attention, which verify already
runs as a dense part (queries against the committed KV cache) and a sparse part (each tree row
against its ancestors), merged exactly by log-sum-exp, is placed by affinity: each part on its
plan unit, the merge on the host. Imported models (``from_torch``) have ``R.matmul`` with constant weights;
those are split the same way, their constants sliced.

Placement uses Relax virtual devices: module global info ``vdevice`` lists the plan's units and
every split piece's result type names its unit. A value crossing units is copied with
``R.to_vdevice``, except where the plan says the units share memory. Run before
``RealizeVDevice`` and ``LegalizeOps``.
"""

from __future__ import annotations

import json

from .._tvm import compiler
from ..kernels import ops, quant, script_ops
from ..kernels.sparse_attention import SPARSE_KIND
from ..plan import HeteroPlan

_c = compiler()
_LINEAR_KINDS = {"wqkv": "qkv", "wo": "o", "w_gate_up": "gate_up", "w_down": "down",
                 "lm_head": "lm_head", "embed": "lm_head"}
PARAM_SPLIT_ATTR = "hetcomp.param_split"
_CACHE_PARAMS = ("k_cache", "v_cache")


def plan_vdevices(plan: HeteroPlan):
    """One VDevice per unit of ``plan``; units of one device kind get distinct device ids in
    plan order (two CPU units are ``cpu:0`` and ``cpu:1``, as the artifact's units are)."""
    seen: dict[str, int] = {}
    out = []
    for tgt in plan.targets:
        kind = tgt["kind"]
        out.append(_c.VDevice(dict(tgt), seen.get(kind, 0), "global"))
        seen[kind] = seen.get(kind, 0) + 1
    return out


def _same_target(a: dict, b: dict) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def linear_kind(param_name: str | None) -> str | None:
    """The linear kind of a weight parameter from its name (``layers_3_wqkv`` -> ``qkv``)."""
    if param_name is None:
        return None
    for suffix, kind in _LINEAR_KINDS.items():
        if param_name == suffix or param_name.endswith("_" + suffix):
            return kind
    return None


@_c.mutator
class _Rewriter(_c.PyExprMutator):
    def __init__(self, mod, plan: HeteroPlan, vdevs):
        super().__init__(mod)
        self.mod_in = mod
        self.plan = plan
        self.vdev = vdevs
        self.kernels: dict[str, object] = {}
        self.splits: dict = {}  # old weight param -> {unit: (new param, first block, end)}
        # The KV cache lives on the unit that runs the dense attention part (it reads the
        # whole cache); only tree-sized values cross to the other unit.
        self.kv_unit = plan.dense_attention
        self.cache_vars: dict = {}  # cache parameter -> the same parameter placed on kv_unit

    # Helpers ------------------------------------------------------------------------------
    def _kernel(self, name, builder, *args, unit: int = 0):
        """The kernel ``name`` for ``unit``: the host's (unit 0's) kernels carry no target (they
        compile for the module's), another unit's carry its own and get their own copy."""
        own = self._own_target(unit)
        if own:
            kind = self.plan.targets[unit]["kind"]
            name = f"{name}__{kind if kind != self.plan.targets[0]['kind'] else f'u{unit}'}"
        if name not in self.kernels:
            existing = [gv for gv in self.builder_.get().get_global_vars() if gv.name_hint == name]
            if existing:
                self.kernels[name] = existing[0]
            else:
                func = builder(*args).with_attr("global_symbol", name)
                if own:
                    func = func.with_attr("target", _c.Target(dict(self.plan.targets[unit])))
                self.kernels[name] = self.builder_.add_func(func, name)
        return self.kernels[name]

    def _existing(self, gv, unit: int):
        """An existing kernel, copied for ``unit`` when that unit has another target kind.

        The copy gets fresh variables and buffers (``renew_defs``): two functions sharing
        definitions are broken by later passes (LegalizeOps, seen on symbolic-width kernels).
        """
        func = self.mod_in[gv]
        if not self._own_target(unit):
            return self._kernel(gv.name_hint, lambda: func, unit=unit)
        # Script kernels are rebuilt (renew_defs loses their implicit shape variables).
        return self._kernel(gv.name_hint, lambda: script_ops.for_gpu(func, gpu=False)
                            or _c.renew_defs(func), unit=unit)

    def _own_target(self, unit: int) -> bool:
        """Whether ``unit``'s kernels compile for another target than the host's."""
        return not _same_target(self.plan.targets[unit], self.plan.targets[0])

    def _ty(self, shape, unit, dtype="float32"):
        return _c.TensorType(shape, dtype, self.vdev[unit])

    def _emit(self, expr, name=""):
        return self.builder_.emit(expr, name)

    def _to(self, value, unit):
        """``value`` made visible to ``unit``: a copy, also where the units share one DRAM
        (a Jetson's): TVM gives each device its own buffers, and a kernel checks that its
        arguments live on its device (``plan.shared_memory`` makes the planner count such a
        copy as cheap, not absent)."""
        ty = value.ty
        if not isinstance(ty, _c.TensorType):
            return value
        if getattr(ty, "vdevice", None) is not None and _c.same_vdevice(ty.vdevice, self.vdev[unit]):
            return value
        if unit == 0 and getattr(ty, "vdevice", None) is None:
            return value
        return self._emit(_c.relax.op.to_vdevice(value, self.vdev[unit]))

    def _callee(self, call):
        gv = call.args[0]
        func = self.mod_in[gv]
        kind = func.attrs.get(ops.OP_KIND) if func.attrs is not None else None
        return func, (str(kind) if kind is not None else None)

    def place_cache(self, params):
        """Place the KV-cache parameters among ``params`` on ``kv_unit`` (their uses are
        remapped); returns the parameter list to build the function with."""
        self.cache_vars = {}
        if self.kv_unit == 0:
            return list(params)
        out = []
        for p in params:
            if p.name in _CACHE_PARAMS:
                t = p.ty
                self.cache_vars[p] = _c.relax.Var(p.name, self._ty(t.shape, self.kv_unit, t.dtype))
                self.set_var_remap(p, self.cache_vars[p])
            out.append(self.cache_vars.get(p, p))
        return out

    # Rewrites -----------------------------------------------------------------------------
    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if call.op.same_as(_c.Op.get("relax.call_tir_inplace")):
            return self._place_cache_update(call)
        if call.op.same_as(_c.call_tir_op):
            func, kind = self._callee(call)
            if kind == "linear":
                return self._split_linear(call, func)
            if kind in ("attention", SPARSE_KIND):
                return self._split_attention(call, func, kind)
            return call
        if call.op.same_as(_c.Op.get("relax.matmul")):
            return self._split_matmul(call)
        return call

    def _place_cache_update(self, call):
        """An in-place cache update (RoPE + K/V write, commit) runs where the cache lives: its
        tree-sized inputs cross, the cache does not."""
        _, kind = self._callee(call)
        unit = self.kv_unit
        if unit == 0 or kind not in ("rope", "kv_commit"):
            return call
        args = [self._to(a, unit) for a in call.args[1].fields]
        out = call.ty_args[0]
        fields = out.fields if isinstance(out, _c.relax.TupleType) else [out]
        tys = [self._ty(t.shape, unit, t.dtype) for t in fields]
        return _c.relax.call_tir_inplace(
            self._existing(call.args[0], unit), args,
            [int(i) for i in call.attrs.inplace_indices],
            tys if isinstance(out, _c.relax.TupleType) else tys[0])

    def _split_linear(self, call, func):
        relax = _c.relax
        n, k = int(func.attrs["hetcomp.n"]), int(func.attrs["hetcomp.k"])
        block = int(func.attrs["hetcomp.block"])
        residual = bool(int(func.attrs["hetcomp.residual"]))
        args = list(call.args[1].fields)
        x, weight = args[0], args[1]
        if not isinstance(weight, relax.Var):
            return call
        cols = int(round(n * self.plan.ratio(linear_kind(weight.name)) / block)) * block
        w = x.ty.shape[0]
        if cols == 0:
            return call
        pieces = self.splits.setdefault(weight, {})

        def piece(unit, lo, hi):  # the weight slice parameter, created once per function
            if unit not in pieces:  # whole column panels: axis 0 of either layout
                pieces[unit] = (relax.Var(f"{weight.name}__u{unit}", self._ty(
                    ((hi - lo) // block, *list(weight.ty.shape)[1:]), unit, weight.ty.dtype)),
                    lo // block, hi // block)
            return pieces[unit][0]

        qtype = str(func.attrs["hetcomp.qtype"]) if "hetcomp.qtype" in func.attrs else None

        def part_kernel(n_part, unit):
            if qtype is not None:
                return self._kernel(f"linear_{qtype}_n{n_part}_k{k}", quant.linear_quant,
                                    n_part, k, qtype, False, unit=unit)
            return self._kernel(f"linear_n{n_part}_k{k}", ops.linear, n_part, k,
                                weight.ty.dtype, False, unit=unit)

        if cols == n:  # everything on unit 1, its weight living there
            ins = [self._to(args[0], 1), piece(1, 0, n)] + [self._to(a, 1) for a in args[2:]]
            y = self._emit(relax.call_tir(self._existing(call.args[0], 1), ins,
                                          self._ty((w, n), 1)))
            return relax.op.to_vdevice(y, self.vdev[0])
        parts = []
        for unit, (lo, hi) in enumerate(((0, n - cols), (n - cols, n))):
            gv = part_kernel(hi - lo, unit)
            y = self._emit(relax.call_tir(gv, [self._to(x, unit), piece(unit, lo, hi)],
                                          self._ty((w, hi - lo), unit)))
            parts.append(self._to(y, 0))
        # The last expression is returned unbound: the mutator binds it to the original var.
        if not residual:
            return relax.op.concat(parts, axis=1)
        y = self._emit(relax.op.concat(parts, axis=1))
        return relax.call_tir(self._kernel(f"add_n{n}", ops.add, n), [y, args[2]],
                              self._ty((w, n), 0))

    def _split_attention(self, call, func, kind):
        """Place one attention kernel of a verify step by affinity: the dense part (tree
        queries against the cache) on ``plan.dense_attention``'s unit, the sparse part (each
        row against its CSR ancestors, the tensorized kernel the unit's rule schedules) on
        ``plan.sparse_attention``'s; their merge stays on the host. The fused masked kernel
        (prefill, the narrowest verify widths) goes with the cache, on the dense unit. The
        cache never moves: the dense unit holds it, and the sparse part reads only the tree's
        q, k_tree, v_tree (from ``rope_kv``) and CSR, so only those and the
        ``[w, H, D + 1]`` partials cross."""
        relax = _c.relax
        args = list(call.args[1].fields)
        hq, w, d = args[0].ty.shape  # q[H, w, D]
        sparse = kind == SPARSE_KIND
        unit = self.plan.sparse_attention if sparse else self.plan.dense_attention
        moved = [self._to(a, unit) for a in args]  # tree-sized inputs only (docstring)
        if unit == 0 and all(m.same_as(a) for m, a in zip(moved, args, strict=True)):
            return call
        # A part is [w, H, D + 1] (output and log-sum-exp); the fused kernel's output [w, H, D].
        part = sparse or "hetcomp.part" in func.attrs
        y = self._emit(relax.call_tir(self._existing(call.args[0], unit), moved,
                                      self._ty((w, hq, d + 1 if part else d), unit)))
        return self._to(y, 0)

    def _split_matmul(self, call):
        relax = _c.relax
        x, wc = call.args
        if not isinstance(wc, _c.Constant) or len(wc.ty.shape) != 2:
            return call
        arr = wc.value.numpy()
        n = arr.shape[1]
        cols = int(round(n * self.plan.ratio("default")))
        if cols == 0:
            return call
        parts = []
        for unit, (lo, hi) in enumerate(((0, n - cols), (n - cols, n))):
            if hi > lo:
                # The VM keeps constants on the host, so unit 1's slice is moved there (a
                # per-call copy; our own models pass weights as parameters placed per unit).
                const = relax.const(arr[:, lo:hi])
                y = self._emit(relax.op.matmul(self._to(x, unit), self._to(const, unit)))
                parts.append(self._to(y, 0))
        return parts[0] if len(parts) == 1 else relax.op.concat(parts, axis=-1)


@_c.module_pass(opt_level=0, name="PartitionHetero")
class PartitionHetero:
    """Apply a :class:`HeteroPlan` to every Relax function of a module.

    Run on the unscheduled module, before ``RealizeVDevice``, ``LegalizeOps`` and the schedule
    rules. The input module is not modified.
    """

    def __init__(self, plan: HeteroPlan, functions: tuple[str, ...] | None = None):
        if not isinstance(plan, HeteroPlan):
            raise TypeError("PartitionHetero takes a HeteroPlan")
        self.plan = plan
        # None: the module's ``hetcomp.model_functions`` attribute, else every function.
        self.functions = None if functions is None else set(functions)

    def transform_module(self, mod, ctx):
        relax = _c.relax
        vdevs = plan_vdevices(self.plan)
        mod = _c.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
        mod.update_global_info("vdevice", vdevs)
        rw = _Rewriter(mod, self.plan, vdevs)
        functions = self.functions
        if functions is None and mod.attrs is not None and "hetcomp.model_functions" in mod.attrs:
            functions = {str(f) for f in mod.attrs["hetcomp.model_functions"]}
        for gv, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function):
                continue
            holds_cache = any(p.name in _CACHE_PARAMS for p in func.params)
            if functions is not None and gv.name_hint not in functions and not (
                    holds_cache and rw.kv_unit != 0):  # commit follows the cache
                continue
            rw.splits = {}
            placed = rw.place_cache(func.params)
            new_func = rw.visit_expr(func)
            if not rw.splits and not rw.cache_vars:
                rw.builder_.update_func(gv, new_func)
                continue
            params, table = [], {}
            still_used = set(relax.analysis.free_vars(new_func.body))
            for p in placed:
                if p in rw.splits:
                    if p in still_used:  # e.g. the tied embedding: gathered and split
                        params.append(p)
                    for _, (pv, lo, hi) in sorted(rw.splits[p].items()):
                        params.append(pv)
                        table[pv.name] = [p.name, lo, hi]
                else:
                    params.append(p)
            attrs = dict(new_func.attrs) if new_func.attrs is not None else {}
            if table:
                attrs[PARAM_SPLIT_ATTR] = json.dumps(table)
            out = relax.Function(params, new_func.body, None, new_func.is_pure,
                                 _c.tvm.ir.DictAttrs(attrs))
            rw.builder_.update_func(gv, out)
        result = rw.builder_.get()
        result.update_global_info("vdevice", vdevs)
        return result

