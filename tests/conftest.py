"""Session fixtures. Test files mirror the packages (tests/passes/... for hetcomp/passes/...);
shared helpers live in :mod:`hetcomp.testing`."""

import pytest

from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.frontend.weights import random_weights
from hetcomp.runtime import load_artifact
from hetcomp.testing import TINY, byte_tokenizer_spec, compile_tiny


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return compile_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_weights():
    from hetcomp.frontend import load_model

    # Read once for the session (a GGUF's weights are otherwise dequantized on each access).
    cfg, w, spec, source = load_model("smollm2")
    return cfg, dict(w), spec, source


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, smollm2_weights):
    out = tmp_path_factory.mktemp("smollm2") / "art"
    compile_model(CompileOptions(model="smollm2"), str(out), quiet=True, weights=smollm2_weights)
    return str(out)


@pytest.fixture(scope="session")
def tiny_loaded():
    """``compile_model``'s ``weights=`` for a tiny random model (seed 11)."""
    return (TINY, random_weights(TINY, seed=11), byte_tokenizer_spec(TINY.vocab_size), __file__)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, tiny_loaded):
    """The unpartitioned tiny model, loaded: what partitioned builds are compared with."""
    out = tmp_path_factory.mktemp("ref") / "art"
    compile_model(CompileOptions(model="tiny"), str(out), quiet=True, weights=tiny_loaded)
    return load_artifact(str(out))
