"""``hetcomp compile``: model file -> Relax -> scheduled kernels -> artifact folder."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from ..errors import HetcompError
from ..frontend import load_model
from ..frontend.export_info import source_info
from ..frontend.weights import WEIGHT_DTYPES, pack_weights, param_specs
from .export import export_artifact
from .targets import target_dict

TARGETS = ("host",)


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """What to build: model (name or path), weight dtype, target and KV-cache capacity."""

    model: str = "smollm2"
    dtype: str = "float32"
    target: str = "host"
    max_context: int = 2048

    def __post_init__(self):
        if self.dtype not in WEIGHT_DTYPES:
            raise HetcompError(f"unsupported dtype {self.dtype!r} (use {' or '.join(WEIGHT_DTYPES)})")
        if self.target not in TARGETS:
            raise HetcompError(f"unsupported target {self.target!r} (supported: {', '.join(TARGETS)})")
        if self.max_context < 16:
            raise HetcompError("--max-context must be at least 16")


def _progress(step: int, total: int, what: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{step}/{total}] {what}", file=sys.stderr, flush=True)


def compile_model(opts: CompileOptions, out_dir: str, quiet: bool = False, weights=None) -> str:
    """Compile ``opts.model`` into the artifact folder ``out_dir``; returns its path.

    ``weights`` = ``(config, float32 weights, tokenizer spec, source)`` skips loading (tests).
    """
    from .._tvm import compiler
    from ..frontend.llama import build_module
    from ..frontend.tokenizer import TokenizerInfo
    from .build import build

    t0 = time.time()
    # Load (and so validate) the input before printing anything: bad input gets one line.
    cfg, w, spec, source = weights if weights is not None else load_model(opts.model,
                                                                          opts.max_context)
    tok = TokenizerInfo.from_spec(spec)
    _progress(1, 4, f"loaded {opts.model} ({sum(a.size for a in w.values()) / 1e6:.0f}M "
                    "parameters)", quiet)
    _progress(2, 4, f"building Relax module ({cfg.num_layers} layers, {opts.dtype})", quiet)
    mod = build_module(cfg, opts.dtype)
    _progress(3, 4, f"scheduling and compiling for {opts.target}", quiet)
    target = compiler().Target(target_dict(opts.target))
    ex = build(mod, target)
    _progress(4, 4, f"packing weights and writing {out_dir}", quiet)
    packed = pack_weights(cfg, w, opts.dtype)
    params = [(name, packed[name]) for name, _, _ in param_specs(cfg, opts.dtype)]
    manifest = {
        "model": opts.model if opts.model == "smollm2" else os.path.basename(opts.model),
        "source": source_info(source),
        "config": dataclasses.asdict(cfg),
        "dtype": opts.dtype,
        "target": opts.target,
        "target_spec": target_dict(opts.target),
        "units": ["cpu"],
        "functions": ["prefill", "verify", "commit"],
        "tokenizer": tok.to_json(),
        "widths": [1],
    }
    path = export_artifact(out_dir, ex, params, tok.tok.to_str(), manifest)
    if not quiet:
        print(f"compiled in {time.time() - t0:.1f}s -> {path}", file=sys.stderr)
    return path
