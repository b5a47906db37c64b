"""Processing units as data: what runs a kernel, where, and what identifies its profile.

A :class:`Unit` is a unit present on this machine (``cpu``, ``cuda``): its TVM target, its
device and a :class:`Fingerprint` that keys its profile in the database. A profile is reused
until the fingerprint changes: another CPU or GPU, another driver, another TVM, or an edit to
hetcomp's kernel, schedule or measurement source.

A :class:`DeviceSpec` describes a unit that is *not* present (a Jetson Orin NX GPU, an NPU)
by its datasheet figures. Costs derived from a spec are always labelled
``source="spec-estimate"`` and never stored next to or mixed with measurements
(``source="measured"``).

This module imports TVM only inside :func:`detect_unit` (for the host target), so the
planner and the cost models can use :class:`DeviceSpec` without TVM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess

from ..errors import HetcompError

MEASURED = "measured"
SPEC_ESTIMATE = "spec-estimate"

# Sources whose edit invalidates a profile: the kernels, their schedules and the harness.
_KERNEL_SOURCES = (
    "frontend/ops.py",
    "frontend/script_ops.py",
    "schedules",
    "codegen/build.py",
    "codegen/targets.py",
    "profile/measure.py",
)


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Datasheet figures of a processing unit, for roofline estimates.

    Parameters
    ----------
    name : str
        Unit name used in plans (``orin-nx-gpu``).
    kind : str
        ``cpu``, ``gpu`` or ``npu``.
    peak_gflops : float
        Peak fp32 GFLOP/s.
    mem_bw_gbs : float
        Achievable DRAM bandwidth in GB/s (what a streaming kernel reaches).
    launch_s : float
        Fixed cost of one kernel call (launch or thread-pool fork/join), seconds.
    shared_memory : bool
        True when the unit shares DRAM with the host CPU (zero-copy concat, shared bandwidth).
    sync_s : float
        One host synchronisation with this unit (event wait), seconds.
    link_gbs : float
        Host link bandwidth for copies when memory is not shared (0 when shared).
    theoretical_bw_gbs : float
        The datasheet DRAM bandwidth (for reference; estimates use ``mem_bw_gbs``).
    notes : str
        Where the figures come from.
    """

    name: str
    kind: str
    peak_gflops: float
    mem_bw_gbs: float
    launch_s: float = 5e-6
    shared_memory: bool = True
    sync_s: float = 0.0
    link_gbs: float = 0.0
    theoretical_bw_gbs: float = 0.0
    notes: str = ""

    def __post_init__(self):
        if self.peak_gflops <= 0 or self.mem_bw_gbs <= 0:
            raise ValueError(f"{self.name}: peak_gflops and mem_bw_gbs must be positive")
        if not self.shared_memory and self.link_gbs <= 0:
            raise ValueError(f"{self.name}: a unit without shared memory needs link_gbs")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# Approximate public figures for a Jetson Orin NX 16GB-class board (NVIDIA Jetson Orin NX
# series datasheet and module specifications): 8-core Arm Cortex-A78AE at up to 2 GHz;
# Ampere GPU with 1024 CUDA cores at up to 918 MHz (1024 x 2 FLOP x 0.918 GHz = 1.88 TFLOP/s
# fp32); 128-bit LPDDR5, 102.4 GB/s theoretical, shared by CPU and GPU, of which about 60-70
# GB/s is achievable by a streaming kernel. The CPU's ~100 GFLOP/s is an achievable fp32 NEON
# figure (the 8 x 2 x 128-bit FMA peak is ~256). Launch/sync costs are typical CUDA-on-Jetson
# magnitudes, not measurements. All of these are estimates.
_ORIN_NOTE = ("approximate public figures (NVIDIA Jetson Orin NX series datasheet); "
              "not measured")
ORIN_NX_CPU = DeviceSpec(
    name="orin-nx-cpu", kind="cpu", peak_gflops=100.0, mem_bw_gbs=60.0, launch_s=5e-6,
    shared_memory=True, theoretical_bw_gbs=102.4, notes="8x Cortex-A78AE; " + _ORIN_NOTE)
ORIN_NX_GPU = DeviceSpec(
    name="orin-nx-gpu", kind="gpu", peak_gflops=1880.0, mem_bw_gbs=65.0, launch_s=10e-6,
    shared_memory=True, sync_s=20e-6, theoretical_bw_gbs=102.4,
    notes="Ampere, 1024 CUDA cores at 918 MHz; " + _ORIN_NOTE)

SPECS: dict[str, DeviceSpec] = {s.name: s for s in (ORIN_NX_CPU, ORIN_NX_GPU)}
SPEC_BOARDS: dict[str, tuple[str, ...]] = {"orin-nx": ("orin-nx-cpu", "orin-nx-gpu")}


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
    """A processing unit present on this machine."""

    name: str
    target: dict = dataclasses.field(hash=False)
    device: str  # "cpu:0", "cuda:0"
    fingerprint: Fingerprint

    def to_json(self) -> dict:
        return {"name": self.name, "target": self.target, "device": self.device,
                "fingerprint": self.fingerprint.to_json()}


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
    import platform

    return platform.processor() or platform.machine()


def gpu_info() -> str:
    """``"name / driver"`` of the first NVIDIA GPU, or ``""`` when none is visible."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ""
    try:
        out = subprocess.run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    first = out.strip().splitlines()[0] if out.strip() else ""
    return " / ".join(p.strip() for p in first.split(",")) if first else ""


def tvm_version() -> str:
    """The installed TVM version, read from package metadata (does not import TVM)."""
    from importlib import metadata

    for dist in ("apache-tvm", "tvm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"


def kernel_source_hash(root: str | None = None) -> str:
    """SHA-256 (16 hex digits) over hetcomp's kernel, schedule and measurement sources."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = []
    for rel in _KERNEL_SOURCES:
        path = os.path.join(root, rel)
        if os.path.isdir(path):
            files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".py"))
        elif os.path.isfile(path):
            files.append(path)
    h = hashlib.sha256()
    for path in files:
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:16]


def detect_unit(name: str, target: dict | None = None) -> Unit:
    """The present unit ``name`` (``cpu`` or ``cuda``) with its fingerprint.

    ``target``: the target its kernels were compiled for, when not this machine's default
    (a profile kit built elsewhere).

    Raises
    ------
    HetcompError
        If the unit is not present on this machine or the name is unknown (spec-only units
        such as ``orin-nx-gpu`` are described by :data:`SPECS`, not detected).
    """
    built_for = target
    if name == "cpu":
        from ..codegen.targets import target_dict

        target, device, gpu = target_dict("host"), "cpu:0", ""
    elif name == "cuda":
        gpu = gpu_info()
        if not gpu:
            raise HetcompError("unit 'cuda' is not present on this machine (no nvidia-smi GPU)")
        target, device = {"kind": "cuda", "arch": "sm_90"}, "cuda:0"
    elif name in SPECS:
        raise HetcompError(f"unit {name!r} is a spec-only unit: it can be estimated, not measured")
    else:
        raise HetcompError(f"unknown unit {name!r} (present units: cpu, cuda; spec units: "
                           f"{', '.join(SPECS)})")
    target = dict(built_for) if built_for is not None else target
    fp = Fingerprint(unit=name, cpu_model=cpu_model(), cores=os.cpu_count() or 1,
                     threads=int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1)), gpu=gpu,
                     tvm_version=tvm_version(), target=json.dumps(target, sort_keys=True),
                     kernel_hash=kernel_source_hash())
    return Unit(name=name, target=target, device=device, fingerprint=fp)
