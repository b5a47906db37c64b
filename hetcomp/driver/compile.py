"""``hetcomp compile``: model file -> Relax -> scheduled kernels -> artifact folder."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import platform
import sys
import time

import numpy as np

from .._tvm import compiler
from ..artifact_format import (
    DATASTORE_FILE,
    PREFILL_CHUNK,
    check_output,
    is_artifact,
    sha256_file,
)
from ..codegen.build import (
    build,
    kernel_table,
    launch_counts,
    uses_cuda_graph,
    workspace_bytes,
)
from ..codegen.export import cpu_requirements, export_artifact
from ..codegen.targets import cross_linker, export_compiler
from ..cost.roofline import (
    ModelShape,
    RooflineCost,
    dtype_bytes,
    kernel_features,
    tensor_core_products,
)
from ..cost.xgb import UnitCostModel
from ..errors import HetcompError
from ..frontend import load_model
from ..frontend.config import MIN_CONTEXT
from ..frontend.export_info import source_info
from ..frontend.lazy import parameter_count
from ..frontend.llama import NUM_INPUTS, build_module, medusa_param_specs
from ..frontend.models import default_datastore
from ..frontend.tokenizer import TokenizerInfo
from ..frontend.weights import (
    WEIGHT_DTYPES,
    check_quantizable,
    pack_weights,
    param_from_recipe,
    param_specs,
)
from ..hardware import (
    COMPILE_TARGETS,
    CUDA_ARCH_SPECS,
    DEFAULT_CUDA_ARCH,
    ORIN_NX_CPU,
    SPECS,
    DeviceSpec,
    base_cuda_arch,
    check_cuda_arch,
    cpu_threads,
    host_part,
    target_dict,
    triple_arch,
)
from ..passes.partition_hetero import PARAM_SPLIT_ATTR
from ..passes.pipeline import fuses_linears
from ..planner import (PlannerOptions, UnitModel, best_width, may_beat_best, plan,
                       tau_table)
from ..profile.bandwidth import measure_read_bandwidth
from ..profile.units import detect_unit
from ..quant_format import cache_dtype, is_quant
from ..runtime import load_artifact
from ..runtime.unit_time import decode_step_seconds
from ..schedules.int8_dot import has_int8_dot
from ..schedules.tuning import apply_database, database_dir
from ..speculative.datastore import REPLAY_CACHED, Datastore, pack_sequences
from ..speculative.medusa import MedusaHeads
from ..speculative.tree import build_tree, largest_tree

TARGETS = COMPILE_TARGETS
#: The Medusa draft's head weights are float (a quantized model's draft reads its LM head in
#: the model's q8_0 blocks).
DRAFT_DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What to build: model (name or path), weight dtype, target and KV-cache capacity."""

    model: str = "smollm2"
    # The weights' dtype (WEIGHT_DTYPES). None: the one the plan was tuned for (its model
    # key), else float16 for --target cuda (half the bytes a step reads, and the only dtype
    # whose linears run on tensor cores), else float32.
    dtype: str | None = None
    target: str = "host"
    # The GPU architecture of `--target cuda` and of a plan's GPU unit (Orin: sm_87).
    cuda_arch: str = DEFAULT_CUDA_ARCH
    max_context: int | None = None  # None: the trained context, at most 2048 tokens
    heads: str | None = None  # Medusa heads file (.npz) from `hetcomp calibrate`
    # The lookup draft's datastore (hetcomp.speculative.datastore): "auto", the responses
    # the heads trained on (calibrate.training_responses; none for heads without them); "none"; or a
    # responses file (JSON lines {"prompt", "ids"}, as record_responses.py writes them).
    datastore: str = "auto"
    plan: object | None = None  # a HeteroPlan: partition across units (None: host only)
    widths: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    # Leave params.bin out (`hetcomp attach-weights` rebuilds it from the model file where
    # the artifact runs): the library travels without hundreds of MB of weights.
    separate_weights: bool = False
    # The planner's predictions per width ({"W": {"tau", "step_s", "tokens_per_s"}}), kept in
    # the manifest so that `hetcomp bench` can put measured beside predicted.
    plan_prediction: dict | None = None
    # Root of MetaSchedule tuning databases (`hetcomp tune --kernels`): records of this
    # machine's CPU fingerprint replace the hand-written schedules of the kernels they cover.
    tuning_db: str | None = None
    # The Medusa draft's copy of the LM head (None: the model's own, dtype ``dtype``). The
    # draft reads the whole LM head every step (3.5 ms of a 14 ms float32 step here); a
    # float16 copy halves that, and a draft only proposes tokens, so output is unchanged.
    draft_dtype: str | None = None
    # More width-specialised verify functions, with or without heads (calibration replays
    # recorded responses as 64-token chains: verify_w64 runs them several times faster than
    # the generic verify).
    verify_widths: tuple[int, ...] = ()
    # The width `generate` and `chat` speculate at unless told. None: the plan's width with
    # a plan; else the planner's choice on the target's roofline and the heads' statistics.
    default_width: int | None = None
    # What plan.json decided beyond the partition (hetcomp.plan.plan_choice): its width, tree,
    # source and the fitted cost models beside it (AnnotateCost reads them).
    plan_choice: dict | None = None
    # The KV cache's element type (None: the weights' float dtype). float16 halves the cache's
    # memory and the bytes the dense attention part streams; attention accumulates in float32.
    kv_dtype: str | None = None
    # --target cuda: capture each function's static-shape kernel regions as CUDA graphs (one
    # launch a region; manifest "launches" counts them). False: every kernel its own launch.
    cuda_graph: bool = True
    # The RMSNorm before a linear and the gated activation after it inside the linear's
    # kernel (FuseLinearChains: a SmolLM2 verify step 156 kernels, not 246). None: where
    # launches are what a step costs, a whole-model GPU build. False: each its own kernel.
    # True on a CPU runs the fused kernels unscheduled there (the CPU rules do not take them
    # yet): slow, for tests of the fused model's numerics.
    fuse_linears: bool | None = None
    # --target cuda: float16 and block-quantized linears at static widths of 16-64 rows (the
    # wide verify steps, the prefill chunk) on tensor cores (gpu.TensorCoreLinear,
    # gpu.QuantTensorCoreLinear; sm_70 and later). False: every linear on the CUDA cores
    # (split K), as before.
    tensor_cores: bool = True
    # Quantized weights on a CPU with AVX-512 VNNI and VBMI or NEON dotprod: each linear
    # quantizes its input rows to int8 per 32-weight block and sums blocks on integer dot
    # products (x86/arm.Int8DotLinear, llama.cpp's numerics; 2-3x faster at verify widths).
    # False: every quantized linear dequantizes its weights into float32 FMAs, as on other CPUs
    # (and as on every unit of a partitioned plan: int8_activations).
    int8_dot: bool = True
    # Build the decoder for fixed caches, reading the cache length on the device
    # (build_module's ``device_len``). None: where CUDA graphs are captured. True elsewhere
    # (a CPU artifact) runs the same kernels and runtime contract where tests can run them.
    device_len: bool | None = None

    @property
    def cache_dtype(self) -> str:
        """The KV cache's element type: ``kv_dtype``, else the weights' float dtype (float16
        for a quantized model, as llama.cpp's default cache)."""
        return self.kv_dtype or cache_dtype(self.dtype)

    def __post_init__(self):
        if self.dtype is None:  # frozen: the one place the default is decided
            planned = (self.plan_choice or {}).get("dtype")
            object.__setattr__(self, "dtype", planned or (
                "float16" if self.target == "cuda" else "float32"))
        if self.dtype not in WEIGHT_DTYPES:
            raise HetcompError(f"unsupported dtype {self.dtype!r} (use "
                               f"{' | '.join(WEIGHT_DTYPES)})")
        if self.kv_dtype is not None and self.kv_dtype not in DRAFT_DTYPES:
            raise HetcompError(f"unsupported --kv-dtype {self.kv_dtype!r} "
                               f"(use {' or '.join(DRAFT_DTYPES)})")
        if self.draft_dtype is not None and self.draft_dtype not in DRAFT_DTYPES:
            raise HetcompError(f"unsupported --draft-dtype {self.draft_dtype!r} "
                               f"(use {' or '.join(DRAFT_DTYPES)})")
        planned = (self.plan_choice or {}).get("dtype")
        if planned and planned != self.dtype and (is_quant(planned) or is_quant(self.dtype)):
            # Its cost models timed other kernels (dequantizing or float), its width chose
            # for other bytes per step.
            raise HetcompError(f"the plan was tuned for --dtype {planned}: compile it with "
                               f"--dtype {planned}, or run `hetcomp tune --dtype "
                               f"{self.dtype}`")
        if self.target not in TARGETS:
            raise HetcompError(f"unsupported target {self.target!r} (supported: {', '.join(TARGETS)})")
        if self.default_width is not None and self.default_width != 1 and (
                self.heads is None or self.default_width not in self.widths):
            raise HetcompError(f"--width {self.default_width} needs --heads and one of the "
                               f"compiled widths ({', '.join(map(str, self.widths))})")
        if self.datastore != "auto" and self.heads is None:
            raise HetcompError("--datastore feeds the lookup draft of speculative decoding: "
                               "this build has no heads (--no-heads, or a model without "
                               "packaged heads)")
        if self.fuse_linears and self.plan is not None:
            raise HetcompError("fusing linears is for whole-model builds: it takes no --plan")
        if self.device_len and self.plan is not None:
            raise HetcompError("a build for fixed caches (device_len) is a whole-model build: "
                               "it takes no --plan")
        if self.max_context is not None and self.max_context < MIN_CONTEXT:
            raise HetcompError(f"--max-context must be at least {MIN_CONTEXT}")
        if self.tuning_db is not None and (self.target != "host" or self.plan is not None):
            raise HetcompError("--tuning-db applies to --target host without --plan (records "
                               "are measured on this machine's CPU)")
        if self.tuning_db is not None and not os.path.isdir(self.tuning_db):
            # A root that holds no machine's records is a typo, not "untuned" (another
            # machine's root, without this one's fingerprint, falls back to the rules).
            raise HetcompError(f"tuning database root not found: {self.tuning_db} (`hetcomp "
                               "tune --kernels -o ROOT` makes one)")
        check_cuda_arch(self.cuda_arch)
        if self.plan is not None:
            self._check_plan_targets()

    def _check_plan_targets(self) -> None:
        """A plan's units run on the target's CPU and valid GPU architectures: the library is
        linked for ``target`` (a plan for another CPU failed at the link, after the build)."""
        cpu = host_part(target_dict(self.target, self.cuda_arch))
        for unit, tgt in zip(self.plan.units, self.plan.targets):
            if tgt.get("kind") == "cuda":
                check_cuda_arch(str(tgt.get("arch")))
                if "host" not in tgt:  # a GPU the host unit drives: no CPU code of its own
                    continue
            if _cpu_arch(host_part(tgt)) != _cpu_arch(cpu):
                raise HetcompError(f"the plan's unit {unit} runs on {_cpu_arch(host_part(tgt))}, "
                                   f"but --target {self.target} links for {_cpu_arch(cpu)}")


