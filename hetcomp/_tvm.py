"""The one module that touches version-sensitive TVM names (pinned: apache-tvm 0.27.0.post1).

Every other module imports TVM names from here, so a TVM upgrade is a one-file change.
Runtime-only deployments (``TVM_USE_RUNTIME_LIB=1``) cannot import ``tvm.relax``; the compiler
names are therefore loaded lazily through :func:`compiler`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os

import numpy as np

# TVM's CPU thread pool runs one thread unless told otherwise; use every core by default
# (an empty value too: ``TVM_NUM_THREADS= hetcomp ...``).
if not os.environ.get("TVM_NUM_THREADS", "").strip():
    os.environ["TVM_NUM_THREADS"] = str(os.cpu_count() or 1)

RUNTIME_ONLY: bool = os.environ.get("TVM_USE_RUNTIME_LIB", "") not in ("", "0")


def _import_tvm_without_torch():
    """``import tvm`` without letting tvm_ffi import torch (it tries to, for its optional
    torch interop: 0.8-1.2 s and ~100 MB of resident memory that running an artifact, and
    compiling a GGUF or HF model, never use), unless torch is loaded already. A later
    ``import torch`` in the same process still works, and TVM takes torch's tensors through
    the DLPack protocol (``from_torch``'s parameters)."""
    import sys

    if "torch" in sys.modules:
        import tvm
        return tvm
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        import tvm
    finally:
        del sys.modules["torch"]
    return tvm


tvm = _import_tvm_without_torch()
import tvm_ffi
from tvm import runtime
from tvm.runtime import _ffi_api as _runtime_api

TVM_VERSION: str = tvm.__version__


def cpu():
    """The host CPU device."""
    return runtime.device("cpu", 0)


def device(kind: str, index: int = 0):
    """A runtime device by kind name (``cpu``, ``cuda``, ...), its backend loaded."""
    ensure_backend(kind)
    return runtime.device(kind, index)


def cpu_pool_threads() -> int:
    """The threads a parallel CPU kernel called from this Python thread runs on (TVM's pool
    is per calling thread)."""
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def cpu_pool_core_order() -> list[int]:
    """The cores in the order TVM's pool binds its threads to them: fastest
    ``cpuinfo_max_freq`` first, ties by core number (``InitSortedOrder`` in TVM's
    ``threading_backend.cc``). The calling thread runs task 0 anywhere on the fast cores;
    worker ``i`` is bound to ``order[i]`` (unless ``TVM_BIND_THREADS=0``)."""
    freqs = []
    for core in range(os.cpu_count() or 1):
        try:
            with open(f"/sys/devices/system/cpu/cpu{core}/cpufreq/cpuinfo_max_freq") as fh:
                freqs.append((core, int(fh.read().strip() or -1)))
        except (OSError, ValueError):
            freqs.append((core, 0))
    return [core for core, _ in sorted(freqs, key=lambda cf: (-cf[1], cf[0]))]


@contextlib.contextmanager
def cpu_pool_limited(threads: int):
    """Within: parallel CPU kernels called from this thread run on ``threads`` of the pool's
    threads (those on ``cpu_pool_core_order()[:threads]``); after, the pool's start-up
    configuration again. 1 is TVM's ``kBig``, the mode it starts in; 0 threads restores the
    start-up count (every fast core, at most ``TVM_NUM_THREADS``)."""
    configure = tvm_ffi.get_global_func("runtime.config_threadpool")
    configure(1, threads)
    try:
        yield
    finally:
        configure(1, 0)


_BACKENDS: set[str] = set()


def ensure_backend(kind: str) -> None:
    """Make a device backend usable before a library that needs it is loaded.

    A runtime-only ``import tvm`` loads neither the contrib kernels nor a device backend: this
    loads ``libtvm_runtime_extra.so`` (and for ``cuda`` ``libtvm_runtime_cuda.so``) from the
    tvm package, and for ``cuda``
    registers ``tvm_callback_cuda_compile`` (a library built without a GPU holds CUDA source,
    compiled when loaded) as ``nvcc --fatbin`` for the GPU's architecture, unless one is
    registered already.
    """
    if kind in _BACKENDS:
        return
    libs = {"cpu": ["libtvm_runtime_extra.so"],  # contrib kernels (the draft's top-k sort)
            "cuda": ["libtvm_runtime_extra.so", "libtvm_runtime_cuda.so"]}.get(kind, [])
    if RUNTIME_ONLY:
        libdir = os.path.join(os.path.dirname(tvm.__file__), "lib")
        for name in libs:
            ctypes.CDLL(os.path.join(libdir, name), mode=ctypes.RTLD_GLOBAL)
    # A runtime-only tvm may still register the compiler's callback, which needs tvm.target.
    if kind == "cuda" and (RUNTIME_ONLY or tvm_ffi.get_global_func(
            "tvm_callback_cuda_compile", allow_missing=True) is None):
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", _nvcc_fatbin, override=True)
    _BACKENDS.add(kind)


_LOADING_ARCH: list[str] = []  # the GPU architectures of the libraries being loaded


@contextlib.contextmanager
def cuda_arch(arch: str | None):
    """Within: CUDA source in a library being loaded is compiled for ``arch`` (the runtime
    compiles it while loading, through :func:`_nvcc_fatbin`, which is told nothing of the
    artifact). ``$HETCOMP_CUDA_ARCH`` still wins; None keeps the default."""
    _LOADING_ARCH.append(arch or "")
    try:
        yield
    finally:
        _LOADING_ARCH.pop()


def loading_cuda_arch() -> str:
    """The architecture CUDA source loaded now is compiled for."""
    return (os.environ.get("HETCOMP_CUDA_ARCH")
            or next((a for a in reversed(_LOADING_ARCH) if a), "sm_90"))


def _nvcc_fatbin(code, *_target) -> bytes:
    """CUDA source -> fatbin with ``nvcc`` (cached by source hash under
    ``$HETCOMP_KERNEL_CACHE`` when set: the same artifact loads fast the second time)."""
    import hashlib
    import subprocess
    import tempfile

    arch = loading_cuda_arch()
    key = hashlib.sha256((arch + str(code)).encode()).hexdigest()[:24]
    cache = os.environ.get("HETCOMP_KERNEL_CACHE")
    hit = os.path.join(cache, key + ".fatbin") if cache else None
    if hit and os.path.isfile(hit):
        with open(hit, "rb") as fh:
            return fh.read()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.fatbin")
        with open(src, "w") as fh:
            fh.write(str(code))
        subprocess.run(["nvcc", "--fatbin", "-O3", f"-arch={arch}", "-o", out, src],
                       check=True, capture_output=True)
        with open(out, "rb") as fh:
            data = fh.read()
    if hit:
        os.makedirs(cache, exist_ok=True)
        with open(hit + ".tmp", "wb") as fh:
            fh.write(data)
        os.replace(hit + ".tmp", hit)
    return data


def tensor(array, device=None):
    """A TVM runtime tensor from a numpy array (``tvm.nd.array`` before 0.27)."""
    return runtime.tensor(array, device if device is not None else cpu())


class Uploader:
    """Device tensors from small numpy arrays (a step's token ids, positions, the draft's node
    list, an accepted path) for ``device``, at a sixth of :func:`tensor`'s host time: 1.8
    against 11.4 us a tensor here, most of which builds the shape and dtype objects, made
    here once per (shape, dtype). Each call allocates a new tensor (from the device's pool),
    so no tensor a call is still reading is ever written."""

    def __init__(self, device):
        self.device = device
        self._types: dict = {}

    def __call__(self, array):
        """``array`` (C-contiguous numpy) as a new tensor on the device."""
        key = (array.shape, array.dtype.str)
        types = self._types.get(key)
        if types is None:
            types = self._types[key] = (tvm_ffi.Shape(array.shape),
                                        tvm_ffi.dtype(str(array.dtype)))
        out = _runtime_api.TVMTensorAllocWithScope(*types, self.device, None)
        _runtime_api.TVMTensorCopyFromBytes(out, ctypes.c_void_p(array.ctypes.data),
                                            array.nbytes)
        return out


def download(tensor):
    """A numpy copy of ``tensor`` (a standard dtype), waiting for the device as ``.numpy()``
    does, at half its host time (2.5 against 5.1 us here)."""
    out = np.empty(tuple(tensor.shape), str(tensor.dtype))
    _runtime_api.TVMTensorCopyToBytes(tensor, ctypes.c_void_p(out.ctypes.data), out.nbytes)
    return out


def view(array):
    """A CPU tensor that shares ``array``'s memory (DLPack, no copy); ``array`` must be
    contiguous and 64-byte aligned, and stay alive as long as the tensor."""
    return runtime.from_dlpack(array)


def ffi_include_dir() -> str:
    """The tvm-ffi C headers (``tvm/ffi/c_api.h``, ``dlpack/dlpack.h``) for C harnesses."""
    from tvm_ffi import libinfo

    return libinfo.find_include_path()


def ffi_function(pyfunc):
    """A Python callable as a TVM FFI function (VM instruments, global callbacks)."""
    return tvm_ffi.convert(pyfunc)


def load_module(path: str):
    """Load an exported shared library."""
    return runtime.load_module(path)


def shape_tuple(values):
    """A runtime shape value (the argument of a Relax ``R.Shape`` parameter)."""
    return runtime.ShapeTuple([int(v) for v in values])


@functools.lru_cache(maxsize=1 << 16)
def length_shape(n: int):
    """``shape_tuple([n])``, made once per ``n`` (a cache length: every decode step passes
    one, and a shape value is immutable)."""
    return runtime.ShapeTuple([int(n)])


def virtual_machine(executable, devices):
    """A Relax VM over an executable (``tvm.runtime.Executable`` or a loaded module)."""
    from tvm.runtime import vm as _vm

    return _vm.VirtualMachine(executable, list(devices))  # it appends the host to the list


class _Compiler:
    """Lazily imported compiler-side names (Relax, TIR, TE, schedules)."""

    def __init__(self) -> None:
        from tvm import relax, s_tir, te, tirx
        from tvm.s_tir import dlight
        from tvm.script.ir_builder import IRBuilder
        from tvm.script.ir_builder.tirx import prim_func as build_prim_func
        from tvm.support import cc
        from tvm.target import Target
        from tvm.target.codegen import llvm_cpu_has_features, llvm_get_cpu_features

        self.relax = relax
        self.te = te
        self.tir = tirx  # 0.27 renamed tvm.tir -> tvm.tirx
        self.s_tir = s_tir
        self.Schedule = s_tir.Schedule
        self.dlight = dlight
        self.ScheduleRule = dlight.ScheduleRule
        self.ApplyDefaultSchedule = dlight.ApplyDefaultSchedule
        self.Target = Target
        self.BlockBuilder = relax.BlockBuilder
        self.TensorType = relax.TensorType  # StructInfo -> Type in 0.27
        self.ShapeType = relax.ShapeType
        self.prim_value = relax.prim_value  # relax.PrimValue before 0.27
        self.PyExprMutator = relax.PyExprMutator
        self.mutator = relax.expr_functor.mutator
        self.VDevice = relax.VDevice
        self.call_tir_op = tvm.ir.Op.get("relax.call_tir")
        self.module_pass = tvm.transform.module_pass
        self.Op = tvm.ir.Op
        self.tvm = tvm
        self.DataType = tvm.DataType
        from tvm.sym import Analyzer

        self.Analyzer = Analyzer  # tvm.arith.Analyzer before 0.27
        self.Constant = type(relax.const(0.0))  # relax.Constant -> ir GenericConst in 0.27
        self.compile = tvm.compile
        self.IRModule = tvm.IRModule
        self.transform = tvm.transform
        self.IS_SCHEDULED = "tirx.is_scheduled"
        self.assert_structural_equal = tvm.ir.assert_structural_equal
        from tvm_ffi import structural_hash

        self.structural_hash = structural_hash  # tvm.ir.structural_hash before 0.27
        self.TensorIntrin = s_tir.TensorIntrin  # tvm.tir.TensorIntrin before 0.27
        self.renew_defs = s_tir.renew_defs  # tvm.tir.stmt_functor.renew_defs before 0.27
        self.IRBuilder = IRBuilder
        self.build_prim_func = build_prim_func  # the IRBuilder frame of a PrimFunc
        self.cc = cc  # tvm.contrib.cc before 0.27
        self.llvm_cpu_has_features = llvm_cpu_has_features
        self.llvm_get_cpu_features = llvm_get_cpu_features  # {feature name: ...} of a target
        # A data prefetch, ``T.call_llvm_intrin("void", LLVM_PREFETCH, address, rw, locality,
        # cache type)``. TIR's own ``tirx.prefetch`` builtin fails in 0.27's LLVM codegen
        # ("Cannot find intrinsic declaration ... llvm.prefetch"): opaque pointers need the
        # overload's ``.p0`` suffix (``.p0i8`` before LLVM 15).
        self.LLVM_PREFETCH = "llvm.prefetch.p0"

    @property
    def meta_schedule(self):
        """``tvm.s_tir.meta_schedule`` (``tvm.meta_schedule`` before 0.27), imported on use."""
        from tvm.s_tir import meta_schedule

        return meta_schedule

    @contextlib.contextmanager
    def cpu_tensor_intrinsics(self):
        """While inside, ``import tvm.s_tir.tensor_intrin`` registers the CPUs' tensor
        intrinsics alone (x86's and Arm's: all that tuning a CPU kernel can use) and not every
        target's: MetaSchedule's ``TuneContext`` imports the package each time it is made, and
        the whole of it took 23 s here, 17 of them CUDA's (``tensor_intrin.cuda``). After, a
        plain import runs the package's own ``__init__`` (the CPU modules stay imported)."""
        import importlib
        import importlib.util
        import sys

        name = "tvm.s_tir.tensor_intrin"
        if name in sys.modules:  # imported whole already
            yield
            return
        package = importlib.util.module_from_spec(importlib.util.find_spec(name))
        sys.modules[name] = package  # (its __init__ not run)
        try:
            for cpu in ("x86", "arm_cpu"):
                importlib.import_module(f"{name}.{cpu}")
            yield
        finally:
            if sys.modules.get(name) is package:
                del sys.modules[name]

    @staticmethod
    def same_vdevice(a, b) -> bool:
        """VDevice equality (``VDevice.same_as`` recurses forever in 0.27)."""
        return (int(a.vdevice_id) == int(b.vdevice_id) and str(a.target) == str(b.target)
                and str(a.memory_scope) == str(b.memory_scope))



_COMPILER: _Compiler | None = None


def compiler() -> _Compiler:
    """Compiler-side TVM names; raises in a runtime-only installation."""
    global _COMPILER
    if _COMPILER is None:
        _COMPILER = _Compiler()
    return _COMPILER
