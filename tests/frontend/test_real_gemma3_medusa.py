"""Gemma 3 270M speculates with its packaged Medusa heads (the registry's default,
`hetcomp/data/gemma3-270m-medusa.npz`) and the output is token for token that of sequential
greedy decoding, inside the 512-key sliding window and past it.

One float16 compile at a small context with the one speculative width tested; skipped with
the install command when the model's parts are absent.
"""

import numpy as np
import pytest

from hetcomp.driver.calibrate import heldout_prompts
from hetcomp.frontend import models
from hetcomp.runtime import generate
from hetcomp.testing import packaged_heads_artifact

NAME = "gemma3-270m"
WIDTH = 4

pytestmark = pytest.mark.skipif(not models.installed(NAME),
                                reason=f"needs: {models.MODELS[NAME].install_command}")


@pytest.fixture(scope="module")
def gemma_medusa(tmp_path_factory):
    return packaged_heads_artifact(str(tmp_path_factory.mktemp("gemma-medusa") / "art"), NAME,
                                   WIDTH, max_context=640)


def test_gemma_speculation_equals_sequential_greedy(gemma_medusa):
    """On four of the heads' held-out prompts (raw text: the file has no chat template)."""
    art = gemma_medusa
    info = art.manifest["speculative"]["heads_info"]
    assert art.manifest["speculative"]["heads_file"]["name"] == "gemma3-270m-medusa.npz"
    accepted = []
    for prompt in heldout_prompts(info, 4):
        ids = art.tokenizer.encode(prompt)
        seq = generate(art, ids, 48, width=1)
        spec = generate(art, ids, 48, width=WIDTH)
        assert spec.ids == seq.ids, prompt
        accepted.append(spec.accepted_per_step)
    # The heads draft the model's own continuations: 1.42 tokens a step here, where heads
    # left untrained (zero weights: the LM head's own choice at every depth) accept 1.05.
    assert np.mean(accepted) > 1.25, accepted


def test_gemma_speculation_past_the_sliding_window(gemma_medusa):
    """A decode that crosses the 512-key window: the tree's rows see the window their
    position gives them (the local layers drop the keys the window has passed)."""
    art = gemma_medusa
    ids = art.tokenizer.encode(" ".join(["The history of the city goes back centuries."] * 55))
    assert 490 < len(ids) < 512, len(ids)
    seq = generate(art, ids, 40, width=1, stop_at_eos=False)
    spec = generate(art, ids, 40, width=WIDTH, stop_at_eos=False)
    assert spec.ids == seq.ids
    assert len(ids) + len(seq.ids) > 512
