"""Tutorial 1: compile a model into an artifact and generate text with it.

Run: ``.venv/bin/python tutorials/01_compile_and_generate.py``. With ``HETCOMP_FAST=1`` (as the
test suite runs it) it uses a tiny random LLaMA instead of SmolLM2-135M.
"""

import os
import tempfile

import hetcomp
from hetcomp.frontend.config import LlamaConfig

FAST = os.environ.get("HETCOMP_FAST") == "1"
out = os.path.join(tempfile.mkdtemp(), "artifact")

# 1. Compile. `model` is "smollm2" (the packaged GGUF), a .gguf file or an HF folder. Compile
#    loads and dequantizes the weights, builds the Relax module (prefill / verify / commit),
#    schedules every kernel for this CPU and writes the artifact folder atomically.
if FAST:

    from hetcomp.frontend.weights import random_weights
    from hetcomp.testing import byte_tokenizer_spec

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, vocab_size=320, max_context=128)
    weights = (cfg, random_weights(cfg), byte_tokenizer_spec(cfg.vocab_size), "tiny")
    hetcomp.compile_model(hetcomp.CompileOptions(model="tiny"), out, weights=weights)
else:
    hetcomp.compile_model(hetcomp.CompileOptions(model="smollm2", dtype="float32"), out)

# 2. Load it. Loading needs only the TVM runtime: the artifact holds lib.so (all kernels and
#    the Relax VM program), params.bin (packed weights), tokenizer.json and manifest.json.
art = hetcomp.load_artifact(out)
print("functions:", list(art.manifest["functions"]))

# 3. Generate greedily. Each step is one `verify` call with a single tree node (W = 1) and a
#    `commit` of that node's K/V into the cache.
prompt = "What is the capital of France?"
chat = art.tokenizer.chat_template is not None
ids = art.tokenizer.encode(prompt, chat=chat)
res = hetcomp.generate(art, ids, max_new_tokens=16 if FAST else 48)
print(res.text)
print(f"{len(res.ids)} tokens, {res.decode_tokens_per_s:.1f} tokens/s")

# 4. The same session API the generator uses, step by step.
sess = art.new_session()
next_id, hidden = sess.prefill(ids)
greedy, hidden_states, logits = sess.verify([next_id], [sess.length], [[1]])
sess.commit([0])
print("first two tokens:", next_id, int(greedy[0]))
