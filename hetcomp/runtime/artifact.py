"""Load and validate an artifact folder; holds the VM, the weights and the tokenizer.

Uses only ``tvm.runtime`` names (through :mod:`hetcomp._tvm`), so it works in a
runtime-only TVM installation (``TVM_USE_RUNTIME_LIB=1``).
"""

from __future__ import annotations

import os
import re

import numpy as np

from .. import _tvm
from ..artifact_format import (
    DATASTORE_FILE,
    PREFILL_CHUNK,
    check_files,
    kv_dtype,
    read_manifest,
)
from ..errors import HetcompError
from ..frontend.config import LlamaConfig, kv_cache_shapes
from ..frontend.tokenizer import TokenizerInfo
from ..hardware import check_cpu, triple_arch
from ..speculative.tree import csr_from_mask


def latest_cached(cache: dict, key, make, limit: int):
    """``cache[key]``, made by ``make()`` when missing; the cache keeps the ``limit`` keys
    used latest (a dict's order is its use order: a hit is re-inserted last)."""
    value = cache.pop(key, None)
    if value is None:
        value = make()
        if len(cache) >= limit:
            del cache[next(iter(cache))]
    cache[key] = value
    return value


def _check_target(manifest: dict) -> None:
    """One line of error where this CPU cannot run the artifact's code."""
    import platform

    cpu = manifest.get("cpu")  # older artifacts: the target's triple alone
    if cpu is None:
        spec = manifest.get("target_spec", {})
        spec = spec.get("host", spec)  # a GPU target's host code runs on this CPU
        if spec.get("kind") != "llvm":
            return
        triple = spec.get("mtriple", "")
        cpu = {"arch": triple_arch(triple) if triple else platform.machine(), "features": []}
    check_cpu(cpu)