def _cpu_arch(target: dict) -> str:
    """The CPU architecture an LLVM target builds for (this machine's without a triple)."""
    return triple_arch(str(target.get("mtriple") or platform.machine()))


def _check_plan_model(opts: CompileOptions) -> None:
    """A plan `tune` made for another model is refused: its widths, tree and split ratios
    were chosen for other shapes (each plan is lossless, but not this model's best). The
    plan's key names the model's shapes by digest (:func:`~hetcomp.driver.profiling.
    read_model_shape`, from the file's metadata, before any weight is read)."""
    choice = opts.plan_choice or {}
    if not choice.get("shape_digest"):  # a bare HeteroPlan, or a key without shapes
        return
    from .profiling import read_model_shape

    _, key = read_model_shape(opts.model, choice["dtype"] or opts.dtype)
    if key.rsplit(":", 1)[-1] != choice["shape_digest"]:
        raise HetcompError(f"the plan was tuned for {choice['model']}, whose shapes are not "
                           f"those of {opts.model}: run `hetcomp tune --model {opts.model}`")


def _progress(step: int, total: int, what: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)


def _cap_widths(opts: CompileOptions, cap: int, why: str, notes: list) -> CompileOptions:
    """``opts`` without the tree widths above ``cap`` (``why``: what caps them), with a note
    for stderr in ``notes`` (printed once the input is checked); an explicit ``--width`` (or
    the plan's width) above it is refused."""
    if max(opts.widths) <= cap:
        return opts
    if opts.default_width is not None and opts.default_width > cap:
        raise HetcompError(f"--width {opts.default_width}: {why}")
    planned = (opts.plan_choice or {}).get("width") if opts.default_width is None else None
    if planned is not None and planned > cap:
        raise HetcompError(f"the plan's width {planned}: {why}")
    kept = tuple(w for w in opts.widths if w <= cap)
    dropped = ", ".join(str(w) for w in opts.widths if w > cap)
    notes.append(f"note: widths {dropped} left out: {why}")
    return dataclasses.replace(opts, widths=kept)


