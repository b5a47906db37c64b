"""Processing units as data: datasheet figures, labels of where a cost comes from, and targets.

A :class:`DeviceSpec` describes a unit that is *not* present (a Jetson Orin NX GPU, an NPU)
by its datasheet figures. Costs derived from a spec are always labelled
``source="spec-estimate"`` and never stored next to or mixed with measurements
(``source="measured"``). :func:`target_dict` names the compilation target of each unit kind
(TVM 0.27 takes targets as dicts; target strings are rejected).

Ground floor: imports no TVM (the host CPU's LLVM name is asked of ``tvm_ffi`` on demand), so
the planner and the cost models read it without a compiler.
"""

from __future__ import annotations

import dataclasses
import re

from .errors import HetcompError

MEASURED = "measured"
SPEC_ESTIMATE = "spec-estimate"


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
    tensor_gflops : float
        Peak dense float16 GFLOP/s of its tensor cores with float32 accumulators (0: none);
        what the linears of 16-64 rows of a cuda build run on (:class:`~hetcomp.cost.
        roofline.RooflineCost`'s ``tensor_products``).
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
    tensor_gflops: float = 0.0
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
# Its 32 tensor cores: AGX Orin's GPU figure (170 sparse INT8 TOPS, 2048 cores at 1.3 GHz;
# dense float16 a quarter of it) scaled to 1024 cores at 918 MHz, about 15 TFLOP/s.
ORIN_NX_GPU = DeviceSpec(
    name="orin-nx-gpu", kind="gpu", peak_gflops=1880.0, mem_bw_gbs=65.0, launch_s=10e-6,
    shared_memory=True, sync_s=20e-6, theoretical_bw_gbs=102.4, tensor_gflops=15000.0,
    notes="Ampere, 1024 CUDA cores at 918 MHz; " + _ORIN_NOTE)

# Approximate public figures for the H100/H200 class (sm_90; NVIDIA H100 Tensor Core GPU
# datasheet, SXM5): 3.35 TB/s HBM3 (the H200's 4.8 TB/s HBM3e is taken at the H100's, the
# lower), of which a streaming kernel reaches about 80%; 67 TFLOP/s fp32 on CUDA cores (our
# kernels accumulate in fp32) and 989 TFLOP/s dense float16 on tensor cores, where the
# linears of 16-64 rows run (gpu.TensorCoreLinear, gpu.QuantTensorCoreLinear); PCIe Gen5
# x16 to the host. The launch
# cost is that of a kernel replayed in a CUDA graph (the cuda build captures its steps),
# the sync an event wait: typical magnitudes, not measurements. All of these are estimates.
HOPPER_GPU = DeviceSpec(
    name="hopper-gpu", kind="gpu", peak_gflops=60000.0, mem_bw_gbs=2700.0, launch_s=2e-6,
    shared_memory=False, sync_s=10e-6, link_gbs=25.0, theoretical_bw_gbs=3350.0,
    tensor_gflops=989000.0,
    notes="H100/H200 class (sm_90); approximate public figures (NVIDIA H100 datasheet); "
          "not measured")

SPECS: dict[str, DeviceSpec] = {s.name: s for s in (ORIN_NX_CPU, ORIN_NX_GPU, HOPPER_GPU)}
#: The datasheet spec a `--target cuda` build is planned with, by `--cuda-arch`'s base
#: architecture (none for others: their default width is 1 unless `--width` says otherwise).
CUDA_ARCH_SPECS: dict[str, str] = {"sm_87": "orin-nx-gpu", "sm_90": "hopper-gpu"}
SPEC_BOARDS: dict[str, tuple[str, ...]] = {"orin-nx": ("orin-nx-cpu", "orin-nx-gpu")}
# What an artifact for a spec board is compiled for: its CPU's named target, its GPU's arch.
SPEC_BOARD_TARGETS: dict[str, tuple[str, str]] = {"orin-nx": ("aarch64", "sm_87")}



def host_cpu_name() -> str:
    """LLVM's name for this machine's CPU (``-mcpu``), so vector ISA extensions are used."""
    import tvm_ffi  # lazy: only a host target needs it, and it loads the TVM runtime

    f = tvm_ffi.get_global_func("tvm.codegen.llvm.GetHostCPUName", allow_missing=True)
    return str(f()) if f is not None else "generic"


# The GPU architecture of `--target cuda` and of GPU units without an explicit one: the
# H100/H200 class this project has measured on. `--cuda-arch` overrides it.
DEFAULT_CUDA_ARCH = "sm_90"


def cpu_threads() -> int:
    """The CPU threads TVM's kernels run on: ``TVM_NUM_THREADS`` (:mod:`hetcomp._tvm` sets
    it to every core where it is unset or empty); one line of error for a value that is no
    positive integer."""
    import os

    value = os.environ.get("TVM_NUM_THREADS", "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise HetcompError(f"TVM_NUM_THREADS must be a positive integer, not {value!r}")
    return int(value)


def check_cuda_arch(arch: str) -> str:
    """``arch`` when it names an NVIDIA GPU architecture as TVM and nvcc take it (``sm_87``,
    ``sm_90a``); else one line of error, before any work (TVM's own check comes after the
    model is built, as a traceback)."""
    m = re.fullmatch(r"sm_(\d{2,3})[af]?", arch)
    if not m:
        raise HetcompError(f"--cuda-arch {arch!r} is not an NVIDIA GPU architecture (sm_87: "
                           "Jetson Orin, sm_90: H100/H200)")
    if int(m.group(1)) < 50:  # nvcc has not built for older GPUs since CUDA 11
        raise HetcompError(f"--cuda-arch {arch!r}: nvcc builds for sm_50 and later (sm_87: "
                           "Jetson Orin, sm_90: H100/H200)")
    return arch


def base_cuda_arch(arch: str) -> str:
    """The base architecture of an architecture-specific (``sm_90a``) or family (``sm_100f``)
    name, ``sm_90``: the GPU whose datasheet and compute capability the build is planned and
    scheduled for (nvcc still gets ``arch`` as given)."""
    m = re.fullmatch(r"(sm_\d{2,3})[af]?", arch)
    return m.group(1) if m else arch


def target_dict(name: str, cuda_arch: str = DEFAULT_CUDA_ARCH) -> dict:
    """The TVM target (as a dict) of a named target."""
    if name == "host":
        return {"kind": "llvm", "mcpu": host_cpu_name()}
    if name == "aarch64":
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    if name == "aarch64-dotprod":  # Armv8.2's int8 dot products: Cortex-A75 on, Orin, Pi 5
        return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}
    if name == "x86-64":
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    if name == "x86-64-v3":  # any x86 CPU since 2013 (AVX2, FMA): artifacts for other hosts
        return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
    if name == "cuda":  # the whole model on an NVIDIA GPU, driven by a portable host
        return {"kind": "cuda", "arch": cuda_arch, "host": target_dict("x86-64-v3")}
    raise HetcompError(f"unknown target {name!r} (known: {', '.join(TARGET_NAMES)})")


TARGET_NAMES = ("host", "aarch64", "x86-64", "x86-64-v3", "cuda", "aarch64-dotprod")
#: What `hetcomp compile --target` takes.
COMPILE_TARGETS = ("host", "aarch64", "x86-64-v3", "cuda", "aarch64-dotprod")


def host_part(spec: dict) -> dict:
    """The LLVM target that runs a target's host code (the target itself for CPUs)."""
    return dict(spec["host"]) if "host" in spec else dict(spec)


# The instruction-set extensions a CPU artifact can need, by LLVM's feature name, with the
# name Linux gives each in /proc/cpuinfo (x86: the "flags" line; aarch64: "Features"). An
# artifact records those its target enables (`-mcpu=skylake-avx512` enables avx512f, ...);
# the loader refuses, in one line, to run one on a CPU that lacks any: the code would die
# with SIGILL at its first such instruction.
CPU_FEATURE_FLAGS: dict[str, dict[str, str]] = {
    "x86_64": {
        "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx",
        "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
        "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512cd": "avx512cd",
        "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni",
        "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
        "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2",
        "avx512ifma": "avx512ifma", "avx512bitalg": "avx512_bitalg",
        "avx512vpopcntdq": "avx512_vpopcntdq", "avxvnni": "avx_vnni",
        "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
    },
    "aarch64": {
        "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "i8mm": "i8mm",
        "bf16": "bf16", "sve": "sve", "sve2": "sve2", "sme": "sme",
    },
}


def triple_arch(triple: str) -> str:
    """The architecture of an LLVM triple, by the name ``platform.machine()`` gives it."""
    arch = triple.split("-")[0]
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def checkable_cpu_features(llvm_features, arch: str) -> list[str]:
    """Of a target's LLVM features, those :data:`CPU_FEATURE_FLAGS` knows for ``arch``
    (sorted): what an artifact records, and what its loader checks."""
    known = CPU_FEATURE_FLAGS.get(arch, {})
    return sorted(f for f in llvm_features if f in known)


def machine_cpu_flags(cpuinfo: str = "/proc/cpuinfo", arch: str | None = None
                      ) -> set[str] | None:
    """This CPU's feature flags as Linux lists them, or None where unknown (another OS, or
    no line of ``arch``'s kind: qemu-user shows the host's /proc/cpuinfo to the guest)."""
    import platform

    arch = arch or platform.machine()
    key = {"x86_64": "flags", "aarch64": "Features"}.get(arch)
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return set(value.split())
    except OSError:
        pass
    return None


def missing_cpu_features(required, arch: str, flags: set[str] | None) -> list[str]:
    """The features in ``required`` (LLVM names) that a CPU with ``flags`` lacks; none
    when its flags are unknown."""
    if flags is None:
        return []
    names = CPU_FEATURE_FLAGS.get(arch, {})
    return [f for f in required if f in names and names[f] not in flags]


def check_cpu(cpu: dict, what: str = "artifact") -> None:
    """One line of error where this CPU cannot run code built for ``cpu`` (a manifest's
    ``{"arch", "features"}``): another architecture, or extensions it lacks (the code would
    die with SIGILL at its first such instruction)."""
    import platform

    machine = platform.machine()
    if cpu["arch"] != machine:
        raise HetcompError(f"{what} was built for {cpu['arch']} but this machine is {machine}: "
                           "rebuild with --target host")
    missing = missing_cpu_features(cpu["features"], machine, machine_cpu_flags())
    if missing:
        portable = " (or --target x86-64-v3: any AVX2 machine)" if machine == "x86_64" else ""
        raise HetcompError(f"{what} needs CPU features this machine lacks "
                           f"({', '.join(missing)}): rebuild with --target host{portable}")