class Artifact:
    """A compiled model: VM functions, weights on the device, tokenizer and metadata."""

    def __init__(self, path: str, verify: bool = True):
        """Load the artifact at ``path``. ``verify``: check ``params.bin`` against the SHA-256
        recorded at compile time (0.86 s for the 553 MB float32 SmolLM2 here; ``--no-verify``
        skips it, and then only its size is checked)."""
        self.path = os.path.abspath(path)
        self.manifest = read_manifest(self.path)
        try:
            self._open(verify)
        except HetcompError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            # The digest matched, so another hetcomp version or an edit that recomputed it.
            raise HetcompError(f"malformed manifest.json in {self.path}: "
                               f"{type(e).__name__}: {e}") from None

    def _open(self, verify: bool) -> None:
        _check_target(self.manifest)
        if not isinstance(self.manifest.get("default_width") or 1, int):
            raise TypeError(f"default_width {self.manifest['default_width']!r} is not a width")
        lookup = self.manifest.get("lookup") or {}
        if not isinstance(lookup, dict) or not all(
                isinstance(n, int) and not isinstance(n, bool) and 0 <= n for n in lookup.values()):
            raise TypeError(f"lookup {lookup!r} is not lookup nodes by width")
        lib = os.path.join(self.path, "lib.so")
        pbin = os.path.join(self.path, "params.bin")
        tjson = os.path.join(self.path, "tokenizer.json")
        if not os.path.isfile(pbin) and not self.manifest.get("weights_attached", True):
            raise HetcompError(f"artifact {self.path} was compiled with separate weights: "
                               "run `hetcomp attach-weights` on it first")
        check_files(self.path, self.manifest, verify_params=verify)  # (each present, too)
        self.config = LlamaConfig.from_dict(self.manifest["config"])
        self.dtype = self.manifest["dtype"]
        self.kv_dtype = kv_dtype(self.manifest)
        with open(tjson) as fh:
            self.tokenizer = TokenizerInfo.from_files(fh.read(), self.manifest["tokenizer"])
        units = self.manifest.get("units") or [{"device": "cpu", "device_id": 0}]
        # CUDA source in the library is compiled at load for the GPU it was built for (sm_87
        # on a Jetson Orin); an explicit HETCOMP_CUDA_ARCH still wins.
        archs = [u.get("target", {}).get("arch") for u in units if u["device"] == "cuda"]
        archs.append(self.manifest.get("target_spec", {}).get("arch"))
        arch = next((a for a in archs if a), None)
        try:
            self.devices = [_tvm.device(u["device"], u["device_id"]) for u in units]
        except Exception as e:
            raise HetcompError(f"this machine lacks a device the artifact needs: {e}") from None
        # (a full TVM makes a handle for a GPU it cannot find; the library's load would then
        # fail on the CUDA module's loader, which names no missing GPU)
        absent = [str(d) for d in self.devices if d.dlpack_device_type() != 1 and not d.exist]
        if absent:
            raise HetcompError(f"this machine lacks a device the artifact needs: {absent[0]} "
                               "(no GPU or driver found)")
        self.device = self.devices[0]
        self.upload = _tvm.Uploader(self.device)  # a step's small inputs, onto the device
        # The KV cache lives where the dense attention part runs (it reads the whole cache).
        self.kv_device = self.devices[int(self.manifest.get("kv_unit", 0) or 0)]
        try:
            with _tvm.cuda_arch(arch):  # this artifact's, not the process's first
                self.vm = _tvm.virtual_machine(_tvm.load_module(lib), self.devices)
        except Exception as e:
            raise HetcompError(f"cannot load artifact library {lib}: {e}") from None
        # Weights on the CPU are views of the mapped file (no second copy: the page cache
        # holds them once); other devices get one staged copy per tensor. Copy-on-write, so
        # nothing ever writes params.bin; the file's 64-byte alignment is DLPack's.
        self._weights_file = np.memmap(pbin, dtype=np.uint8, mode="c")
        by_name = {}
        for p in self.manifest["params"]:
            if not 0 <= p["offset"] <= p["offset"] + p["nbytes"] <= self._weights_file.size:
                raise HetcompError(f"malformed manifest.json in {self.path}: parameter "
                                   f"{p['name']} lies outside params.bin")
            arr = (self._weights_file[p["offset"]: p["offset"] + p["nbytes"]]
                   .view(p["dtype"]).reshape(p["shape"]))
            dev = self.devices[(self.manifest.get("param_units") or {}).get(p["name"], 0)]
            # (numpy's DLPack names cpu:0; a second CPU vdevice, cpu:1, gets its own copy)
            host = dev.dlpack_device_type() == 1 and dev.index == 0
            view = host and p["offset"] % 64 == 0 and arr.size
            by_name[p["name"]] = _tvm.view(arr) if view else _tvm.tensor(arr, dev)
        funcs = self.manifest["functions"]
        try:
            self.params = [by_name[n] for n in funcs["verify"]]
            self.medusa_params = [by_name[n] for n in funcs.get("medusa", [])]
        except KeyError as e:
            raise HetcompError(f"artifact weights lack parameter {e}: {self.path}") from None
        self.weight_bytes = sum(p["nbytes"] for p in self.manifest["params"]
                                if p["name"] in set(funcs["verify"]))
        self._prefill = self.vm["prefill"]
        # The static prefill chunk (older artifacts have none: the symbolic one serves).
        chunk = int(self.manifest.get("prefill_chunk", 0))
        self._prefill_static = ((chunk, self.vm[f"prefill_w{chunk}"])
                                if f"prefill_w{chunk}" in funcs else None)
        self._verify = self.vm["verify"]
        # Width-specialised verify functions (exact row tiling), preferred when present.
        self._verify_static = {int(f[len("verify_w"):]): self.vm[f] for f in funcs
                               if f.startswith("verify_w")}
        self._commit = self.vm["commit"]
        spec = self.manifest.get("speculative")
        self.trees = {}
        self._medusa = None
        if spec:
            from ..speculative.tree import Tree

            self.trees = {int(w): Tree.from_json(t) for w, t in spec["trees"].items()}
            self._medusa = self.vm["medusa"]
        self.widths = list(self.manifest.get("widths", [1]))
        # CUDA graphs replay the cache addresses they captured: such an artifact holds one
        # cache pair, which each new session takes over (manifest "fixed_cache").
        self.fixed_cache = bool(self.manifest.get("fixed_cache", False))
        self._cache_owner: Session | None = None  # the session holding it
        self._rank_probs = np.asarray(spec["rank_probs"]) if spec else None
        self._built_trees: dict = {}  # widths not stored in the manifest
        self._datastore = None  # loaded and indexed at the first lookup that reads it
        self.step_shapes: dict = {}  # the generator's tree layouts, by (width, lookup tree)
        self.medusa_parts: dict = {}  # their Medusa trees' arrays, by width
        # A tree's mask and CSR on the device, by the mask's bytes: a decode repeats a few
        # tree shapes, so a verify step copies only its tokens and positions.
        self._tree_tensors: dict = {}

    @property
    def datastore(self):
        """The lookup draft's datastore (:mod:`hetcomp.speculative.datastore`), or None when
        the artifact has none (``datastore.npy``, checked against the manifest at load)."""
        if self._datastore is None and DATASTORE_FILE in self.manifest["files"]:
            from ..speculative.datastore import Datastore

            try:
                tokens = np.load(os.path.join(self.path, DATASTORE_FILE), allow_pickle=False)
            except (OSError, ValueError) as e:
                raise HetcompError(f"cannot read {DATASTORE_FILE} of {self.path}: {e}") from None
            self._datastore = Datastore(tokens)
        return self._datastore

    @property
    def static_widths(self) -> list[int]:
        """Widths with a width-specialised ``verify_w{W}`` (faster than the generic one)."""
        return sorted(self._verify_static)

    def tree(self, width: int):
        """The compiled tree of ``width`` nodes, or one built from the heads' statistics."""
        if width in self.trees:
            return self.trees[width]
        from ..speculative.tree import Tree, build_tree

        if width == 1 or self._rank_probs is None:
            return Tree((-1,), (-1,), (1.0,))
        if width not in self._built_trees:
            self._built_trees[width] = build_tree(self._rank_probs, width)
        return self._built_trees[width]

    def medusa_candidates(self, hidden, root: int, topk: int, row: int = 0) -> np.ndarray:
        """``[K, topk]`` candidate ids of the Medusa heads, from row ``row`` of the hidden
        states ``[w, E]`` (the row that chose the tree's ``root`` token)."""
        return self._draft(hidden, row, [root])[1].numpy()[:, :topk]

    def draft_tree(self, hidden, row: int, nodes):
        """The next tree's tokens as a device tensor ``[W]`` (int32), drafted from row ``row``
        of ``hidden[w, E]`` (a device tensor: the verify call's rows); ``nodes`` lists the
        tree's nodes, root first, each a token id or ``-1 - (head * MEDUSA_TOPK + rank)``
        for a head's candidate (``generate._step_shape`` makes them from the tree). Nothing
        is read back: the verify call that follows takes the tensor as it is."""
        return self._draft(hidden, row, nodes)[2]

    def _draft(self, hidden, row: int, nodes):
        """The ``medusa`` call's outputs ``(logits, top, tokens)`` for ``sel = [[row, 0..],
        nodes]``."""
        sel = np.zeros((2, len(nodes)), "int32")
        sel[0, 0], sel[1] = row, nodes
        return self._medusa(hidden, self.upload(sel), *self.medusa_params)

    def bytes_per_token(self) -> int:
        """Weight bytes one decode step reads (the tied embedding is read once, as LM head)."""
        return self.weight_bytes

    def new_session(self) -> Session:
        return Session(self)