def _check_plan_width(opts: CompileOptions, heads) -> None:
    """The plan's width, where it is the default, is one the build compiles (after the
    heads and the sliding window capped them): refused before any work, not at its end."""
    choice = opts.plan_choice
    if (heads is not None and opts.default_width is None and choice is not None
            and choice["width"] not in opts.widths):
        raise HetcompError(f"the plan's width {choice['width']} is not a compiled width "
                           f"({', '.join(map(str, opts.widths))})")


def _datastore(opts: CompileOptions, heads, vocab_size: int) -> tuple[bytes, dict] | None:
    """``(datastore.npy's bytes, its manifest entry)`` for ``opts.datastore``, or None (no
    heads: no lookup runs; "none"; "auto" for heads that kept no training responses, or for a
    registered model whose entry says the store costs it acceptance)."""
    if heads is None or opts.datastore == "none":
        return None
    from .calibrate import read_responses, training_responses  # (calibrate imports us)

    if opts.datastore == "auto":
        found = (training_responses(heads, vocab_size)
                 if default_datastore(opts.model) else None)
        if found is None:
            return None
        seqs, source = found
    else:
        seqs, source = list(read_responses(opts.datastore, vocab_size).values()), opts.datastore
    tokens = pack_sequences(seqs)
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    return buf.getvalue(), {"source": os.path.basename(source), "sequences": len(seqs),
                            "tokens": int(len(tokens) - len(seqs))}


def _check_heads(heads: MedusaHeads, cfg, path: str) -> None:
    """Heads trained for another model are refused before any work."""
    if heads.w.shape[1] != cfg.hidden_size:
        raise HetcompError(f"Medusa heads {path} do not fit this model's hidden size")
    ids = heads.token_ids()  # the draft vocabulary's and the calibration responses'
    if ids.size and not (0 <= ids.min() and ids.max() < cfg.vocab_size):
        raise HetcompError(f"Medusa heads {path} hold token ids outside this model's "
                           f"vocabulary of {cfg.vocab_size}")


