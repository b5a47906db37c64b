"""Qwen2.5-Coder-0.5B-Instruct speculates with its packaged Medusa heads (the registry's
default, `hetcomp/data/qwen2.5-coder-0.5b-medusa.npz`) and the output is token for token that
of sequential greedy decoding.

One float16 compile at a small context with the one speculative width tested; skipped with
the install command when the model's parts are absent.
"""

import numpy as np
import pytest

from hetcomp.frontend import models
from hetcomp.runtime import generate
from hetcomp.testing import packaged_heads_artifact

NAME = "qwen2.5-coder-0.5b"
WIDTH = 4
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Complete the following Python function.\n\n```python\ndef is_palindrome(s: str) -> bool:"
    '\n    """Return True if s reads the same forwards and backwards, ignoring case."""\n```',
    "What are three good habits for staying healthy?",
]

pytestmark = pytest.mark.skipif(not models.installed(NAME),
                                reason=f"needs: {models.MODELS[NAME].install_command}")


@pytest.fixture(scope="module")
def qwen_medusa(tmp_path_factory):
    return packaged_heads_artifact(str(tmp_path_factory.mktemp("qwen-medusa") / "art"), NAME,
                                   WIDTH, max_context=512)


def test_qwen_speculation_equals_sequential_greedy(qwen_medusa):
    art = qwen_medusa
    assert art.manifest["speculative"]["heads_file"]["name"] == "qwen2.5-coder-0.5b-medusa.npz"
    accepted = []
    for prompt in PROMPTS:
        ids = art.tokenizer.encode(prompt, chat=True)
        seq = generate(art, ids, 48, width=1)
        spec = generate(art, ids, 48, width=WIDTH)
        assert spec.ids == seq.ids, prompt
        accepted.append(spec.accepted_per_step)
    # The heads draft the model's own continuations: a step accepts more than its root.
    assert np.mean(accepted) > 1.3, accepted
