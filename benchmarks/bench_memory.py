"""Peak resident memory of a deployment: hetcomp artifacts (runtime-only TVM) beside llama.cpp.

Each decoder runs in a fresh process under ``/usr/bin/time -f %M`` (peak RSS): hetcomp
``generate`` with ``TVM_USE_RUNTIME_LIB=1`` on each artifact, and llama.cpp through
``llama-cpp-python`` on each GGUF, both generating the same number of tokens from the same
prompt. The table puts each beside what it must hold (``inspect``'s weights + KV cache +
workspace for hetcomp; the GGUF's size for llama.cpp) and the issue's budget
``1.3 x (params + KV) + 150 MB``.

``python benchmarks/bench_memory.py --artifact A16 A32 --gguf F16.gguf F32.gguf``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

PROMPT = "What are three good habits for staying healthy?"
_LLAMA = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_threads=2, n_ctx=int(sys.argv[3]), verbose=False)
llm.create_chat_completion([{"role": "user", "content": sys.argv[2]}],
                           max_tokens=int(sys.argv[4]), temperature=0.0)
"""


def peak_rss_mb(cmd: list[str], env: dict | None = None) -> float:
    """Peak RSS of ``cmd`` in MiB (``/usr/bin/time`` reports KiB)."""
    out = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True,
                         env={**os.environ, **(env or {})}, check=True)
    return int(out.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", nargs="*", default=[])
    ap.add_argument("--gguf", nargs="*", default=[])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--out", default="build/memory.json")
    args = ap.parse_args()
    rows = []
    for a in args.artifact:
        info = json.loads(subprocess.run(
            [sys.executable, "-m", "hetcomp", "inspect", a, "--json"], capture_output=True,
            text=True, check=True).stdout)
        mem = info["memory"]
        rss = peak_rss_mb([sys.executable, "-m", "hetcomp", "generate", a, "--prompt", PROMPT,
                           "--chat", "--max-new-tokens", str(args.tokens)],
                          {"TVM_USE_RUNTIME_LIB": "1"})
        need = (mem["weights"] + mem["kv_cache"]) / 2**20
        rows.append({"decoder": f"hetcomp {os.path.basename(a.rstrip('/'))}",
                     "dtype": info.get("dtype"), "kv_dtype": info.get("kv_dtype", "float32"),
                     "weights_mb": mem["weights"] / 2**20, "kv_mb": mem["kv_cache"] / 2**20,
                     "workspace_mb": mem.get("workspace", 0) / 2**20, "peak_rss_mb": rss,
                     "budget_mb": 1.3 * need + 150})
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
        print("llama-cpp-python not installed: llama.cpp skipped")
    for g in args.gguf if have_llama else []:
        rss = peak_rss_mb([sys.executable, "-c", _LLAMA, g, PROMPT, str(args.context),
                           str(args.tokens)])
        rows.append({"decoder": f"llama.cpp {os.path.basename(g)}",
                     "weights_mb": os.path.getsize(g) / 2**20, "peak_rss_mb": rss})
    base = peak_rss_mb([sys.executable, "-c", "import numpy"])
    print(f"a Python process importing numpy: {base:.0f} MB")
    print("| decoder | weights MB | KV MB | workspace MB | peak RSS MB | budget MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['decoder']} | {r['weights_mb']:.0f} | {r.get('kv_mb', 0):.0f} | "
              f"{r.get('workspace_mb', 0):.1f} | {r['peak_rss_mb']:.0f} | "
              f"{r.get('budget_mb', 0):.0f} |")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"python_numpy_mb": base, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