def compile_model(opts: CompileOptions, out_dir: str, quiet: bool = False, weights=None,
                  force: bool = False) -> str:
    """Compile ``opts.model`` into the artifact folder ``out_dir``; returns its path.

    ``out_dir`` must be absent, an empty folder, or (with ``force``) an artifact to replace;
    anything else is refused before any work is done.

    ``weights`` = ``(config, float32 weights, tokenizer spec, source)`` skips loading (tests).
    """

    t0 = time.time()
    check_output(out_dir, is_artifact, "hetcomp artifact", force)
    cross_linker(opts.target)  # a missing cross linker is one line now, not after the build
    if weights is None:  # (weights given in memory: no model file to read shapes from)
        _check_plan_model(opts)
    # Load (and so validate) the input before printing anything: bad input gets one line.
    cfg, w, spec, source = weights if weights is not None else load_model(
        opts.model, opts.max_context, keep_quant=is_quant(opts.dtype))
    check_quantizable(cfg, opts.dtype)
    tok = TokenizerInfo.from_spec(spec)
    heads = MedusaHeads.load(opts.heads) if opts.heads else None
    if heads is not None:
        _check_heads(heads, cfg, opts.heads)
    store = _datastore(opts, heads, cfg.vocab_size)
    notes: list[str] = []
    if heads is not None:
        # Widths no tree the heads can draft fills (one head of 10 candidates: 11 nodes).
        cap = largest_tree(heads.num_heads, heads.rank_probs.shape[1])
        opts = _cap_widths(opts, cap, f"{heads.num_heads} Medusa head(s) draft trees of at "
                                      f"most {cap} nodes", notes)
    # Where the artifact runs on this machine, its decode steps are timed to choose the width.
    measure = (heads is not None and opts.default_width is None and opts.plan_choice is None
               and opts.plan is None and not opts.separate_weights
               and opts.target in ("host", "x86-64-v3"))
    steps = 5 if measure else 4
    window = cfg.sliding_window  # a tree node's ancestors must lie inside the window
    if window and heads is not None:
        opts = _cap_widths(opts, window, f"wider than the model's sliding window of {window} "
                                         "tokens", notes)
    if window and max(opts.verify_widths, default=0) > window:
        raise HetcompError(f"verify width {max(opts.verify_widths)} is wider than the model's "
                           f"sliding window of {window} tokens")
    _check_plan_width(opts, heads)
    for note in [] if quiet else notes:
        print(note, file=sys.stderr, flush=True)
    _progress(1, steps, f"loaded {opts.model} ({parameter_count(w) / 1e6:.0f}M "
                    "parameters)", quiet)
    _progress(2, steps, f"building Relax module ({cfg.num_layers} layers, {opts.dtype}, "
                    f"{opts.cache_dtype} KV cache)", quiet)
    widths = tuple(sorted({*(opts.widths if heads is not None else (1,)),
                           *opts.verify_widths}))
    tuning = None
    root = heads is not None and heads.u is not None
    draft_dtype = opts.draft_dtype or (opts.dtype if opts.dtype in DRAFT_DTYPES else "float16")
    draft_vocab = 0 if heads is None or heads.vocab is None else len(heads.vocab)
    # A plan's module target is its host unit's (a CPU, or a GPU driven by --target's CPU).
    target_spec = (dict(opts.plan.targets[0]) if opts.plan is not None
                   else target_dict(opts.target, opts.cuda_arch))
    graphs = opts.cuda_graph and uses_cuda_graph(target_spec, opts.plan)
    device_len = graphs if opts.device_len is None else opts.device_len
    target = compiler().Target(target_spec)
    # Linears on int8 activations: every verify's attention the fused kernel, so that a
    # tree row computes what sequential decoding computes (decoder.FUSED_WIDTHS).
    exact = int8_activations(opts, target)
    planned = (opts.plan_choice or {}).get("int8_linears")
    if planned is not None and planned != exact and not quiet:
        kinds = {True: "int8-dot linears", False: "dequantizing linears"}
        print(f"note: the plan's width was chosen for {kinds[planned]} (tune profiled them); "
              f"this build runs {kinds[exact]}", file=sys.stderr, flush=True)
    mod = build_module(cfg, opts.dtype, heads.num_heads if heads else 0, static_widths=widths,
                       medusa_root=root, draft_dtype=draft_dtype, draft_vocab=draft_vocab,
                       prefill_chunk=PREFILL_CHUNK, kv_dtype=opts.cache_dtype,
                       device_len=device_len, exact_attention=exact)
    fused = (opts.plan is None and (fuses_linears(target) if opts.fuse_linears is None
                                    else opts.fuse_linears))
    # Tokens a step each width accepts as the artifact will decode (None: the trees' tau;
    # ~6 s for SmolLM2's held-out responses, under step 2's line).
    replayed = _replayed(heads, tok, cfg.vocab_size, opts.widths, store)
    width, width_source = _default_width(opts, cfg, heads, draft_dtype, device_len, fused,
                                         replayed, exact)
    cost = _cost_models(opts, cfg, width, heads, int8_linears=exact)
    cost_source = cost.pop("source") if cost else None
    scheduled: list = []
    if opts.plan is not None:
        _progress(3, steps, f"partitioning across {', '.join(opts.plan.units)}; compiling", quiet)
        # Float activations on every unit (int8_activations says why).
        ex = build(mod, target, opts.plan, cost, scheduled, tensor_cores=opts.tensor_cores,
                   int8_dot=False)
    elif opts.target == "cuda":
        _progress(3, steps, "scheduling and compiling for cuda (GPU rules"
                        + (", fused linears" if fused else "")
                        + (", tensor cores" if opts.tensor_cores else "")
                        + (", CUDA graphs)" if opts.cuda_graph else ")"), quiet)
        ex = build(mod, target, None, cost, scheduled, cuda_graph=opts.cuda_graph,
                   fuse_linears=fused, tensor_cores=opts.tensor_cores)
    else:
        path = _tuning_path(opts, quiet)
        if path is not None:  # before annotating: records are keyed by the kernels as built
            mod, count = apply_database(mod, target, path)
            tuning = {"db": path, "kernels": count}
        _progress(3, steps, f"scheduling and compiling for {opts.target}"
                        + (f" ({tuning['kernels']} tuned kernels)" if tuning else ""), quiet)
        ex = build(mod, target, None, cost, scheduled, fuse_linears=fused,
                   int8_dot=opts.int8_dot)
    _progress(4, steps, f"packing weights and writing {out_dir}", quiet)
    report: dict = {}
    packed = pack_weights(cfg, w, opts.dtype, report)
    if is_quant(opts.dtype) and not quiet:
        print(f"{opts.dtype} weights: {quant_summary(report)}", file=sys.stderr, flush=True)
    # Every parameter comes from its recipe, the one `hetcomp attach-weights` follows to
    # rebuild it from the model file (and heads file) where the artifact runs.
    recipes = {name: {"weight": name} for name, _, _ in param_specs(cfg, opts.dtype)}
    placement = {}
    if opts.plan is not None:
        placement, recipes = _split_params(scheduled[0], cfg, opts.dtype)
    model_params = list(recipes)
    functions = {"prefill": model_params, f"prefill_w{PREFILL_CHUNK}": model_params,
                 "verify": model_params, "commit": []}
    functions.update({f"verify_w{w}": model_params for w in widths})
    speculative = None
    if heads is not None:
        mparams = []
        for field in ("w", "b", "u") if root else ("w", "b"):  # the heads stacked
            name = f"medusa.{field}"
            recipes[name] = {"heads": field, "stacked": True}
            if field != "b":
                recipes[name]["dtype"] = draft_dtype
            mparams.append(name)
        assert mparams == [n for n, _, _ in medusa_param_specs(cfg, heads.num_heads, draft_dtype,
                                                                root)]
        head = "embed" if cfg.tie_embeddings else "lm_head"
        # The draft is not partitioned: a head a plan split in verify stays whole for it.
        recipes.setdefault(head, {"weight": head})
        vocab = []
        if draft_vocab:  # the draft's own LM head: the draft vocabulary's rows
            recipes["medusa.lm_head"] = {"weight": head, "rows": "vocab"}
            if not is_quant(opts.dtype):  # a quantized head keeps its blocks
                recipes["medusa.lm_head"]["dtype"] = draft_dtype
            recipes["medusa.vocab"] = {"heads": "vocab"}
            head, vocab = "medusa.lm_head", ["medusa.vocab"]
        elif draft_dtype != opts.dtype and not is_quant(opts.dtype):  # the draft's own copy
            recipes["medusa.lm_head"] = {"weight": head, "dtype": draft_dtype}
            head = "medusa.lm_head"
        functions["medusa"] = ["embed", head, *mparams, *vocab]
        speculative = {
            "num_heads": heads.num_heads,
            "rank_probs": heads.rank_probs.tolist(),
            "heads_info": heads.info,
            "heads_file": {"name": os.path.basename(opts.heads),
                           "sha256": sha256_file(opts.heads),
                           # (where `bench` and `attach-weights` find them on this machine
                           # when they are not the package's)
                           "path": os.path.abspath(opts.heads)},
            # Trees for every width up to the largest (lookup drafting shrinks the Medusa
            # tree by the chain it adds), from the measured joint statistics.
            "trees": {str(w): build_tree(heads.rank_probs, w, heads.ranks).to_json()
                      for w in range(1, max(opts.widths) + 1)},
        }
        if store is not None:
            speculative["datastore"] = store[1]
        plan_tree = (opts.plan_choice or {}).get("tree")
        if plan_tree and width_source == "plan":  # the plan's own tree at its width
            speculative["trees"][str(width)] = plan_tree
    params = [(name, param_from_recipe(r, packed, heads, opts.dtype))
              for name, r in recipes.items()]
    units = _units(opts.plan, opts.target)
    manifest = {
        "model": opts.model if opts.model == "smollm2" else os.path.basename(opts.model),
        "source": source_info(source),
        "config": dataclasses.asdict(cfg),
        "dtype": opts.dtype,
        "kv_dtype": opts.cache_dtype,  # absent in older manifests: float32
        "target": opts.target,
        "target_spec": target_spec,
        # The CPU it runs on: architecture and the ISA extensions its code may use.
        "cpu": cpu_requirements([target_spec] + [u["target"] for u in units if "target" in u]),
        "units": units,
        "param_units": placement,
        # The unit whose device holds the KV cache (the dense attention part's).
        "kv_unit": opts.plan.kv_unit if opts.plan is not None else 0,
        "plan": opts.plan.to_json() if opts.plan is not None else None,
        "plan_source": (opts.plan.source if opts.plan is not None
                        else (opts.plan_choice or {}).get("source")),
        "plan_prediction": opts.plan_prediction,
        "tuning": tuning,
        "functions": functions,
        "param_recipes": recipes,
        "tokenizer": tok.to_json(),
        "widths": list(opts.widths) if heads is not None else [1],
        "default_width": width,
        "prefill_chunk": PREFILL_CHUNK,
        "default_width_source": width_source,
        # The lookup nodes a step of each width drafts unless told (`generate --lookup`):
        # those the replay found to accept the most (None: auto_lookup's)
        "lookup": replayed and {str(w): n for w, n in replayed.lookups.items() if w > 1},
        "lookup_source": replayed and replayed.source,
        "cost_models": cost_source,
        "kernels": kernel_table(scheduled[0], units) if scheduled else [],
        # What the VM allocates per call beyond weights and cache (a prefill chunk's rows;
        # the draft's, whose nodes ``s`` are at most the widest tree's).
        "workspace_bytes": workspace_bytes(scheduled[0], opts.plan,
                                           {"w": PREFILL_CHUNK, "s": max(widths)}),
        # A whole-model GPU build: kernel launches per call of the static-shape functions.
        "cuda_graph": graphs,
        # Norms and gated activations inside the linears' kernels (FuseLinearChains).
        "fused_linears": fused,
        # Every verify's attention the fused masked kernel (linears on int8 activations:
        # a tree row computes what sequential decoding computes, bit for bit).
        "exact_attention": exact,
        # The graphs replay the cache addresses they captured: one cache pair per artifact.
        "fixed_cache": device_len,
        "launches": (launch_counts(scheduled[0], graphs, tuple(
            [f"prefill_w{PREFILL_CHUNK}", *(f"verify_w{w}" for w in widths), "medusa"]))
            if uses_cuda_graph(target_spec, opts.plan) else None),
        "speculative": speculative,
        "draft_dtype": draft_dtype if heads is not None else None,
        "draft_vocab": draft_vocab or None,
    }
    revise = (functools.partial(_measure_width, heads=heads, widths=opts.widths,
                                roofline=(width, width_source), replayed=replayed,
                                quiet=quiet)
              if measure else None)
    path = export_artifact(out_dir, ex, params, tok.tok.to_str(), manifest,
                           extra_files={DATASTORE_FILE: store[0]} if store else None,
                           fcompile=export_compiler(opts.target),
                           write_weights=not opts.separate_weights, force=force, revise=revise)
    if not quiet:
        print(f"compiled in {time.time() - t0:.1f}s -> {path}", file=sys.stderr)
    return path


