"""Tutorial 3: profile the units, plan the width and the split, partition the model.

Run: ``.venv/bin/python tutorials/03_profile_plan_partition.py``. ``HETCOMP_FAST=1`` profiles only
a few shapes and partitions a tiny model.
"""

import json
import os
import tempfile

import numpy as np

import hetcomp
from hetcomp.driver.tuning import tune_command
from hetcomp.hardware import target_dict
from hetcomp.plan import HeteroPlan

FAST = os.environ.get("HETCOMP_FAST") == "1"
tmp = tempfile.mkdtemp()

# 1. ARCA: measure every op class of SmolLM2's shapes on this machine's units (alone and beside
#    a memory-streaming co-runner), fit a cost model per unit and op class, and plan W, the
#    tree and the split ratios for the best predicted tokens/s. Results: plan.json + plan.png,
#    and profile.png (each op class's ms per call against W, alone and co-running).
summary = tune_command("smollm2", ["cpu"], os.path.join(tmp, "tune"), quick=FAST)
with open(os.path.join(tmp, "tune", "plan.json")) as fh:
    plan = json.load(fh)
print(f"measured plan on this CPU: W={plan['width']}, tau={plan['tau']:.2f}, "
      f"{plan['tokens_per_s']:.0f} tokens/s predicted; profile drawn in "
      f"{summary['profile']['plot']}")
assert os.path.isfile(summary["profile"]["plot"])

# 2. The same planner on a board that is not here, from datasheet figures: an estimate,
#    labelled as such, never mixed with measurements.
est = tune_command("smollm2", ["orin-nx"], os.path.join(tmp, "orin"), quick=True)
with open(os.path.join(tmp, "orin", "plan.json")) as fh:
    orin = json.load(fh)
print(f"Jetson Orin NX ({orin['source']}): W={orin['width']}, split={orin['split']}")

# 3. Partition: every linear layer split by output columns, attention by affinity, placed on
#    two virtual devices. Here both are this CPU (llvm twice, as TVM's own multi-device tests
#    do), which checks the numerics; on a Jetson the second unit is the GPU.
from hetcomp.frontend.weights import random_weights  # noqa: E402
from hetcomp.testing import TINY, byte_tokenizer_spec  # noqa: E402

weights = (TINY, random_weights(TINY, seed=3), byte_tokenizer_spec(TINY.vocab_size), "tiny")
host = target_dict("host")
split = HeteroPlan(units=("cpu", "cpu:1"), targets=(host, host),
                   ratios=(("default", 0.5), ("lm_head", 0.25)),
                   dense_attention=1, sparse_attention=0)
hetcomp.compile_model(hetcomp.CompileOptions(model="tiny"), f"{tmp}/one", weights=weights)
hetcomp.compile_model(hetcomp.CompileOptions(model="tiny", plan=split), f"{tmp}/two",
                      weights=weights)
one, two = hetcomp.load_artifact(f"{tmp}/one"), hetcomp.load_artifact(f"{tmp}/two")
_, h1 = one.new_session().prefill([5, 6, 7, 8])
_, h2 = two.new_session().prefill([5, 6, 7, 8])
print("partitioned vs whole, max |diff| of hidden states:", float(np.abs(h1.numpy() -
                                                                          h2.numpy()).max()))
assert hetcomp.generate(one, [5, 6, 7], 12).ids == hetcomp.generate(two, [5, 6, 7], 12).ids
