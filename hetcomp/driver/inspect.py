"""``hetcomp inspect PATH``: what a file or folder hetcomp reads or writes holds, checked.

An artifact folder (its manifest), a model (GGUF file or HF folder: loaded and validated as
`compile` would), Medusa heads (.npz), a plan (.json) or a profile kit. Every input is read by
the same function the workflows use, so a file that `inspect` accepts is one they accept.
"""

from __future__ import annotations

import dataclasses
import math
import os

from ..artifact_format import check_files, kv_dtype, read_manifest
from ..cost.roofline import dtype_bytes
from ..errors import HetcompError
from ..frontend import MODELS, load_model, resolve_model
from ..frontend.config import LlamaConfig, kv_cache_shapes
from ..frontend.lazy import parameter_count
from ..plan import load_plan, plan_choice, plan_flags, plan_prediction
from ..speculative.medusa import MedusaHeads


def inspect_path(path: str) -> dict:
    """A summary of ``path`` (what kind it is, and what it holds); a registered model name
    (``qwen2.5-coder-0.5b``) is its GGUF."""
    if path in MODELS and not os.path.exists(path):
        path = resolve_model(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "manifest.json")):
            manifest = read_manifest(path)
            # What loading checks, but params.bin's digest (its size only: 0.9 s for 553 MB)
            check_files(path, manifest, verify_params=False)
            return {"kind": "artifact", **manifest, "memory": deployment_memory(manifest)}
        if os.path.isfile(os.path.join(path, "kit.json")):
            from ..profile.measure import read_kit  # lazy: it builds probes with the compiler

            kit = read_kit(path)
            return {"kind": "profile kit", "model": kit["model"], "units": kit["units"]}
        if os.path.isfile(os.path.join(path, "config.json")):
            return _model(path)
        raise HetcompError(f"{path} is no artifact, HF model folder or profile kit")
    if not os.path.isfile(path):
        raise HetcompError(f"no such file or folder: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".gguf":
        return _model(path)
    if ext == ".npz":
        heads = MedusaHeads.load(path)
        return {"kind": "medusa heads", "num_heads": heads.num_heads,
                "hidden_size": int(heads.w.shape[1]), "root_conditioned": heads.u is not None,
                "draft_vocab": None if heads.vocab is None else len(heads.vocab),
                "rank_probs": heads.rank_probs.tolist(),
                # what calibrate kept: the datastore's responses, the replay's held-out ones
                "training_responses": None if heads.responses is None else len(heads.responses),
                "held_out_responses": None if heads.heldout is None else len(heads.heldout)}
    if ext == ".json":
        return _plan(path)
    raise HetcompError(f"{path}: not a kind hetcomp reads (.gguf, .npz, .json or a folder)")


def _plan(path: str) -> dict:
    """A plan as `compile --plan` reads it with the flags that build it (a spec-estimate for
    a board: the board's); refused where no flags do, with compile's own line."""
    found = plan_flags(path)
    # (no flags build it: compile's own refusal, as --target host gives it)
    flags, plan = found if found is not None else (None, load_plan(path))
    choice = plan_choice(path)  # its width and tree: refused here as by every compile
    return {"kind": "plan", "compile_flags": flags,
            "partition": plan.to_json() if plan else None,
            "width": choice["width"] if choice else None,
            "prediction": plan_prediction(path)}


def _model(path: str) -> dict:
    cfg, weights, spec, _ = load_model(path)
    return {"kind": "model", "config": dataclasses.asdict(cfg),
            "tensors": len(weights),
            "parameters": parameter_count(weights),
            "vocabulary": len(spec["tokens"]) if "tokens" in spec else None,
            "chat_template": spec.get("chat_template") is not None}


def deployment_memory(manifest: dict) -> dict:
    """Bytes a deployment of the artifact holds: its weights (mapped once on a CPU), its KV
    cache at the compiled context (K and V in the manifest's ``kv_dtype``) and the workspace
    of the calls a generation makes (a prefill chunk, a verify step at the default width, the
    draft), which the VM's pooled allocator keeps between calls; older manifests have no
    workspace."""
    cfg = LlamaConfig.from_dict(manifest["config"])
    ks, vs = kv_cache_shapes(cfg)
    out = {"weights": int(manifest["files"]["params.bin"]["bytes"]),
           "kv_cache": dtype_bytes(kv_dtype(manifest)) * (math.prod(ks) + math.prod(vs))}
    ws = manifest.get("workspace_bytes")
    if ws:
        chunk = manifest.get("prefill_chunk")
        calls = (f"prefill_w{chunk}" if chunk else "prefill",
                 f"verify_w{manifest.get('default_width', 1)}", "medusa")
        out["workspace"] = int(sum(ws.get(f, 0) for f in calls))
    return out