# What the width measurement decodes (any text serves: a step's time hardly depends on it).
MEASURE_PROMPT = "Explain how a refrigerator works, in simple terms."
MEASURE_NEW_TOKENS = 12


def _measure_width(folder: str, heads, widths, roofline: tuple[int, str],
                   replayed, quiet: bool) -> dict | None:
    """The default width from this machine: each width's decode step timed on the artifact
    in ``folder`` (:func:`~hetcomp.runtime.unit_time.decode_step_seconds`), its accepted
    tokens a step (tau) as a decode with the artifact's lookup gets them (``replayed``:
    :func:`_replayed`; None: the heads' trees'), the width with the most tokens a second
    chosen (:func:`~hetcomp.planner.best_width`); every width is timed once, and again only
    while it may beat the best one (:func:`~hetcomp.planner.may_beat_best`). The roofline
    planner's choice (``roofline``:
    width and source) stays in the record beside it: on a 2-core AVX-512 machine it chose
    W=16 from numpy's matmul rate, where our kernels made that step twice W=1's and
    speculation slower than sequential decoding. Returns the manifest's new entries, or None
    where the artifact does not run here or too few widths fit its context."""
    _progress(5, 5, f"timing a decode step at W = {', '.join(map(str, widths))} here", quiet)
    try:
        art = load_artifact(folder, verify=False)
    except HetcompError as e:  # an x86-64-v3 build on an older CPU
        if not quiet:
            print(f"not timed ({e}); the roofline's width stays", file=sys.stderr)
        return None
    prompt = art.tokenizer.encode(MEASURE_PROMPT)[:16] or [0]  # (a vocabulary without it)
    room = art.config.max_context - len(prompt) - MEASURE_NEW_TOKENS
    fits = sorted({1, *(w for w in widths if w <= room)})  # W = 1: no speculation at all
    if len(fits) < 2:
        return None
    tree_taus, _ = tau_table(fits, heads.rank_probs, ranks=heads.ranks)
    taus, tau_source = ((replayed.taus, replayed.source) if replayed
                        else (tree_taus, "the heads' trees (held-out statistics)"))
    timed_once: list[int] = []  # (left out of the second pass)

    def worth_timing(w: int, timed: dict) -> bool:
        if may_beat_best(w, taus, timed):
            return True
        timed_once.append(w)
        return False

    step_s = decode_step_seconds(art, prompt, fits, MEASURE_NEW_TOKENS,
                                 worth_timing=worth_timing)
    best = best_width(taus, step_s)
    rate = {w: taus[w] / step_s[w] for w in step_s}
    return {
        "default_width": best,
        "default_width_source": (
            f"measured here: {1e3 * step_s[best]:.1f} ms a step at W={best}, "
            f"{rate[best]:.0f} tokens/s at {taus[best]:.2f} tokens a step "
            f"(W=1: {1e3 * step_s[1]:.1f} ms, {rate[1]:.0f} tokens/s)"),
        "width_measurement": {
            "step_ms": {str(w): round(1e3 * t, 3) for w, t in step_s.items()},
            "tau": {str(w): round(taus[w], 4) for w in fits},
            "tau_source": tau_source,
            # the Medusa trees' own expectation, beside what a decode gets
            "tree_tau": {str(w): round(tree_taus[w], 4) for w in fits},
            "tokens_per_s": {str(w): round(r, 2) for w, r in rate.items()},
            # widths timed once only: their tokens a second were not within 15% of the
            # best's (planner.may_beat_best)
            "timed_once": sorted(timed_once),
            "new_tokens": MEASURE_NEW_TOKENS, "prompt_tokens": len(prompt),
            "roofline_width": roofline[0], "roofline_source": roofline[1]},
    }


