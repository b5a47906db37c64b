"""Write a deployable artifact folder (format: :mod:`hetcomp.artifact_format`), atomically."""

from __future__ import annotations

import json
import os

import numpy as np

from .._tvm import TVM_VERSION, compiler
from ..artifact_format import (
    FORMAT,
    is_artifact,
    manifest_digest,
    output_dir,
    sha256_file,
    write_params,
)
from ..hardware import checkable_cpu_features, host_part, triple_arch


def cpu_requirements(target_specs: list[dict]) -> dict:
    """What the CPU that runs an artifact built for ``target_specs`` (its units' targets)
    must have: ``{"arch", "features"}``, the features being the instruction-set extensions
    the targets' LLVM code may use (``-mcpu=znver4`` enables AVX-512), which the loader
    checks against the CPU's own (:func:`hetcomp.runtime.artifact._check_target`)."""
    import platform

    c = compiler()
    llvm = [host_part(s) for s in target_specs]  # a GPU's host code runs on the CPU too
    llvm = [s for s in llvm if s.get("kind") == "llvm"]
    triple = next((s["mtriple"] for s in llvm if s.get("mtriple")), "")
    arch = triple_arch(triple) if triple else platform.machine()
    features: set[str] = set()
    for spec in llvm:
        features.update(checkable_cpu_features(
            c.llvm_get_cpu_features(c.Target(spec)), arch))
    return {"arch": arch, "features": sorted(features)}


def export_artifact(out_dir: str, executable, params: list[tuple[str, np.ndarray]],
                    tokenizer_json: str, manifest: dict, extra_files: dict | None = None,
                    fcompile=None, write_weights: bool = True, force: bool = False,
                    revise=None) -> str:
    """Write everything into a temporary sibling folder, then rename it to ``out_dir``.

    An existing artifact at ``out_dir`` is replaced only with ``force``; any other existing
    content is refused (:func:`hetcomp.artifact_format.check_output`).
    ``write_weights=False`` leaves ``params.bin`` out; its size and SHA-256 stay in the
    manifest so that weights attached later (``hetcomp attach-weights``) are checked.
    """
    with output_dir(out_dir, is_artifact, "hetcomp artifact", force) as tmp:
        lib = os.path.join(tmp, "lib.so")
        executable.export_library(lib, fcompile=fcompile)
        pbin = os.path.join(tmp, "params.bin")
        index = write_params(pbin, params)
        with open(os.path.join(tmp, "tokenizer.json"), "w") as fh:
            fh.write(tokenizer_json)
        for name, data in (extra_files or {}).items():  # text, or bytes
            with open(os.path.join(tmp, name), "wb" if isinstance(data, bytes) else "w") as fh:
                fh.write(data)
        manifest = dict(manifest)
        manifest.update({
            "format": FORMAT,
            "tvm_version": TVM_VERSION,
            "params": index,
            "files": {
                "lib.so": {"sha256": sha256_file(lib)},
                "params.bin": {"bytes": os.path.getsize(pbin), "sha256": sha256_file(pbin)},
                "tokenizer.json": {"sha256": sha256_file(os.path.join(tmp, "tokenizer.json"))},
                **{name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                          "sha256": sha256_file(os.path.join(tmp, name))}
                   for name in extra_files or {}},
            },
        })
        manifest["weights_attached"] = write_weights
        if not write_weights:
            os.remove(pbin)
        _write_manifest(tmp, manifest)
        changes = revise(tmp) if revise is not None else None
        if changes:
            manifest.update(changes)
            _write_manifest(tmp, manifest)
    return os.path.abspath(out_dir)


def _write_manifest(folder: str, manifest: dict) -> None:
    manifest["digest"] = manifest_digest(manifest)
    with open(os.path.join(folder, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
