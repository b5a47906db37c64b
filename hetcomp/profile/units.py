"""Processing units as data: what runs a kernel, where, and what identifies its profile.

A :class:`Unit` is a unit present on this machine (``cpu``, ``cuda``): its TVM target, its
device and a :class:`Fingerprint` that keys its profile in the database. A profile is reused
until the fingerprint changes: another CPU or GPU, another driver, another TVM, or an edit to
hetcomp's kernel, schedule or measurement source. Units that are not present are described
by their datasheets (:mod:`hetcomp.hardware`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata

from ..errors import HetcompError
from ..hardware import DEFAULT_CUDA_ARCH, SPECS, cpu_threads, target_dict

# Sources whose edit invalidates a profile: the kernels, their schedules and the harness,
# and every hetcomp module they import (the packing block, the fused widths, the features).
_KERNEL_SOURCES = (
    "kernels",
    "schedules",
    "passes/pipeline.py",
    "codegen/build.py",
    "hardware.py",
    "profile/measure.py",
)


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a profile depends on; :attr:`digest` keys the profile database."""

    unit: str
    cpu_model: str
    cores: int
    threads: int  # TVM_NUM_THREADS (hetcomp._tvm defaults it to every core)
    gpu: str  # "name / driver", "" when the unit is not a GPU
    tvm_version: str
    target: str  # the target dict as sorted JSON
    kernel_hash: str

    @property
    def digest(self) -> str:
        body = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "digest": self.digest}


@dataclasses.dataclass(frozen=True)
class Unit:
    """A processing unit present on this machine.

    ``shared_memory``: it works in the host's DRAM (a CPU; an integrated GPU such as a
    Jetson's), so its co-run profile is contention and a crossing is a copy within DRAM,
    not a transfer over a link.
    """

    name: str
    target: dict = dataclasses.field(hash=False)
    device: str  # "cpu:0", "cuda:0"
    fingerprint: Fingerprint
    shared_memory: bool = True

    def to_json(self) -> dict:
        return {"name": self.name, "target": self.target, "device": self.device,
                "shared_memory": self.shared_memory, "fingerprint": self.fingerprint.to_json()}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _smi(fields: str) -> list[str]:
    """``fields`` of the first NVIDIA GPU as nvidia-smi reports them; [] when none is
    visible."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, f"--query-gpu={fields}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    first = out.strip().splitlines()[0] if out.strip() else ""
    return [p.strip() for p in first.split(",")] if first else []


def gpu_info() -> str:
    """``"name / driver"`` of the first NVIDIA GPU, or ``""`` when none is visible."""
    return " / ".join(_smi("name,driver_version"))


def gpu_arch() -> str:
    """``sm_NN`` of the first NVIDIA GPU (its compute capability: ``sm_87`` on a Jetson
    Orin, ``sm_90`` on an H100), or ``""`` when none is visible or it does not say."""
    cap = _smi("compute_cap")
    major, dot, minor = (cap[0] if cap else "").partition(".")
    return f"sm_{major}{minor}" if dot and major.isdigit() and minor.isdigit() else ""


_CU_INTEGRATED = 18  # CUdevice_attribute CU_DEVICE_ATTRIBUTE_INTEGRATED (cuda.h)


def gpu_integrated() -> bool | None:
    """Whether the first CUDA GPU is integrated, sharing the host's DRAM (a Jetson's; the CUDA
    driver's ``CU_DEVICE_ATTRIBUTE_INTEGRATED``); None when no CUDA driver answers. Asked of
    the driver (``libcuda``, present wherever a GPU is) because ``nvidia-smi`` does not say."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, value = ctypes.c_int(), ctypes.c_int()
    if (cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0)
            or cuda.cuDeviceGetAttribute(ctypes.byref(value), _CU_INTEGRATED, dev)):
        return None
    return bool(value.value)


def tvm_version() -> str:
    """The installed TVM version, read from package metadata (does not import TVM)."""
    for dist in ("apache-tvm", "tvm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def kernel_source_hash(root: str | None = None) -> str:
    """SHA-256 (16 hex digits) over hetcomp's kernel, schedule and measurement sources and
    the hetcomp modules they import, transitively (``root``: the package folder)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    todo = []
    for rel in _KERNEL_SOURCES:
        path = os.path.join(root, rel)
        if os.path.isdir(path):
            todo += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".py"))
        elif os.path.isfile(path):
            todo.append(path)
    files: set[str] = set()
    while todo:
        path = todo.pop()
        if path not in files:
            files.add(path)
            todo += _imported_sources(path, root)
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def _imported_sources(path: str, root: str) -> list[str]:
    """The files of the package under ``root`` that ``path`` imports relatively."""
    import ast

    with open(path, "rb") as fh:
        tree = ast.parse(fh.read(), path)
    package = os.path.dirname(path)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = package
        for _ in range(node.level - 1):
            base = os.path.dirname(base)
        if not os.path.abspath(base).startswith(os.path.abspath(root)):
            continue
        names = [node.module] if node.module else [a.name for a in node.names]
        for name in names:
            target = os.path.join(base, *name.split("."))
            for cand in (target + ".py", os.path.join(target, "__init__.py")):
                if os.path.isfile(cand):
                    out.append(cand)
                    break
    return out


def detect_unit(name: str, target: dict | None = None, cuda_arch: str | None = None) -> Unit:
    """The present unit ``name`` (``cpu`` or ``cuda``) with its fingerprint.

    ``target``: the target its kernels were compiled for, when not this machine's default
    (a profile kit built elsewhere). ``cuda_arch``: the architecture a cuda unit's kernels
    are compiled for (default: the GPU's own, else sm_90).

    Raises
    ------
    HetcompError
        If the unit is not present on this machine or the name is unknown (spec-only units
        such as ``orin-nx-gpu`` are described by :data:`SPECS`, not detected).
    """
    built_for, shared = target, True
    if name == "cpu":
        target, device, gpu = target_dict("host"), "cpu:0", ""
    elif name == "cuda":
        gpu = gpu_info()
        if not gpu:
            raise HetcompError("unit 'cuda' is not present on this machine (no nvidia-smi GPU)")
        target = {"kind": "cuda", "arch": cuda_arch or gpu_arch() or DEFAULT_CUDA_ARCH}
        device, shared = "cuda:0", bool(gpu_integrated())
    elif name in SPECS:
        raise HetcompError(f"unit {name!r} is a spec-only unit: it can be estimated, not measured")
    else:
        raise HetcompError(f"unknown unit {name!r} (present units: cpu, cuda; spec units: "
                           f"{', '.join(SPECS)})")
    target = dict(built_for) if built_for is not None else target
    fp = Fingerprint(unit=name, cpu_model=cpu_model(), cores=os.cpu_count() or 1,
                     threads=cpu_threads(), gpu=gpu,
                     tvm_version=tvm_version(), target=json.dumps(target, sort_keys=True),
                     kernel_hash=kernel_source_hash())
    return Unit(name=name, target=target, device=device, fingerprint=fp, shared_memory=shared)