def quant_summary(report: dict) -> str:
    """``kept 210 q4_1, 1 q8_0 bit for bit; converted 3 float->q4_1`` (pack_weights' report)."""
    def items(d):
        return ", ".join(f"{n} {k}" for k, n in sorted(d.items())) or "none"

    return (f"kept {items(report.get('kept', {}))} bit for bit; converted "
            f"{items(report.get('converted', {}))} (tensors)")


def _tuning_path(opts: CompileOptions, quiet: bool) -> str | None:
    """The tuning database of this machine's CPU under ``opts.tuning_db``, if there is one.

    Records are tuned on, and valid for, the build machine's CPU: they apply to ``--target
    host`` only; a database of another machine (another fingerprint) is not found.
    """
    if opts.tuning_db is None:
        return None

    digest = detect_unit("cpu").fingerprint.digest
    path = database_dir(opts.tuning_db, digest)
    if not os.path.isdir(path):
        if not quiet:
            print(f"no tuning records for this machine (fingerprint {digest}) under "
                  f"{opts.tuning_db}: hand-written schedules", file=sys.stderr)
        return None
    return path


def _units(plan, target: str) -> list[dict]:
    if plan is None and target == "cuda":
        return [{"name": "cuda", "device": "cuda", "device_id": 0}]
    if plan is None:
        return [{"name": "cpu", "device": "cpu", "device_id": 0}]
    out, seen = [], {}
    for name, tgt in zip(plan.units, plan.targets):
        dev = "cpu" if tgt["kind"] == "llvm" else tgt["kind"]
        out.append({"name": name, "device": dev, "device_id": seen.get(dev, 0),
                    "target": dict(tgt)})
        seen[dev] = seen.get(dev, 0) + 1
    return out


