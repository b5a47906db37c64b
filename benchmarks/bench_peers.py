"""hetcomp against peers on the same model and prompts: llama.cpp and PyTorch eager.

``make bench-peers`` (optional, not in CI). Like with like: every decoder gets the same prompt
token ids (the first artifact's tokenizer, chat template applied), decodes ``--new-tokens``
greedy tokens with EOS ignored, 2 threads, and only decoding is timed (the prompt's prefill
and the first token it yields are not). Decoders are interleaved: every round runs each prompt
on every decoder in turn, so a slow phase of this shared machine lands on all of them alike.
Peers that are not installed are skipped and reported as such: llama.cpp through
``llama-cpp-python`` (the packaged Q4_1 GGUF and any ``--llama-gguf``), PyTorch eager through
transformers' GGUF loader (fp32). One table (JSON + markdown) is printed and written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def hetcomp_decoder(art, width: int, lookup: int):
    """``run(ids, n) -> (decoded tokens, decode seconds)`` for a loaded artifact."""
    from hetcomp.runtime import generate

    def run(ids, n):
        res = generate(art, ids, max_new_tokens=n, stop_at_eos=False, width=width,
                       lookup=lookup)
        return len(res.ids) - 1, res.decode_s

    return run


def llama_cpp_decode(llm, ids, n: int) -> tuple[int, float]:
    """llama.cpp (a ``llama_cpp.Llama``): prefill ``ids`` untimed, then ``n - 1`` greedy
    steps, timed one ``eval`` at a time -> (decoded tokens, decode seconds)."""
    llm.reset()
    llm.eval(ids)
    secs = 0.0
    for _ in range(n - 1):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        llm.eval([nxt])
        secs += time.perf_counter() - t0
    return n - 1, secs


def llama_cpp_decoder(gguf: str):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf, n_threads=2, n_threads_batch=2, n_ctx=2048, verbose=False)
    return lambda ids, n: llama_cpp_decode(llm, ids, n)


def torch_decoder(gguf: str):
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(2)
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32").eval()

    def run(ids, n):
        with torch.inference_mode():
            out = model(torch.tensor([ids]), use_cache=True)  # prefill, not timed
            secs = 0.0
            for _ in range(n - 1):
                nxt = out.logits[:, -1:].argmax(-1)
                t0 = time.perf_counter()
                out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
                secs += time.perf_counter() - t0
        return n - 1, secs

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, nargs="+",
                    help="hetcomp artifacts compiled with --heads (e.g. float32 and float16)")
    ap.add_argument("--width", type=int, nargs="+", default=[2],
                    help="speculative width per artifact (one value: all of them)")
    ap.add_argument("--lookup", type=int, default=None,
                    help="n-gram draft tokens (default: hetcomp's auto_lookup(width))")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "bench_peers.json"))
    ap.add_argument("--prompts", choices=("bench", "heldout"), default="bench",
                    help="every decoder's prompts: hetcomp bench's 3, or the 8 first held-out "
                         "prompts of the first artifact's heads")
    ap.add_argument("--model-gguf", help="the GGUF llama.cpp and PyTorch run as given "
                                         "(default: the packaged SmolLM2 Q4_1)")
    ap.add_argument("--llama-gguf", nargs="*", default=[],
                    help="more GGUFs for llama.cpp (e.g. F32/F16 from make_peer_ggufs.py)")
    ap.add_argument("--no-torch", action="store_true", help="leave PyTorch eager out")
    args = ap.parse_args()
    widths = args.width * len(args.artifact) if len(args.width) == 1 else args.width
    if len(widths) != len(args.artifact):
        ap.error("give one --width, or one per artifact")
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    from hetcomp.driver.benchmark import bench_prompts
    from hetcomp.frontend import default_gguf_path
    from hetcomp.runtime import load_artifact
    from hetcomp.runtime.generate import auto_lookup

    gguf = args.model_gguf or default_gguf_path()
    arts = [load_artifact(a) for a in args.artifact]
    tok = arts[0].tokenizer
    prompts = [tok.encode(p, chat=tok.chat_template is not None)
               for p in bench_prompts(arts[0].manifest, args.prompts)]
    decoders = {}
    for art, width in zip(arts, widths, strict=True):
        dtype = art.manifest["dtype"]
        lookup = auto_lookup(width) if args.lookup is None else args.lookup
        decoders[f"hetcomp sequential ({dtype})"] = hetcomp_decoder(art, 1, 0)
        decoders[f"hetcomp speculative ({dtype}, W={width})"] = hetcomp_decoder(
            art, width, lookup)
    for path in [gguf, *args.llama_gguf]:
        decoders[f"llama.cpp {os.path.basename(path)}"] = llama_cpp_decoder(path)
    if not args.no_torch:
        decoders["PyTorch eager fp32"] = torch_decoder(gguf)
    live = {k: run for k, run in decoders.items() if run is not None}
    for run in live.values():
        run(prompts[0][:16], 4)  # warm-up
    made = dict.fromkeys(live, 0)
    secs = dict.fromkeys(live, 0.0)
    for r in range(args.rounds):
        for i, ids in enumerate(prompts):
            for name, run in live.items():
                n, s = run(ids, args.new_tokens)
                made[name] += n
                secs[name] += s
            print(f"round {r + 1}/{args.rounds}: prompt {i + 1}/{len(prompts)} done",
                  file=sys.stderr, flush=True)
    rows = {k: (made[k] / secs[k] if k in live else None) for k in decoders}
    with open(args.out, "w") as fh:
        json.dump({"prompts": args.prompts, "new_tokens": args.new_tokens,
                   "rounds": args.rounds, "tokens_per_s": rows}, fh, indent=1)
    print(f"decode only, {args.new_tokens} tokens, EOS ignored, same ids, {len(prompts)} "
          f"prompts x {args.rounds} rounds, interleaved")
    print("| decoder | tokens/s |\n|---|---|")
    for name, tps in rows.items():
        print(f"| {name} | {'not installed' if tps is None else f'{tps:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
