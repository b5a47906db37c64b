"""hetcomp against peers on the same model and prompts: llama.cpp and PyTorch eager.

``make bench-peers`` (optional, not in CI). Peers that are not installed are skipped and
reported as such: llama.cpp through ``llama-cpp-python`` (F32, F16, Q8_0 and Q4_1 GGUF), PyTorch
eager through transformers' GGUF loader (fp32). Every decoder runs 2 threads, greedy,
``--new-tokens`` tokens per prompt; one table (JSON + markdown) is printed and written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def bench_hetcomp(art_dir: str, prompts: list[str], new_tokens: int, width: int,
                  lookup: int) -> float:
    from hetcomp.driver.bench import bench_widths
    from hetcomp.runtime import load_artifact

    return bench_widths(load_artifact(art_dir), [width], new_tokens, lookup,
                         prompts)[0]["tokens_per_s"]


def bench_llama_cpp(gguf: str, prompts: list[str], new_tokens: int) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf, n_threads=2, n_ctx=2048, verbose=False)
    made = secs = 0.0
    for p in prompts:
        msgs = [{"role": "user", "content": p}]
        t = time.perf_counter()
        out = llm.create_chat_completion(msgs, max_tokens=new_tokens, temperature=0.0)
        secs += time.perf_counter() - t
        made += out["usage"]["completion_tokens"]
    return made / secs


def bench_torch(gguf: str, prompts: list[str], new_tokens: int) -> float | None:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return None
    torch.set_num_threads(2)
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32").eval()
    made = secs = 0.0
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}],
                                      add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False)
            secs += time.perf_counter() - t
        made += out.shape[1] - ids.shape[1]
    return made / secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, nargs="+",
                    help="hetcomp artifacts compiled with --heads (e.g. float32 and float16)")
    ap.add_argument("--width", type=int, nargs="+", default=[2],
                    help="speculative width per artifact (one value: all of them)")
    ap.add_argument("--lookup", type=int, default=None,
                    help="n-gram draft tokens (default: hetcomp's auto_lookup(width))")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_peers.json"))
    ap.add_argument("--prompts", choices=("bench", "heldout"), default="bench",
                    help="every decoder's prompts: hetcomp bench's 3, or the 8 first held-out "
                         "prompts of the first artifact's heads")
    ap.add_argument("--llama-gguf", nargs="*", default=[],
                    help="more GGUFs for llama.cpp (e.g. F32/F16 from make_peer_ggufs.py)")
    args = ap.parse_args()
    widths = args.width * len(args.artifact) if len(args.width) == 1 else args.width
    if len(widths) != len(args.artifact):
        ap.error("give one --width, or one per artifact")
    from hetcomp.driver.bench import bench_prompts
    from hetcomp.frontend import default_gguf_path
    from hetcomp.runtime.generate import auto_lookup

    os.environ.setdefault("TVM_NUM_THREADS", "2")
    gguf = default_gguf_path()
    manifests = []
    for art in args.artifact:
        with open(os.path.join(art, "manifest.json")) as fh:
            manifests.append(json.load(fh))
    prompts = bench_prompts(manifests[0], args.prompts)  # the same for every decoder
    rows = {}
    for art, manifest, width in zip(args.artifact, manifests, widths, strict=True):
        dtype = manifest["dtype"]
        lookup = auto_lookup(width) if args.lookup is None else args.lookup
        rows[f"hetcomp sequential ({dtype})"] = bench_hetcomp(art, prompts, args.new_tokens, 1, 0)
        rows[f"hetcomp speculative ({dtype}, W={width})"] = bench_hetcomp(
            art, prompts, args.new_tokens, width, lookup)
    rows["llama.cpp Q4_1 (packaged GGUF)"] = bench_llama_cpp(gguf, prompts, args.new_tokens)
    for extra in args.llama_gguf:
        rows[f"llama.cpp {os.path.basename(extra)}"] = bench_llama_cpp(extra, prompts,
                                                                       args.new_tokens)
    rows["PyTorch eager fp32"] = bench_torch(gguf, prompts, args.new_tokens)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print("| decoder | tokens/s |\n|---|---|")
    for name, tps in rows.items():
        print(f"| {name} | {'not installed' if tps is None else f'{tps:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