class Session:
    """One sequence's KV cache and the three compiled functions bound to it."""

    def __init__(self, art: Artifact):
        self.art = art
        owner = art._cache_owner
        if owner is not None:  # stale K/V past length 0 is never read
            self.k_cache, self.v_cache = owner.k_cache, owner.v_cache
        else:
            ks, vs = kv_cache_shapes(art.config)
            self.k_cache = _tvm.tensor(np.zeros(ks, art.kv_dtype), art.kv_device)
            self.v_cache = _tvm.tensor(np.zeros(vs, art.kv_dtype), art.kv_device)
        if art.fixed_cache:
            art._cache_owner = self
        self.length = 0
        self.tokens: list[int] = []  # the ids whose K/V the cache holds, in order
        self.capacity = art.config.max_context
        self._tree_tokens = np.zeros(0, "int64")

    def _check_owner(self) -> None:
        if self.art.fixed_cache and self.art._cache_owner is not self:
            raise HetcompError("this session's KV cache now belongs to a newer session (an "
                               "artifact with CUDA graphs holds one cache)")

    def _t(self, arr, dtype="int32"):
        return self.art.upload(np.ascontiguousarray(arr, dtype=dtype))

    def prefill(self, ids, chunk: int | None = None):
        """Fill the cache with ``ids``; returns (greedy next id, last hidden state [1, E]).

        Chunks of the artifact's static prefill width run ``prefill_w{C}`` (the last one padded
        with token 0, whose K/V fall past the prompt, if it holds at least a third of C, or
        always in a fixed-cache GPU build), unless the padding would run past the cache;
        otherwise, or when ``chunk`` is given, chunks of ``chunk`` (default
        :data:`~hetcomp.artifact_format.PREFILL_CHUNK`) tokens run the symbolic-width
        ``prefill``."""
        self._check_owner()
        ids = np.asarray(ids, "int32")
        if len(ids) == 0:
            raise HetcompError("empty prompt")
        if self.length + len(ids) > self.capacity:
            raise HetcompError(
                f"prompt of {len(ids)} tokens does not fit the context of {self.capacity}")
        try:
            out = self._prefill(ids, chunk)
        except RuntimeError as e:  # (TVM's check failures)
            raise _library_mismatch(e, self.art.path) or e from None
        self.tokens.extend(int(i) for i in ids)
        return int(_tvm.download(out[2])[0]), out[1]

    def _prefill(self, ids, chunk: int | None):
        out = None
        static = self.art._prefill_static if chunk is None else None
        chunk = static[0] if static else (chunk or PREFILL_CHUNK)
        for s in range(0, len(ids), chunk):
            part = ids[s: s + chunk]
            w = len(part)
            # A short chunk runs symbolic on the CPU: the static kernels are ~3x faster per
            # row (500 vs 165 GFLOP/s here), so padding pays from a third of the chunk on. A
            # whole-model GPU build (fixed caches) always pads: its chunk replays as one
            # CUDA graph, and a GPU reads the weights once for 1 row or 64.
            pad = self.art.fixed_cache or 3 * w >= chunk
            if static and self.length + chunk <= self.capacity and pad:
                padded = np.zeros(chunk, "int32")
                padded[:w] = part
                out = static[1](
                    self._t(padded), self._t(np.arange(self.length, self.length + chunk)),
                    self._t(np.tril(np.ones((chunk, chunk)))), _tvm.shape_tuple([w]),
                    self.k_cache, self.v_cache, _tvm.length_shape(self.length),
                    *self.art.params)
            else:
                out = self.art._prefill(
                    self._t(part), self._t(np.arange(self.length, self.length + w)),
                    self._t(np.tril(np.ones((w, w)))), self.k_cache, self.v_cache,
                    _tvm.length_shape(self.length), *self.art.params)
            self.k_cache, self.v_cache = out[3], out[4]
            self.length += w
        return out

    def verify(self, tokens, positions, mask, csr=None):
        """Run tree nodes; returns ``(greedy ids [W], hidden [W, E] tensor, logits tensor)``.

        ``tokens``: the node ids, on the host or as the device tensor the draft made
        (:meth:`Artifact.draft_tree`).
        ``mask[W, W]``: node i sees node j where non-zero (its ancestors and itself); ``csr``:
        the same tree as ``(row_ptr, col_idx)`` (:meth:`~hetcomp.speculative.tree.Tree.csr`),
        built from the mask when not given (callers that repeat a tree shape cache it)."""
        self._check_owner()
        on_device = not isinstance(tokens, (np.ndarray, list, tuple))
        w = int(tokens.shape[0]) if on_device else len(tokens)
        if self.length + w > self.capacity:
            raise HetcompError(f"context of {self.capacity} tokens is full")
        if int(positions[0]) != self.length:  # the root sits at the cache's end
            raise HetcompError(f"tree root at position {int(positions[0])}, not at the cache "
                               f"length {self.length} (the CUDA-graph build reads the length "
                               "there)")
        fn = self.art._verify_static.get(w, self.art._verify)
        out = fn(tokens if on_device else self._t(tokens), self._t(positions),
                 *self._tree(mask, csr), self.k_cache, self.v_cache,
                 _tvm.length_shape(self.length), *self.art.params)
        self.k_cache, self.v_cache = out[3], out[4]
        greedy = _tvm.download(out[2])  # (waits for the step; the tokens are then ready too)
        self._tree_tokens = _tvm.download(tokens) if on_device else np.asarray(tokens)
        return greedy, out[1], out[0]

    @property
    def tree_tokens(self) -> np.ndarray:
        """The token ids of the last verified tree (read back after the step when the
        tokens were drafted on the device)."""
        return self._tree_tokens

    def _tree(self, mask, csr) -> tuple:
        """The device tensors of a tree's ``(mask, row_ptr, col_idx)``, made once per tree
        shape (kernels only read them; the artifact keeps the 64 latest shapes)."""
        mask = np.ascontiguousarray(mask, "int32")

        def make():
            row_ptr, col_idx = csr if csr is not None else csr_from_mask(mask)
            return self._t(mask), self._t(row_ptr), self._t(col_idx)

        return latest_cached(self.art._tree_tensors, (mask.shape[0], mask.tobytes()), make, 64)

    def commit(self, accepted):
        """Keep the accepted tree nodes (indices, root first) and extend the cache by them.

        Nodes already in place (the path ``0, 1, ..., a - 1``: every sequential step, and the
        speculative steps that accept the root or its first child) need no kernel call."""
        self._check_owner()
        self.tokens.extend(int(self._tree_tokens[a]) for a in accepted)
        if all(int(a) == j for j, a in enumerate(accepted)):
            self.length += len(accepted)
            return
        out = self.art._commit(self.k_cache, self.v_cache, self._t(accepted),
                               _tvm.length_shape(self.length))
        self.k_cache, self.v_cache = out[0], out[1]
        self.length += len(accepted)

    def truncate(self, length: int) -> None:
        """Forget the cache past ``length`` tokens (free: attention reads only the first
        ``length`` positions, and later calls overwrite the rest)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        self.length = length
        del self.tokens[length:]


def _library_mismatch(e: Exception, path: str) -> HetcompError | None:
    """The one-line error for a VM call that refused an input's shape, or None for any other
    error. The runtime shapes the caches and weights from the manifest, so a manifest the
    library was not compiled with (an edit that recomputed its digest, another build's
    file) fails the library's own shape check on the first call, the prefill."""
    text = str(e)
    if "match_cast error" not in text:
        return None
    fn, param = (re.search(rf"{k}=(\w+)", text) for k in ("fn", "param"))
    fn, param = fn[1] if fn else "a function", param[1] if param else "an input"
    return HetcompError(f"artifact {path}: manifest.json does not match lib.so (its {fn} "
                        f"refused the shape of {param}); recompile the model")


def load_artifact(path: str, verify: bool = True) -> Artifact:
    """Load a compiled artifact folder (see :class:`Artifact`)."""
    return Artifact(path, verify)