def int8_activations(opts: CompileOptions, target) -> bool:
    """Whether the build's linears round their input rows to int8 blocks (``x86`` /
    ``arm.Int8DotLinear``): quantized weights, one CPU unit with VNNI and VBMI or NEON's dot
    product, not turned off by ``--no-int8-dot``; such a build verifies every tree with the
    fused attention kernel, which gives a tree row sequential decoding's floats.

    A partitioned plan's units keep float activations: its trees run the split attention the
    plan places and other units' kernels, whose rows differ from sequential decoding's by
    float rounding (~1e-3 in attention), and an int8 rounding grows such a difference to
    about a logit: speculation would leave greedy decoding's output, not only at near ties."""
    return (opts.plan is None and opts.int8_dot and is_quant(opts.dtype)
            and has_int8_dot(target))  # (an LLVM CPU target: has_int8_dot checks)


def _split_params(mod, cfg, dtype):
    """The partitioned ``verify``'s parameters in order (``mod``: the module as the build
    partitioned it): the unit (vdevice index) each lives on, and each one's recipe (packed
    weight and, for a slice, its column blocks per ``hetcomp.param_split``)."""
    func = mod["verify"]
    split = json.loads(func.attrs[PARAM_SPLIT_ATTR]) if PARAM_SPLIT_ATTR in func.attrs else {}
    by_var = {name.replace(".", "_"): name for name, _, _ in param_specs(cfg, dtype)}
    vdevs = list(mod.global_infos["vdevice"])
    units, recipes = {}, {}
    for p in func.params[NUM_INPUTS:]:
        if p.name in split:
            orig, lo, hi = split[p.name]
            recipes[p.name] = {"weight": by_var[orig], "blocks": [lo, hi]}
        else:
            recipes[p.name] = {"weight": by_var[p.name]}
        vd = getattr(p.ty, "vdevice", None)
        units[p.name] = 0 if vd is None else next(
            i for i, v in enumerate(vdevs) if compiler().same_vdevice(v, vd))
    return units, recipes


def _default_width(opts: CompileOptions, cfg, heads, draft_dtype: str,
                   device_len: bool = False, fused: bool = False,
                   replayed=None, exact_attention: bool = False) -> tuple[int, str]:
    """The width `generate` uses unless told, and where it comes from: ``--width``, the plan,
    or the planner on the target's roofline with the heads' trees (``device_len``, ``fused``,
    ``exact_attention``: the build's step is the CUDA-graph one, its linears fused, its
    attention the fused kernel at every width) and the tokens a step ``replayed``
    (:func:`_replayed`; None: the trees')."""
    if heads is None:
        return 1, "no Medusa heads"
    if opts.default_width is not None:
        return opts.default_width, "--width"
    choice = opts.plan_choice
    if choice is not None:  # (one of the compiled widths: _check_plan_width)
        return choice["width"], "plan"
    spec = target_roofline(opts.target, opts.cuda_arch)
    if spec is None:
        return 1, (f"no roofline for --target {opts.target} --cuda-arch {opts.cuda_arch}: "
                   "pass --width")
    shape = ModelShape.from_config(cfg, opts.dtype, opts.cache_dtype)
    p = plan(shape, [UnitModel.from_spec(spec, _tensor_products(opts))],
             rank_probs=heads.rank_probs, ranks=heads.ranks,
             tau=replayed and {w: replayed.taus[w] for w in opts.widths},
             options=PlannerOptions(widths=tuple(opts.widths), cache_len=256,
                                    draft_vocab=0 if heads.vocab is None else len(heads.vocab),
                                    draft_weight_bytes=dtype_bytes(draft_dtype),
                                    draft_root=heads.u is not None,
                                    device_len=device_len, fused_linears=fused,
                                    exact_attention=exact_attention))
    return p.width, (f"planner on the roofline of {spec.name} ({spec.notes}): "
                     f"{p.tokens_per_s:.0f} tokens/s predicted at W={p.width}, "
                     f"{p.tau:.2f} tokens a step ("
                     + ("replayed" if replayed else "the heads' trees") + ")")


