"""Session fixtures. Test files mirror the packages (tests/passes/... for hetcomp/passes/...);
shared helpers live in :mod:`hetcomp.testing`."""

import pytest

from hetcomp.driver.compile import CompileOptions, compile_model
from hetcomp.testing import compile_tiny


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    return compile_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_weights():
    from hetcomp.frontend import load_model

    return load_model("smollm2")


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, smollm2_weights):
    out = tmp_path_factory.mktemp("smollm2") / "art"
    compile_model(CompileOptions(model="smollm2"), str(out), quiet=True, weights=smollm2_weights)
    return str(out)
