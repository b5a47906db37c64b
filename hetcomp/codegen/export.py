"""Write a deployable artifact folder, atomically (a temporary folder renamed into place).

Layout::

    DIR/manifest.json   model, source hash, config, dtype, target, TVM version, files, params
    DIR/lib.so          the compiled Relax VM executable (all kernels)
    DIR/params.bin      packed weights, concatenated raw little-endian arrays (64-byte aligned)
    DIR/tokenizer.json  the HF ``tokenizers`` serialisation
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

from .._tvm import TVM_VERSION
from ..errors import HetcompError

FORMAT = "hetcomp-artifact/1"
_ALIGN = 64


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def manifest_digest(manifest: dict) -> str:
    """Digest of the manifest without its own ``digest`` field (detects hand edits)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_params(path: str, params: list[tuple[str, np.ndarray]]) -> list[dict]:
    index, offset = [], 0
    with open(path, "wb") as fh:
        for name, arr in params:
            arr = np.ascontiguousarray(arr)
            pad = (-offset) % _ALIGN
            fh.write(b"\0" * pad)
            offset += pad
            fh.write(arr.tobytes())
            index.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape),
                          "offset": offset, "nbytes": int(arr.nbytes)})
            offset += arr.nbytes
    return index


def export_artifact(out_dir: str, executable, params: list[tuple[str, np.ndarray]],
                    tokenizer_json: str, manifest: dict, extra_files: dict | None = None,
                    fcompile=None, write_weights: bool = True) -> str:
    """Write everything into a temporary sibling folder, then rename it to ``out_dir``.

    ``write_weights=False`` leaves ``params.bin`` out; its size and SHA-256 stay in the
    manifest so that weights attached later (``hetcomp attach-weights``) are checked.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise HetcompError(f"output path exists and is not a folder: {out_dir}")
    tmp = tempfile.mkdtemp(prefix=".hetcomp-tmp-", dir=parent)
    try:
        lib = os.path.join(tmp, "lib.so")
        executable.export_library(lib, fcompile=fcompile)
        pbin = os.path.join(tmp, "params.bin")
        index = write_params(pbin, params)
        with open(os.path.join(tmp, "tokenizer.json"), "w") as fh:
            fh.write(tokenizer_json)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as fh:
                fh.write(text)
        manifest = dict(manifest)
        manifest.update({
            "format": FORMAT,
            "tvm_version": TVM_VERSION,
            "params": index,
            "files": {
                "lib.so": {"sha256": sha256_file(lib)},
                "params.bin": {"bytes": os.path.getsize(pbin), "sha256": sha256_file(pbin)},
                "tokenizer.json": {"sha256": sha256_file(os.path.join(tmp, "tokenizer.json"))},
            },
        })
        manifest["weights_attached"] = write_weights
        if not write_weights:
            os.remove(pbin)
        manifest["digest"] = manifest_digest(manifest)
        with open(os.path.join(tmp, "manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=1, sort_keys=True)
        if os.path.isdir(out_dir):
            old = out_dir + ".old-" + os.path.basename(tmp)
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
