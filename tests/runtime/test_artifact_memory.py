"""Loading an artifact keeps one copy of its weights: CPU parameters view the mapped file."""

import json
import os

import numpy as np

from hetcomp.runtime import generate, load_artifact
from hetcomp.testing import TINY, numpy_llama, run_cli


def test_cpu_weights_view_the_mapped_file(tiny_artifact):
    art = load_artifact(tiny_artifact[0])
    views = [np.shares_memory(np.from_dlpack(p), art._weights_file) for p in art.params]
    assert all(views), f"{views.count(False)} of {len(views)} parameters were copied"
    # and each holds its own weights: the numbers at its offset in the file
    by_name = dict(zip(art.manifest["functions"]["verify"], art.params, strict=True))
    for p in art.manifest["params"]:
        stored = np.fromfile(f"{tiny_artifact[0]}/params.bin", dtype=p["dtype"],
                             count=int(np.prod(p["shape"])), offset=p["offset"])
        np.testing.assert_array_equal(np.from_dlpack(by_name[p["name"]]).ravel(), stored,
                                      err_msg=p["name"])
    # and the model runs on them: the numpy model's greedy tokens
    prompt, weights = [5, 6, 7], tiny_artifact[1]
    assert generate(art, prompt, max_new_tokens=4, stop_at_eos=False).ids == \
        numpy_llama.greedy(TINY, weights, prompt, 4)


def test_inspect_and_generate_report_memory(tiny_artifact):
    rc, out, err = run_cli("inspect", tiny_artifact[0], "--json")
    assert rc == 0, err
    mem = json.loads(out)["memory"]
    m = json.loads(out)
    assert mem["weights"] == os.path.getsize(f"{tiny_artifact[0]}/params.bin")
    cfg = m["config"]
    assert mem["kv_cache"] == 2 * 4 * cfg["num_layers"] * cfg["num_kv_heads"] * \
        cfg["head_dim"] * cfg["max_context"]
    ws = m["workspace_bytes"]
    calls = (f"prefill_w{m['prefill_chunk']}", f"verify_w{m['default_width']}", "medusa")
    assert mem["workspace"] == sum(ws.get(f, 0) for f in calls) > 0
    rc, out, err = run_cli("generate", tiny_artifact[0], "--prompt-ids", "5,6", "--json",
                           "--max-new-tokens", 3)
    assert rc == 0, err
    # the process's peak: at least the weights it mapped, far below a leak
    assert mem["weights"] / 2**20 < json.loads(out)["peak_rss_mb"] < 4096


def test_workspace_is_what_memory_planning_leaves():
    """The manifest's workspace of a verify step lies between the bytes its outputs need
    (allocated every call) and the bytes of all its tensors without reuse."""
    import tvm

    from hetcomp.codegen.build import build, workspace_bytes
    from hetcomp.codegen.targets import make_target
    from hetcomp.frontend import llama

    w, e, v = 4, TINY.hidden_size, TINY.vocab_size
    mod = llama.build_module(TINY, static_widths=(w,))
    scheduled = []
    build(mod, make_target("host"), scheduled=scheduled)
    ws = workspace_bytes(scheduled[0], sizes={"w": 16})
    every = 0  # every call_tir result of verify_w4, as if nothing were reused

    def visit(x):
        nonlocal every
        if isinstance(x, tvm.relax.Call) and x.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            for t in getattr(x.ty, "fields", [x.ty]):
                every += int(np.prod([int(d) for d in t.shape])) * 4

    tvm.relax.analysis.post_order_visit(mod[f"verify_w{w}"].body, visit)
    outputs = 4 * (w * v + w * e + w)  # logits, hidden, greedy ids
    assert outputs <= ws[f"verify_w{w}"] < every
    assert "verify" in ws and "commit" in ws and ws["commit"] == 0
    assert workspace_bytes(scheduled[0], sizes={}).keys().isdisjoint({"verify", "prefill"})


def test_the_draft_workspace_is_counted(tmp_path):
    """The draft (``medusa``) runs every speculative step, so its workspace is in the manifest
    and in inspect's memory (it was left out: its tree's node count was a size nobody
    gave): between the bytes of its outputs and those of every tensor it makes."""
    from hetcomp.frontend.weights import random_weights
    from hetcomp.testing import byte_tokenizer_spec, compile_with_random_heads
    from hetcomp.testing.gguf_writer import write_gguf

    model = tmp_path / "tiny.gguf"
    write_gguf(model, TINY, random_weights(TINY, seed=5), byte_tokenizer_spec(TINY.vocab_size))
    art = compile_with_random_heads(tmp_path, str(model), TINY, (4, 16), heads=2,
                                    default_width=4)
    rc, out, err = run_cli("inspect", art, "--json")
    assert rc == 0, err
    info = json.loads(out)
    ws = info["workspace_bytes"]
    k, e, v, s = 2, TINY.hidden_size, TINY.vocab_size, 16  # heads, rows, columns, widest tree
    outputs = 4 * (k * v + k * 10 + s)  # logits, each head's top 10, the tree's tokens
    made = outputs + 4 * (e + 1 + 2 * k * e)  # the staged row and root, the heads' two layers
    assert outputs <= ws["medusa"] <= made
    assert info["memory"]["workspace"] == ws["prefill_w64"] + ws["verify_w4"] + ws["medusa"]


def test_peak_rss_is_the_process_own(tmp_path):
    """A process started from a large one reports its own peak, not its parent's:
    ``ru_maxrss`` survives ``exec`` (generate --json reported 8 GB from the test runner)."""
    import subprocess
    import sys

    parent = (
        "import subprocess, sys\n"
        "big = bytearray(1536 * 2**20)\n"
        "for i in range(0, len(big), 4096):\n"
        "    big[i] = 1\n"
        "print(subprocess.run([sys.executable, '-c', 'from hetcomp.runtime.unit_time import "
        "peak_rss_mb; print(peak_rss_mb())'], capture_output=True, text=True, "
        "check=True).stdout)\n")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                         check=True, timeout=120)
    assert 10 < float(out.stdout) < 1024, out.stdout
