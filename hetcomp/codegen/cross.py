"""Cross-compile a kernel for aarch64 and run it under qemu: ARM checks on an x86 machine.

:func:`cross_compile` turns a (scheduled) ``tirx.PrimFunc`` into an aarch64 object file plus
its assembly text. :class:`QemuKernel` links that object with a small C harness (the tvm-ffi
C ABI: ``int __tvm_ffi_<name>(void*, const TVMFFIAny*, int32_t, TVMFFIAny*)`` with tensors
passed as ``DLTensor`` pointers) statically with ``aarch64-linux-gnu-gcc`` and runs it with
``qemu-aarch64-static``; inputs and outputs travel as raw binary files, so numpy can compare.

Debian packages: ``gcc-aarch64-linux-gnu`` (the cross compiler and its libc) and
``qemu-user-static`` (or ``qemu-user``, which provides ``qemu-aarch64``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile

import numpy as np

from .._tvm import compiler, ffi_include_dir
from ..errors import HetcompError

#: The ARM target the cross checks use (0.27 takes targets as dicts).
AARCH64_NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}

# The harness: parses one "i|o:<dtype code>:<bits>:<d0,d1,..>:<path>" spec per kernel
# argument ("s:<value>" for an int64 scalar; kind "b" for a buffer read and written back, an
# in-place argument), reads the inputs, calls the kernel once, writes the outputs. It also supplies
# what the TVM runtime would: the error setter and a serial parallel-launch (the generated
# code calls these through function-pointer globals). Exit codes: 0 ok, 2 usage or I/O,
# 3 the kernel reported an error (printed to stderr).
_HARNESS_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tvm/ffi/c_api.h>

int HETCOMP_ENTRY(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result);

static char g_error[4096];

void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) {
  snprintf(g_error, sizeof(g_error), "%s: %s", kind, message);
}

void TVMFFIErrorSetRaisedFromCStrParts(const char* kind, const char** parts, int32_t n) {
  size_t len = (size_t)snprintf(g_error, sizeof(g_error), "%s: ", kind);
  for (int32_t i = 0; i < n && len < sizeof(g_error); ++i) {
    if (parts[i] == NULL) continue;
    len += (size_t)snprintf(g_error + len, sizeof(g_error) - len, "%s", parts[i]);
  }
}

typedef struct { void* sync_handle; int32_t num_task; } ParallelEnv;
typedef int (*ParallelLambda)(int task_id, ParallelEnv* env, void* cdata);

static int serial_launch(ParallelLambda f, void* cdata, int num_task) {
  ParallelEnv env = {NULL, 1};
  (void)num_task;
  return f(0, &env, cdata);
}
static void* alloc_workspace(int dev_type, int dev_id, uint64_t nbytes, int code, int bits) {
  (void)dev_type; (void)dev_id; (void)code; (void)bits;
  return aligned_alloc(64, (nbytes + 63) / 64 * 64);
}
static int free_workspace(int dev_type, int dev_id, void* ptr) {
  (void)dev_type; (void)dev_id;
  free(ptr);
  return 0;
}
void* __TVMBackendParallelLaunch = (void*)serial_launch;
void* __TVMBackendAllocWorkspace = (void*)alloc_workspace;
void* __TVMBackendFreeWorkspace = (void*)free_workspace;

#define MAX_ARGS 16
#define MAX_DIMS 8

int main(int argc, char** argv) {
  int n = argc - 1;
  static DLTensor tensors[MAX_ARGS];
  static int64_t shapes[MAX_ARGS][MAX_DIMS];
  static char* paths[MAX_ARGS];
  static int is_out[MAX_ARGS];
  static size_t nbytes[MAX_ARGS];
  TVMFFIAny args[MAX_ARGS];
  if (n < 1 || n > MAX_ARGS) { fprintf(stderr, "usage: %s SPEC...\n", argv[0]); return 2; }
  for (int a = 0; a < n; ++a) {
    char kind; int code, bits, used = 0;
    long long scalar;
    if (sscanf(argv[a + 1], "s:%lld", &scalar) == 1) {  /* an int64 scalar argument */
      memset(&args[a], 0, sizeof(args[a]));
      args[a].type_index = kTVMFFIInt;
      args[a].v_int64 = scalar;
      is_out[a] = 0;
      nbytes[a] = 0;
      continue;
    }
    if (sscanf(argv[a + 1], "%c:%d:%d:%n", &kind, &code, &bits, &used) != 3) {
      fprintf(stderr, "bad spec %s\n", argv[a + 1]); return 2;
    }
    char* p = argv[a + 1] + used;
    int ndim = 0;
    nbytes[a] = (size_t)bits / 8;
    while (*p != ':') {
      if (ndim == MAX_DIMS) { fprintf(stderr, "too many dims\n"); return 2; }
      shapes[a][ndim] = strtoll(p, &p, 10);
      nbytes[a] *= (size_t)shapes[a][ndim++];
      if (*p == ',') ++p;
    }
    paths[a] = p + 1;
    is_out[a] = kind == 'o' || kind == 'b';
    DLTensor* t = &tensors[a];
    memset(t, 0, sizeof(*t));
    t->data = aligned_alloc(64, (nbytes[a] + 63) / 64 * 64 + 64);
    t->device.device_type = kDLCPU;
    t->ndim = ndim;
    t->dtype.code = (uint8_t)code;
    t->dtype.bits = (uint8_t)bits;
    t->dtype.lanes = 1;
    t->shape = shapes[a];
    if (kind != 'o') {
      FILE* f = fopen(paths[a], "rb");
      if (f == NULL || fread(t->data, 1, nbytes[a], f) != nbytes[a]) {
        fprintf(stderr, "cannot read %s\n", paths[a]); return 2;
      }
      fclose(f);
    } else {
      memset(t->data, 0, nbytes[a]);
    }
    memset(&args[a], 0, sizeof(args[a]));
    args[a].type_index = kTVMFFIDLTensorPtr;
    args[a].v_ptr = t;
  }
  TVMFFIAny result;
  memset(&result, 0, sizeof(result));
  if (HETCOMP_ENTRY(NULL, args, n, &result) != 0) {
    fprintf(stderr, "kernel error: %s\n", g_error);
    return 3;
  }
  for (int a = 0; a < n; ++a) {
    if (!is_out[a]) continue;
    FILE* f = fopen(paths[a], "wb");
    if (f == NULL || fwrite(tensors[a].data, 1, nbytes[a], f) != nbytes[a]) {
      fprintf(stderr, "cannot write %s\n", paths[a]); return 2;
    }
    fclose(f);
  }
  return 0;
}
"""

