"""Session fixtures. Test files mirror the packages (tests/passes/... for hetcomp/passes/...);
shared helpers live in :mod:`hetcomp.testing`."""

import fcntl
import os
import warnings

import pytest

from hetcomp.cli import main
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


def _made_once(tmp_path_factory, name: str, make):
    """The folder ``name`` that ``make(path)`` writes, made once for the whole run: each
    pytest-xdist worker runs the session fixtures it needs, so two workers would both compile
    a real model (~30 s of a CI core each); the first one to ask makes it while the other
    waits, under a lock in the run's temporary folder, which the workers share. Tests only
    read it (as they do any session fixture's)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # (pytest-N/, the run's; a worker's own is pytest-N/popen-gwK)
    out = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes, or the worker dies)
        if not (root / f"{name}.made").is_file():  # (a worker that failed made nothing)
            make(out)
            (root / f"{name}.made").touch()
    return out


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, request):
    def make(out):
        compile_model(CompileOptions(model="smollm2"), str(out), quiet=True,
                      weights=request.getfixturevalue("smollm2_weights"))

    return str(_made_once(tmp_path_factory, "smollm2-art", make))


@pytest.fixture(scope="session")
def smollm2_medusa_artifact(tmp_path_factory):
    """``hetcomp compile --model smollm2 --max-context 512``: the packaged Medusa heads and
    every width, as the command decides without being told (run in-process, ``main``).
    tests/driver/test_compile_defaults.py checks those decisions; test_real_model.py
    speculates with it."""

    def make(out):
        assert main(["compile", "--model", "smollm2", "--max-context", "512", "--quiet",
                     "-o", str(out)]) == 0

    return _made_once(tmp_path_factory, "smollm2-medusa", make)


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


@pytest.fixture
def cli(capfd):
    """``hetcomp ARGS`` run in this process as ``python -m hetcomp`` runs it (``main``, and
    argparse's own exits): ``(exit code, stdout, stderr)``, captured at the file descriptors
    (TVM's C++ output too), with the warnings Python's default filters would print appended to
    stderr. It saves a process start and TVM's import (~10 s on CI) per call; tests of what
    only a fresh process shows (a runtime-only command, the real exit status) use
    :func:`hetcomp.testing.run_cli`."""

    def run(*args):
        capfd.readouterr()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning,
                             ResourceWarning):
                warnings.filterwarnings("ignore", category=category)
            try:
                rc = main([str(a) for a in args])
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else int(e.code is not None)
        out, err = capfd.readouterr()
        err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno)
                       for w in caught)
        return rc, out, err

    return run