def _replayed(heads, tok, vocab_size: int, widths, store):
    """The lookup nodes and tokens a step at W = 1 and each of ``widths`` as the artifact
    being built will decode by default (:func:`~hetcomp.driver.calibrate.replayed_taus`, a
    ``ReplayedWidths``: its trees, from the heads' joint statistics as its manifest gets
    them, ``store`` its datastore from :func:`_datastore`); None without heads or held-out
    responses to replay (:func:`~hetcomp.driver.calibrate.heldout_sequences`)."""
    if heads is None:
        return None
    from .calibrate import replayed_taus  # (calibrate imports us)

    datastore = (Datastore(np.load(io.BytesIO(store[0])), cached=REPLAY_CACHED)
                 if store is not None else None)
    return replayed_taus(heads, tok, vocab_size, sorted({1, *widths}), datastore)


def _tensor_products(opts: CompileOptions) -> int:
    """Tensor-core products per multiply-add of the build's GPU linears of 16-64 rows (0:
    none; :func:`~hetcomp.cost.roofline.tensor_core_products`). A CPU spec has no tensor
    cores, so the number matters only for a GPU unit."""
    return tensor_core_products(opts.dtype, opts.tensor_cores)


@functools.lru_cache(maxsize=None)
def target_roofline(target: str, cuda_arch: str = DEFAULT_CUDA_ARCH) -> DeviceSpec | None:
    """A roofline of the unit a target runs on: this machine's CPU measured (read bandwidth,
    numpy matmul GFLOP/s; about half a second) for host builds, the Orin NX CPU's datasheet
    for aarch64, the GPU datasheet of ``cuda_arch`` for cuda (:data:`~hetcomp.hardware.
    CUDA_ARCH_SPECS`; estimates both), None for other architectures (pass --width)."""
    if target == "cuda":
        name = CUDA_ARCH_SPECS.get(base_cuda_arch(cuda_arch))
        return SPECS[name] if name else None
    if target in ("host", "x86-64-v3"):
        bw = measure_read_bandwidth()
        # One core's rate times the threads the kernels run on, from the best of many short
        # bursts of a 64^3 product (small enough for one BLAS thread and a scheduler slice):
        # on a shared build machine a 0.2 s average of 1024^2 products measured whatever else
        # ran (11 instead of 250 GFLOP/s with one core busy: W=1 planned, W=8 idle), and a
        # two-thread burst still stalled with both cores busy (0.1 GFLOP/s); this holds ~98
        # per core with three busy processes.
        a = np.random.default_rng(0).random((64, 64), dtype=np.float32)
        a @ a
        best, n, t_end = float("inf"), 0, time.perf_counter() + 0.3
        while n < 100 or time.perf_counter() < t_end:  # at least 100 even if descheduled
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
            n += 1
        threads = cpu_threads()
        gflops = threads * 2 * 64 ** 3 / best / 1e9
        return DeviceSpec("cpu", "cpu", gflops, bw, notes=f"measured here: {bw:.1f} GB/s read, "
                          f"{gflops:.0f} GFLOP/s matmul")
    if target in ("aarch64", "aarch64-dotprod"):
        return ORIN_NX_CPU
    return None


def _cost_models(opts: CompileOptions, cfg, width: int, heads=None,
                 int8_linears: bool = False) -> dict | None:
    """AnnotateCost's arguments (``{"cost_fn", "units", "width", "cache_len"}``, costed at
    the artifact's default width), with where each unit's model comes from (``"source"``,
    popped by the caller): the cost models `tune` fitted beside the plan, else the
    roofline of each unit (the target's for single-unit builds); None without any. The
    sparse attention kernels are costed over the trees ``heads`` give at each width;
    ``int8_linears``: the linears as int8-dot kernels (op class ``linear_int8``)."""
    shape = ModelShape.from_config(cfg, opts.dtype, opts.cache_dtype)
    nnz = {} if heads is None else {
        w: int(build_tree(heads.rank_probs, w, heads.ranks).mask().sum()) for w in opts.widths}
    choice = opts.plan_choice or {}
    units = tuple(opts.plan.units) if opts.plan is not None else (
        "cuda" if opts.target == "cuda" else "cpu",)
    models, source = {}, {}
    for u in units:
        path = os.path.join(choice["cost_dir"], f"{u}.json") if choice.get("cost_dir") else None
        if path and os.path.isfile(path):
            models[u], source[u] = UnitCostModel.load(path), f"fitted ({path})"
        elif u in SPECS:
            models[u] = RooflineCost(SPECS[u], _tensor_products(opts))
            source[u] = f"roofline of {u}'s datasheet"
        elif opts.plan is None and (
                spec := target_roofline(opts.target, opts.cuda_arch)) is not None:
            models[u] = RooflineCost(spec, _tensor_products(opts))
            source[u] = f"roofline ({spec.notes})"
    if not models:
        return None

    def cost_fn(unit: str, op: dict) -> float:
        model = models.get(unit)
        if model is None:
            return float("nan")
        feat = kernel_features(shape, {"nnz": nnz.get(op["w"]), **op})
        if int8_linears and feat.op == "linear":
            feat = dataclasses.replace(feat, op="linear_int8")
        return float(model(feat))

    return {"cost_fn": cost_fn, "units": tuple(models), "width": width,
            "cache_len": min(256, cfg.max_context // 2), "source": source}