# DLPack type codes (kDLInt, kDLUInt, kDLFloat) by numpy dtype kind.
_DL_CODES = {"i": 0, "u": 1, "f": 2}


@dataclasses.dataclass(frozen=True)
class CrossToolchain:
    """The aarch64 cross compiler and the user-mode emulator that runs its binaries."""

    cc: str = "aarch64-linux-gnu-gcc"
    qemu: str = "qemu-aarch64-static"

    @classmethod
    def find(cls) -> CrossToolchain | None:
        """The installed toolchain, or None when the compiler or qemu is missing."""
        cc = shutil.which("aarch64-linux-gnu-gcc")
        qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
        return cls(cc, qemu) if cc and qemu else None


@dataclasses.dataclass(frozen=True)
class CrossArtifact:
    """A kernel compiled for another target: its symbol, object file and assembly text."""

    name: str
    object_path: str
    asm: str

    @property
    def entry(self) -> str:
        """The tvm-ffi C symbol of the kernel."""
        return f"__tvm_ffi_{self.name}"


def cross_compile(func, name: str, out_dir: str, target: dict | None = None) -> CrossArtifact:
    """Compile ``func`` for ``target`` (default aarch64 + NEON) to ``<out_dir>/<name>.o``.

    ``func`` should already be scheduled (see :func:`apply_rules`); codegen never touches a
    device. Also writes ``<name>.s``, the assembly that :attr:`CrossArtifact.asm` holds.
    """
    c = compiler()
    tgt = c.Target(target or AARCH64_NEON)
    lib = c.compile(c.IRModule({name: func.with_attr("global_symbol", name)}), target=tgt)
    os.makedirs(out_dir, exist_ok=True)
    obj = os.path.join(out_dir, f"{name}.o")
    lib.mod.write_to_file(obj)
    asm = lib.mod.inspect_source("s")
    with open(os.path.join(out_dir, f"{name}.s"), "w") as f:
        f.write(asm)
    return CrossArtifact(name, obj, asm)


