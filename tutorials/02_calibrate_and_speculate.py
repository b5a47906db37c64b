"""Tutorial 2: Medusa heads, token trees and lossless speculative decoding.

Run: ``.venv/bin/python tutorials/02_calibrate_and_speculate.py`` (uses the heads committed in
``hetcomp/data``). ``HETCOMP_FAST=1`` calibrates heads for a tiny random model instead.
"""

import os
import tempfile

import numpy as np

import hetcomp
from hetcomp.speculative.medusa import MedusaHeads
from hetcomp.speculative.tree import build_tree

FAST = os.environ.get("HETCOMP_FAST") == "1"
tmp = tempfile.mkdtemp()
HEADS = os.path.join(os.path.dirname(hetcomp.__file__), "data", "smollm2-medusa.npz")

if FAST:
    from hetcomp.driver.calibrate import CalibrateOptions, calibrate
    from hetcomp.frontend.weights import random_weights
    from hetcomp.testing import TINY, byte_tokenizer_spec

    w = random_weights(TINY, seed=11)
    weights = (TINY, w, byte_tokenizer_spec(TINY.vocab_size), "tiny")
    hetcomp.compile_model(hetcomp.CompileOptions(model="tiny"), f"{tmp}/base", weights=weights)
    corpus = os.path.join(tmp, "prompts.txt")
    with open(corpus, "w") as fh:
        fh.write("\n".join(f"prompt {i}" for i in range(16)))
    # 1. Self-distillation: run the model on the corpus, train heads to predict its own
    #    greedy tokens 2, 3, ... positions ahead; statistics come from held-out prompts.
    heads = calibrate(hetcomp.load_artifact(f"{tmp}/base"), w["embed"],
                      CalibrateOptions(corpus=corpus, num_heads=3, new_tokens=32, epochs=4))
    heads.save(f"{tmp}/heads.npz")
    HEADS, model = f"{tmp}/heads.npz", "tiny"
else:
    weights, model = None, "smollm2"
    heads = MedusaHeads.load(HEADS)

# 2. Trees: for each width W, the tree maximising the expected accepted length tau(W) under the
#    held-out per-rank acceptance probabilities.
for width in (1, 2, 4, 8, 16):
    tree = build_tree(heads.rank_probs, width)
    print(f"W={width:2d} tau={tree.expected_accept_length:.2f} parents={tree.parents}")

# 3. Compile with the heads (they and the trees go into the artifact) and decode with a tree.
opts = hetcomp.CompileOptions(model=model, heads=HEADS, widths=(1, 4, 8))
hetcomp.compile_model(opts, f"{tmp}/spec", weights=weights)
art = hetcomp.load_artifact(f"{tmp}/spec")
ids = art.tokenizer.encode("Give me three tips for a good night's sleep.",
                           chat=art.tokenizer.chat_template is not None)
plain = hetcomp.generate(art, ids, max_new_tokens=24)
for width in (4, 8):
    spec = hetcomp.generate(art, ids, max_new_tokens=24, width=width)
    # Verification is greedy and exact: the output is token for token the sequential one.
    assert spec.ids == plain.ids
    print(f"W={width}: {spec.accepted_per_step:.2f} tokens per verify step, identical output")
print(np.round(heads.rank_probs[:, :3], 3))
