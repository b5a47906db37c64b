"""Attach weights to an artifact compiled with ``--separate-weights``.

The compiled library is small (a few MB); the weights are hundreds of MB. An artifact built
with separate weights travels without ``params.bin``, and this module rebuilds it where the
artifact runs from the model file (GGUF or HF folder) and, for speculative artifacts, the
Medusa heads file, following each parameter's recipe in the manifest (packed weight name,
optionally a range of column blocks for a partitioned layer; or a head's field). The result
must equal the compiled-in digest byte for byte, so the weights are exactly those the
artifact was built and checked with.

Needs numpy and the model loaders only: it runs with a runtime-only TVM installation.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from ..artifact_format import output_file, read_manifest, sha256_file, write_params
from ..data import packaged_file
from ..errors import HetcompError


def recorded_heads(manifest: dict) -> str | None:
    """The heads file an artifact was compiled with, found on this machine: the package's
    file of its name, else the path `compile` read it from, whichever holds the bytes the
    manifest's sha256 names; None where neither does (or the artifact has no heads)."""
    info = (manifest.get("speculative") or {}).get("heads_file") or {}
    want = info.get("sha256")
    for path in (packaged_file(info.get("name") or ""), info.get("path")):
        if (info and path and os.path.isfile(path)
                and (want is None or sha256_file(path) == want)):
            return path
    return None


def _heads_path(art_dir: str, manifest: dict, heads: str | None) -> str:
    if heads is not None:
        return heads
    found = recorded_heads(manifest)
    if found is not None:
        return found
    info = (manifest.get("speculative") or {}).get("heads_file") or {}
    raise HetcompError(f"artifact {art_dir} has Medusa heads: pass --heads "
                       f"{info.get('name', 'HEADS.npz')}")


def rebuild_params(manifest: dict, model: str, heads: str | None, art_dir: str = ""
                   ) -> list[tuple[str, np.ndarray]]:
    """The artifact's parameters, in order, rebuilt from ``model`` (and the heads file)."""
    from ..frontend import load_model
    from ..frontend.weights import pack_weights, param_from_recipe

    recipes = manifest.get("param_recipes")
    if not recipes:
        raise HetcompError(f"artifact {art_dir} records no parameter recipes: recompile it")
    if heads is not None and not any("heads" in r for r in recipes.values()):
        raise HetcompError(f"artifact {art_dir} has no Medusa heads: leave out --heads")
    from ..quant_format import is_quant

    cfg, w, _, _ = load_model(model, manifest["config"]["max_context"],
                              keep_quant=is_quant(manifest["dtype"]))
    if cfg.hidden_size != manifest["config"]["hidden_size"] or (
            cfg.num_layers != manifest["config"]["num_layers"]):
        raise HetcompError(f"model {model} is not the model artifact {art_dir} was built for")
    dtype = manifest["dtype"]
    packed = pack_weights(cfg, w, dtype)
    head_arrays = None
    if any("heads" in r for r in recipes.values()):
        from ..speculative.medusa import MedusaHeads

        head_arrays = MedusaHeads.load(_heads_path(art_dir, manifest, heads))
    out = []
    for p in manifest["params"]:
        arr = param_from_recipe(recipes[p["name"]], packed, head_arrays, dtype)
        if list(arr.shape) != p["shape"] or str(arr.dtype) != p["dtype"]:
            raise HetcompError(f"parameter {p['name']} rebuilt as {arr.dtype}{list(arr.shape)}, "
                               f"artifact expects {p['dtype']}{p['shape']}")
        out.append((p["name"], arr))
    return out


def attach_weights(art_dir: str, model: str | None = None, heads: str | None = None,
                   quiet: bool = False) -> str:
    """Write ``params.bin`` into ``art_dir`` (atomically) and check it against the manifest."""
    manifest = read_manifest(art_dir)
    want = manifest["files"]["params.bin"]
    model = model or manifest["model"]
    params = rebuild_params(manifest, model, heads, art_dir)
    out = os.path.join(art_dir, "params.bin")
    with output_file(out) as tmp:
        write_params(tmp, params)
        if os.path.getsize(tmp) != want["bytes"] or sha256_file(tmp) != want.get("sha256"):
            raise HetcompError(f"weights rebuilt from {model} differ from those artifact "
                               f"{art_dir} was compiled with")
    if not quiet:
        print(f"rebuilt {len(params)} parameters from {model}", file=sys.stderr, flush=True)
    return out