def apply_rules(func, rules, target: dict):
    """Schedule ``func`` with the first rule that applies (dlight order); None if none does.

    The result is marked ``tirx.is_scheduled`` (by the rule, or here).
    """
    c = compiler()
    tgt = c.Target(target)
    with tgt:
        for rule in rules:
            sch = rule.apply(func, tgt, False)
            if sch is not None:
                return sch.mod["main"].with_attr(c.IS_SCHEDULED, True)
    return None


def _dim(expr, env: dict[str, int]) -> int:
    """Evaluate a buffer dimension (constants, shape variables, + - *) under ``env``."""
    kind = type(expr).__name__
    if kind == "IntImm":
        return int(expr.value)
    if kind == "Var":
        if expr.name not in env:
            raise HetcompError(f"shape variable {expr.name} is not bound by any input")
        return env[expr.name]
    ops = {"Add": int.__add__, "Sub": int.__sub__, "Mul": int.__mul__}
    if kind in ops:
        return ops[kind](_dim(expr.a, env), _dim(expr.b, env))
    raise HetcompError(f"unsupported buffer dimension {expr}")


class QemuKernel:
    """A kernel cross-compiled for aarch64, linked with the C harness, called under qemu.

    Parameters
    ----------
    func : tirx.PrimFunc
        A scheduled kernel whose parameters are buffers and int64 scalars (passed as Python
        ints); the last ``num_outputs`` are its outputs.
    name : str
        The kernel's symbol.
    num_outputs : int
    workdir : str, optional
        Where the object, assembly, harness and inputs go (a fresh temporary directory by
        default).
    check : callable, optional
        ``check(*inputs)`` raises :class:`HetcompError` for inputs the kernel must not see
        (e.g. :func:`hetcomp.kernels.sparse_attention.check_inputs`; kernels trust their
        index arrays).
    toolchain : CrossToolchain, optional
    target : dict, optional
        Default :data:`AARCH64_NEON`.
    """

    def __init__(self, func, name: str, num_outputs: int, workdir: str | None = None,
                 check=None, toolchain: CrossToolchain | None = None,
                 target: dict | None = None):
        self.toolchain = toolchain or CrossToolchain.find()
        if self.toolchain is None:
            raise HetcompError("aarch64 cross toolchain not found: install the Debian packages "
                               "gcc-aarch64-linux-gnu and qemu-user-static")
        self.params = list(func.params)
        self.num_outputs = num_outputs
        self.check = check
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"hetcomp-{name}-")
        self.artifact = cross_compile(func, name, self.workdir, target)
        self.exe = self._link()

    @property
    def asm(self) -> str:
        return self.artifact.asm

    def _link(self) -> str:
        src = os.path.join(self.workdir, "harness.c")
        with open(src, "w") as f:
            f.write(_HARNESS_C)
        exe = os.path.join(self.workdir, f"{self.artifact.name}.run")
        # -fno-tree-vectorize: GCC 12's aarch64 vectoriser crashes on harness code like this.
        cmd = [self.toolchain.cc, "-O2", "-static", "-fno-tree-vectorize",
               f"-DHETCOMP_ENTRY={self.artifact.entry}", f"-I{ffi_include_dir()}",
               "-o", exe, src, self.artifact.object_path, "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise HetcompError(f"linking the aarch64 harness failed:\n{proc.stderr}")
        return exe

    def bind_shapes(self, inputs) -> dict[str, int]:
        """Check ``inputs`` against the input buffers; the shape variables they bind.

        Raises :class:`HetcompError` on a wrong count, dtype, rank, shape or layout (arrays
        must be C-contiguous), before anything runs.
        """
        ins = self.params[:len(self.params) - self.num_outputs]
        if len(inputs) != len(ins):
            raise HetcompError(f"{self.artifact.name} takes {len(ins)} inputs, got {len(inputs)}")
        env: dict[str, int] = {}
        for param, arr in zip(ins, inputs, strict=True):
            if not hasattr(param, "shape"):  # a scalar parameter
                if not isinstance(arr, int | np.integer):
                    raise HetcompError(f"{param.name} must be an int")
                continue
            if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous:
                raise HetcompError(f"{param.name} must be a C-contiguous numpy array")
            if str(arr.dtype) != str(param.dtype):
                raise HetcompError(f"{param.name} must be {param.dtype}, got {arr.dtype}")
            if arr.ndim != len(param.shape):
                raise HetcompError(f"{param.name} must have {len(param.shape)} dims, "
                                   f"got shape {arr.shape}")
            for dim, size in zip(param.shape, arr.shape, strict=True):
                if type(dim).__name__ == "Var" and dim.name not in env:
                    env[dim.name] = int(size)
        for param, arr in zip(ins, inputs, strict=True):
            if not hasattr(param, "shape"):
                continue
            want = tuple(_dim(d, env) for d in param.shape)
            if want != arr.shape:
                raise HetcompError(f"{param.name} must have shape {want}, got {arr.shape}")
        return env

    def __call__(self, *inputs) -> list[np.ndarray]:
        """Run the kernel on ``inputs`` (validated first); returns the outputs."""
        env = self.bind_shapes(inputs)
        if self.check is not None:
            self.check(*inputs)
        outs = [np.empty(tuple(_dim(d, env) for d in p.shape), str(p.dtype))
                for p in self.params[len(inputs):]]
        self.run_unchecked(list(inputs) + outs, len(inputs))
        return outs

    def run_unchecked(self, arrays, num_inputs: int, inplace=()) -> None:
        """Run the harness on ``arrays`` as given, filling the outputs in place.

        ``inplace``: indices of inputs the kernel updates in place (written back too). No
        validation on the Python side: what the kernel's own argument checks catch (rank,
        shape, dtype) comes back as a :class:`HetcompError` with its message.
        """
        specs = []
        for idx, arr in enumerate(arrays):
            if isinstance(arr, int | np.integer):
                specs.append(f"s:{int(arr)}")
                continue
            kind = "b" if idx in inplace else "i" if idx < num_inputs else "o"
            path = os.path.join(self.workdir, f"arg{idx}.bin")
            if kind != "o":
                np.ascontiguousarray(arr).tofile(path)
            code = _DL_CODES[arr.dtype.kind]
            dims = ",".join(str(s) for s in arr.shape)
            specs.append(f"{kind}:{code}:{arr.dtype.itemsize * 8}:{dims}:{path}")
        proc = subprocess.run([self.toolchain.qemu, self.exe, *specs], capture_output=True,
                              text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise HetcompError(f"{self.artifact.name} failed under qemu "
                               f"(exit {proc.returncode}): {proc.stderr.strip()}")
        for idx in [*inplace, *range(num_inputs, len(arrays))]:
            path = os.path.join(self.workdir, f"arg{idx}.bin")
            arrays[idx][...] = np.fromfile(path, arrays[idx].dtype).reshape(arrays[idx].shape)


class QemuModule:
    """The Relax functions of a scheduled module, run binding by binding with every kernel
    cross-compiled for aarch64 and called under qemu (no aarch64 TVM runtime needed).

    Covers what the model's functions hold before legalization: ``call_tir``,
    ``call_tir_inplace``, tuples, ``reshape``. Each distinct kernel is compiled and linked
    once, on first use. Slow (a qemu process per kernel call): for tiny models.

    Parameters
    ----------
    mod : IRModule
        Scheduled for ``target`` (:func:`hetcomp.codegen.build.schedule_module`).
    """

    def __init__(self, mod, workdir: str | None = None, toolchain: CrossToolchain | None = None,
                 target: dict | None = None):
        self.mod, self.target = mod, target
        self.toolchain = toolchain or CrossToolchain.find()
        self.workdir = workdir or tempfile.mkdtemp(prefix="hetcomp-qemu-module-")
        self.kernels: dict[str, QemuKernel] = {}

    def _kernel(self, gv) -> QemuKernel:
        name = gv.name_hint
        if name not in self.kernels:
            self.kernels[name] = QemuKernel(
                self.mod[gv], name, 0, workdir=os.path.join(self.workdir, name),
                toolchain=self.toolchain, target=self.target)
        return self.kernels[name]

    def __call__(self, fname: str, *args):
        """Run Relax function ``fname`` on numpy arrays (tensors) and ints (shape values,
        ``cache_len``); returns its result (tuples as lists)."""
        c = compiler()
        relax = c.relax
        func = self.mod[fname]
        env: dict = {}
        shapes: dict[str, int] = {}
        for p, a in zip(func.params, args, strict=True):
            if isinstance(p.ty, c.ShapeType):
                for dim, val in zip(p.ty.values, [a] if isinstance(a, int) else a, strict=True):
                    shapes[dim.name] = int(val)
                continue
            env[p] = a
            for dim, size in zip(p.ty.shape, a.shape, strict=True):
                if type(dim).__name__ == "Var":
                    shapes[dim.name] = int(size)

        def value(expr):
            if isinstance(expr, relax.Var) and expr in env:
                return env[expr]
            if type(expr).__name__ in ("IntImm", "Var"):  # 0.27: a PrimValue is its PrimExpr
                return _dim(expr, shapes)
            if type(expr).__name__ == "PrimValue":
                return _dim(expr.value, shapes)
            if isinstance(expr, relax.Tuple):
                return [value(f) for f in expr.fields]
            raise HetcompError(f"QemuModule cannot evaluate {type(expr).__name__}")

        def alloc(ty):
            return np.zeros(tuple(_dim(d, shapes) for d in ty.shape), str(ty.dtype))

        for block in func.body.blocks:
            for binding in block.bindings:
                v = binding.value
                if isinstance(v, relax.Var):  # an alias (a dataflow block's output)
                    env[binding.var] = value(v)
                elif isinstance(v, relax.TupleGetItem):
                    env[binding.var] = value(v.tuple_value)[v.index]
                elif isinstance(v, relax.Tuple):
                    env[binding.var] = value(v)
                elif isinstance(v, relax.Call) and str(v.op.name) == "relax.reshape":
                    env[binding.var] = value(v.args[0]).reshape(
                        [_dim(d, shapes) for d in v.args[1].values])
                elif isinstance(v, relax.Call) and str(v.op.name) in (
                        "relax.call_tir", "relax.call_tir_inplace"):
                    ins = [value(a) for a in v.args[1].fields]
                    ins = [a.copy() if isinstance(a, np.ndarray) else a for a in ins]
                    ret = v.ty_args[0]
                    tys = list(ret.fields) if hasattr(ret, "fields") else [ret]
                    where = (list(v.attrs.inplace_indices) if "inplace" in str(v.op.name)
                             else [-1] * len(tys))
                    outs, fresh = [], []
                    for ty, idx in zip(tys, where, strict=True):
                        outs.append(ins[idx] if idx >= 0 else alloc(ty))
                        if idx < 0:
                            fresh.append(outs[-1])
                    self._kernel(v.args[0]).run_unchecked(
                        ins + fresh, len(ins), inplace=[i for i in where if i >= 0])
                    env[binding.var] = outs if hasattr(ret, "fields") else outs[0]
                else:
                    raise HetcompError(f"QemuModule cannot run {v.op if hasattr(v, 'op') else v}")
        return value(func.body.body)
