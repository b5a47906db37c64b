"""hetcomp bench reports llama-bench's pp512 and tg128 beside its decode figures."""

import dataclasses
import json

from hetcomp.driver.bench import llama_bench
from hetcomp.runtime import load_artifact
from hetcomp.testing import TINY, compile_tiny, run_cli


def test_bench_reports_pp512_and_tg128(tmp_path_factory):
    path, _ = compile_tiny(tmp_path_factory, dataclasses.replace(TINY, max_context=640))
    rc, out, err = run_cli("bench", path, "--runs", 1, "--new-tokens", 4, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["pp512"] > 0 and rep["tg128"] > 0 and rep["decode_tokens_per_s"] > 0
    # A context shorter than the prompt leaves pp out rather than failing.
    assert set(llama_bench(load_artifact(path), 1, prompt=700, gen=8)) == {"tg8"}
