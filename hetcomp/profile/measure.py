"""Measure the project's own compiled kernels, per op class, with the model's real shapes.

Every kernel is built from :mod:`hetcomp.kernels.ops` / :mod:`~hetcomp.kernels.script_ops`,
scheduled by the unit's rules (``ApplyDefaultSchedule`` inside the target) and compiled
with ``tvm.compile``, exactly as the model is. Times come from many back-to-back calls in a
Python loop under ``time.perf_counter`` (``time_evaluator`` showed a spurious ~1.5 ms for
multi-threaded kernels on the development VM). Weights rotate through enough copies to exceed
the last-level cache, and attention rotates through the layers of a full-size KV cache, so
each call reads from DRAM as it does inside a decode step.

Each shape is measured alone and while a concurrent memory-streaming load runs in another
process (the stand-in for another unit running its share on the same memory), so the co-run
slowdown is measured rather than assumed. The load needs a core, which the unit it stands for
(a GPU, an NPU) would not take: it gets one of its own (:func:`corun_layout`).

What to measure is data (:class:`Probe`): the kernels can be compiled into a *profile kit*
here and measured with the TVM runtime only where the unit is (a GPU host, a board), as
TVM's RPC builder/runner split does; ``measure_unit`` is the same path on one machine.
Building probes imports the compiler lazily, inside the functions that build: measuring a kit
runs with a runtime-only TVM (``TVM_USE_RUNTIME_LIB=1``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import numpy as np

from .. import _tvm
from ..artifact_format import holds_format, output_dir
from ..codegen.export import cpu_requirements
from ..codegen.targets import export_compiler
from ..cost.roofline import (
    LINEAR_KINDS,
    Features,
    ModelShape,
    argmax_features,
    attention_features,
    copy_features,
    dense_attention_features,
    dtype_bytes,
    embed_features,
    linear_features,
    merge_features,
    qk_norm_features,
    rms_norm_features,
    rope_features,
    rope_table_features,
    silu_mul_features,
    sparse_attention_features,
    split_columns,
    tree_attention_features,
)
from ..decoder import ACTIVATION_KERNELS, FUSED_WIDTHS
from ..errors import HetcompError
from ..hardware import (
    DEFAULT_CUDA_ARCH,
    TARGET_NAMES,
    check_cpu,
    check_cuda_arch,
    host_part,
    target_dict,
)
from ..quant_format import (
    QuantMatrix,
    head_dtype,
    int8_rounded,
    is_quant,
    pack_quant_weight,
    unpack_quant_weight,
)
from ..speculative.tree import Tree
from .db import Measurement, ProfileDB
from .units import Unit, detect_unit

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
    """Which shapes to measure and how long.

    Parameters
    ----------
    widths : tuple of int
        Tree widths W (rows of every kernel).
    ratios : tuple of float
        Fractions r of a linear layer's output columns (rounded to whole pack blocks).
    cache_lens : tuple of int
        Committed KV lengths for attention; 0 (the sparse tree-vs-tree part) is always added.
    kinds : tuple of str
        Linear kinds to measure.
    corun : bool
        Also measure every shape under the concurrent streaming load (on a core of its own:
        :func:`corun_layout`).
    min_time_s : float
        Minimum duration of one timing round.
    rounds : int
        Timing rounds per shape (the median round is kept).
    rotate_bytes : int
        Weight bytes to rotate through (several times the last-level cache).
    mode : str
        ``full`` or ``quick``; the database records it.
    """

    widths: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    ratios: tuple[float, ...] = tuple(i / 8 for i in range(1, 9))
    cache_lens: tuple[int, ...] = (64, 256, 1024)
    kinds: tuple[str, ...] = LINEAR_KINDS
    corun: bool = True
    min_time_s: float = 0.02
    rounds: int = 5
    rotate_bytes: int = 96 << 20
    mode: str = "full"

    @classmethod
    def quick(cls) -> ProfileOptions:
        """A few shapes, short rounds: for tests and smoke runs."""
        return cls(widths=(1, 16), ratios=(0.5, 1.0), cache_lens=(256,), min_time_s=0.003,
                   rounds=3, rotate_bytes=48 << 20, mode="quick")


#: Seconds to wait after a numpy reference check before timing. numpy's OpenBLAS threads
#: spin (yielding) for ~0.1 s after a matrix product; timed meanwhile, TVM's thread pool
#: shares the cores with them and a parallel kernel waits a scheduler tick: on this 2-core
#: machine 2 of 3 quick profiles timed every float16 linear at ~4 ms (0.02-0.06 ms in the
#: others, and in every profile with OPENBLAS_NUM_THREADS=1 or this wait), which made the
#: planner's CPU costs 30x a measured step.
BLAS_PARK_S = 0.3


@dataclasses.dataclass(frozen=True)
class CoRunLayout:
    """Where the co-run load runs beside a unit, and with how many pool threads the unit's
    co-run slowdown is timed.

    ``threads`` None: the unit keeps its whole pool and its co-run time is measured as is.
    Otherwise the pool has no core to spare: the slowdown is timed with ``threads`` pool
    threads alone and beside the load, and applied to the whole pool's alone time.
    ``possible`` False: one core, nothing to give the load (no co-run timing).
    """

    load_core: int | None  # None: wherever the OS puts it
    threads: int | None = None
    possible: bool = True


def corun_layout(device_kind: str, pool: int, order: list[int],
                 allowed: set[int] | None = None) -> CoRunLayout:
    """The co-run layout of a unit on ``device_kind`` whose kernels run on ``pool`` threads,
    TVM binding them to the cores in ``order`` (:func:`hetcomp._tvm.cpu_pool_core_order`).

    The load stands for another unit's memory traffic, and a GPU or NPU running its share
    takes no CPU core; the load does. Timed on the same cores, a parallel CPU kernel waited
    for the thread that shared a core with the load: co-run x2-x166 on the 2-core development
    VM (quick float16 profile), x0.89-1.08 with the pool one thread short and the load on the
    freed core (that VM's DRAM does not slow under one streaming core). So the load
    gets a core the pool does not use: the last in TVM's order (a slow core on big.LITTLE),
    or, where the pool uses every core, the core of its last thread, the unit's slowdown
    then timed one thread short. ``allowed``: the cores this process may use (the load is
    left unpinned on any other).
    """
    busy = min(pool, len(order))
    if device_kind != "cpu" or busy < len(order):
        core, threads = order[-1], None
    elif busy >= 2:
        core, threads = order[busy - 1], busy - 1
    else:
        return CoRunLayout(None, None, possible=False)
    return CoRunLayout(core if allowed is None or core in allowed else None, threads)


class CoRunLoad:
    """A memory-streaming process (numpy copies over 2 x 64 MB) that can be paused and resumed.

    Started once and kept stopped (SIGSTOP) while kernels are timed alone; resumed (SIGCONT)
    for the co-run timings. Use as a context manager.
    """

    # The load dies with the profiler: Linux delivers SIGKILL on the parent's death (also to
    # a stopped load), elsewhere it stops once re-parented. An orphaned load left running once
    # slowed every later measurement on this machine by half.
    _SOURCE = (
        "import os, sys, numpy as np\n"
        "parent = int(sys.argv[1])\n"
        "try:\n"
        "    import ctypes; ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL\n"
        "except Exception:\n"
        "    pass\n"
        "a = np.ones(16 << 20, np.float32); b = np.empty_like(a)\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        "while os.getppid() == parent:\n"
        "    np.copyto(b, a); np.copyto(a, b)\n"
    )

    def __init__(self, core: int | None = None):
        self._proc: subprocess.Popen | None = None
        self._core = core

    def __enter__(self) -> CoRunLoad:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self._proc = subprocess.Popen([sys.executable, "-c", self._SOURCE, str(os.getpid())],
                                      stdout=subprocess.PIPE, env=env)
        if self._proc.stdout.readline().strip() != b"ready":
            self.__exit__()
            raise HetcompError("the co-run streaming load failed to start")
        if self._core is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(self._proc.pid, {self._core})
        self.pause()
        return self

    def pause(self) -> None:
        os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._proc.pid, signal.SIGCONT)
        time.sleep(0.002)  # let it reach its streaming loop

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGCONT)
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def time_calls(calls: list[Callable[[int], object]], min_time_s: float, rounds: int,
               sync: Callable[[], object] | None = None) -> list[tuple[float, int]]:
    """Seconds per call and call count for each kernel call in ``calls``.

    Each call gets a batch size from a synchronised warm-up (enough back-to-back calls for
    ``min_time_s``); each round times every call's batch in turn, ended by ``sync()`` (a GPU's
    launches are asynchronous), and a call's time is its median round. Interleaving the rounds
    spreads a transient slowdown (another process, a descheduled vCPU) over one round of many
    shapes instead of every round of one. ``call(i)`` runs the kernel once; ``i`` counts up
    across all calls, to rotate (shared) buffers.
    """
    sync = sync or (lambda: None)
    batches = []
    for call in calls:
        call(0)  # warm-up: page in code and buffers
        sync()
        t0 = time.perf_counter()
        call(1)
        sync()
        one = max(time.perf_counter() - t0, 1e-7)
        batches.append(max(1, min(10000, int(min_time_s / one))))
    per_round: list[list[float]] = [[] for _ in calls]
    counts = [0] * len(calls)
    # One call index for all calls: probes sharing rotated buffers (every width of a linear
    # shape shares its weight copies) continue the rotation where the previous batch stopped.
    # Per-call indices restarted each batch at the copies the previous probe had just
    # streamed, still in the last-level cache: W=2 and 4 timed 2-3x faster than W=1.
    index = 2
    for _ in range(rounds):
        for j, call in enumerate(calls):
            n = batches[j]
            t0 = time.perf_counter()
            for i in range(n):
                call(index + i)
            sync()
            per_round[j].append((time.perf_counter() - t0) / n)
            counts[j] += n
            index += n
    return [(statistics.median(r), c) for r, c in zip(per_round, counts, strict=True)]


# ---- probes: what to measure, as data ------------------------------------------------------
#
# A probe is one kernel call with the model's shapes: the kernel's name in the unit's probe
# library, its features, and its arguments as specs (below). Probes are data so that the
# kernels can be compiled on one machine (with the compiler) and measured on another (with
# the TVM runtime only): a GPU host or a board that the compiler never sees.
#
# Argument specs (JSON lists):
#   ["rand", shape, dtype, scale, copies]  random data; ``copies`` buffers rotated per call
#   ["quant", [n, k], qtype, copies]       a random [n, k] weight in GGUF blocks, packed
#   ["zeros", shape, dtype]                an output buffer
#   ["shared", key]                        a buffer of the probe group (a full KV cache)
#   ["tril", w]  ["arange", n, start]  ["randint", n, high, copies]
#   ["mod", m]                             the call index modulo m (which layer)
#   ["int", v]                             a constant scalar
# A probe without a kernel (``func`` None) copies ``[w, n]`` float32 between host and unit.


@dataclasses.dataclass(frozen=True)
class Probe:
    func: str | None
    features: Features
    args: tuple

    def to_json(self) -> dict:
        return {"func": self.func, "features": dataclasses.asdict(self.features),
                "args": [list(a) for a in self.args]}

    @classmethod
    def from_json(cls, d: dict) -> Probe:
        return cls(d["func"], Features(**d["features"]), tuple(tuple(a) for a in d["args"]))


@dataclasses.dataclass(frozen=True)
class ProbeGroup:
    """Probes measured together (one op class, one kernel family) and their shared buffers."""

    desc: str
    probes: tuple[Probe, ...]
    shared: tuple[tuple[str, tuple], ...] = ()
    gpu_only: bool = False  # kernels only GPU builds run (the CUDA-graph build's attention)
    # Kernels only a one-unit build on int8 activations runs (a CPU with int8 dot products:
    # the int8-dot quantized linears, the fused attention at every width): measured only
    # where the unit's probe library has them.
    int8_only: bool = False

    def to_json(self) -> dict:
        return {"desc": self.desc, "probes": [p.to_json() for p in self.probes],
                "shared": {k: list(v) for k, v in self.shared}, "gpu_only": self.gpu_only,
                "int8_only": self.int8_only}

    @classmethod
    def from_json(cls, d: dict) -> ProbeGroup:
        return cls(d["desc"], tuple(Probe.from_json(p) for p in d["probes"]),
                   tuple((k, tuple(v)) for k, v in d["shared"].items()),
                   bool(d.get("gpu_only", False)), bool(d.get("int8_only", False)))


#: The op classes of linear probes: ``linear`` the kernel every build can run (a quantized
#: one dequantizing its weights, as every unit of a partitioned plan does); ``linear_int8``
#: a quantized linear on int8-rounded activations with the CPU's dot-product instructions
#: (:mod:`hetcomp.schedules.int8_dot`), what a one-unit build of that CPU runs, all columns.
LINEAR_OPS = ("linear", "linear_int8")


def int8_kernels(groups: Iterable[ProbeGroup]) -> frozenset[str]:
    """The kernels of ``groups`` that only an int8 build runs (:attr:`ProbeGroup.int8_only`);
    quantized linears among them take int8 activations."""
    return frozenset(p.func for g in groups if g.int8_only for p in g.probes)


def unit_groups(groups: Iterable[ProbeGroup], int8_dot: bool) -> list[ProbeGroup]:
    """The groups a unit measures: the int8-only ones where its library has them."""
    return [g for g in groups if int8_dot or not g.int8_only]


def linear_args(shape: ModelShape, kind: str, n: int, w: int, wdtype: str,
                rotate_bytes: int) -> tuple:
    """Argument specs of a linear kernel call with ``n`` output columns and ``w`` rows: x, the
    packed weight in enough copies to rotate past ``rotate_bytes``, the residual (residual
    kinds) and the output."""
    from ..kernels import ops

    _, k, residual = shape.linear_dims(kind)
    b = ops.pack_block(n)
    copies = max(1, min(4096, math.ceil(rotate_bytes / (n * k * dtype_bytes(wdtype)))))
    weight = (("quant", (n, k), wdtype, copies) if is_quant(wdtype)
              else ("rand", (n // b, k, b), wdtype, 0.05, copies))
    args = [("rand", (w, k), "float32", 0.05, 1), weight]
    if residual:
        args.append(("rand", (w, n), "float32", 0.05, 1))
    return (*args, ("zeros", (w, n), "float32"))


LAUNCH_MODES = ("batched", "synced")  # kinds of the "launch" probes


def plan_probes(shape: ModelShape, opts: ProfileOptions, wdtype: str = "float32"
                ) -> tuple[list[ProbeGroup], dict[str, Callable[[], object]]]:
    """The probe groups of every op class and the kernels they call (name -> PrimFunc
    builder, from :mod:`hetcomp.kernels.ops` / ``script_ops`` exactly as the model uses).

    ``wdtype`` a block format (q4_0, q4_1, q8_0): the layers' linear probes are the
    dequantizing kernels of :mod:`hetcomp.kernels.quant` in that format, the LM head's and
    the embedding's in q8_0 (:func:`~hetcomp.quant_format.head_dtype`), as the model runs
    them; each kind also gets an :attr:`~ProbeGroup.int8_only` group of its whole columns
    (op ``linear_int8``, :data:`LINEAR_OPS`). The KV cache's element type is the one
    ``shape`` records (``kv_bytes``)."""
    from ..kernels import ops, quant, script_ops

    s, ws = shape, opts.widths
    kernels: dict[str, Callable[[], object]] = {}
    groups: list[ProbeGroup] = []
    kv_dtype = "float16" if s.kv_bytes == 2 else "float32"

    def kernel(name, build, *args, **kw):
        kernels.setdefault(name, lambda: build(*args, **kw))
        return name

    def fmt(kind):  # the weight format a linear kind is stored in
        return head_dtype(wdtype) if kind == "lm_head" else wdtype

    def linear_kernel(kind, n, w, prefix=""):
        # The width-specialised kernel, as verify_w{W} runs it (exact row tiles).
        _, k, residual = s.linear_dims(kind)
        res = "res_" if residual else ""
        if is_quant(fmt(kind)):
            return kernel(f"{prefix}linear_{fmt(kind)}_{res}n{n}_k{k}_w{w}", quant.linear_quant,
                          n, k, fmt(kind), residual, rows=w)
        return kernel(f"linear_{res}n{n}_k{k}_w{w}", ops.linear, n, k, wdtype, residual,
                      rows=w)

    for kind in opts.kinds:
        full = s.linear_dims(kind)[0]
        for n in sorted({split_columns(full, r) for r in opts.ratios}):
            probes = []
            for w in ws:
                f = linear_kernel(kind, n, w)
                probes.append(Probe(f, linear_features(s, kind, w, n / full),
                                    linear_args(s, kind, n, w, fmt(kind), opts.rotate_bytes)))
            groups.append(ProbeGroup(f"linear {kind} n={n}", tuple(probes)))
        if is_quant(fmt(kind)):  # a one-unit build on int8 activations: all the columns
            groups.append(ProbeGroup(f"linear_int8 {kind} n={full}", tuple(
                Probe(linear_kernel(kind, full, w, prefix="int8_"),
                      dataclasses.replace(linear_features(s, kind, w), op="linear_int8"),
                      linear_args(s, kind, full, w, fmt(kind), opts.rotate_bytes))
                for w in ws), int8_only=True))

    cache = (("kc", ("rand", (s.layers, s.kv_heads, s.head_dim, s.max_context), kv_dtype, 0.5,
                     1)),
             ("vc", ("rand", (s.layers, s.kv_heads, s.max_context, s.head_dim), kv_dtype, 0.5,
                     1)))
    groups += attention_probes(s, opts, kernel, cache, exact=is_quant(wdtype))

    f = kernel("rope_kv", script_ops.rope_kv, s.heads, s.kv_heads, s.head_dim, s.layers,
               s.max_context, kv_dtype=kv_dtype)
    table = kernel("rope_table", ops.rope_table, s.head_dim, 10000.0)
    # rope_kv writes the rows' K/V at positions n..n+w-1 of the caches: n = 100, or less
    # where the context is shorter (a tiny model's 128: writes past the cache corrupted the
    # heap of a full profile).
    groups.append(ProbeGroup("rope", tuple(
        Probe(f, rope_features(s, w), (("rand", (w, s.qkv_size), "float32", 0.05, 1),
                                       ("rand", (w, s.head_dim), "float32", 1.0, 1),
                                       ("shared", "kc"), ("shared", "vc"),
                                       ("mod", s.layers), ("int", min(100, s.max_context - w)),
                                       ("zeros", (s.heads, w, s.head_dim), "float32"),
                                       ("zeros", (s.kv_heads, w, s.head_dim), "float32"),
                                       ("zeros", (s.kv_heads, w, s.head_dim), "float32")))
        for w in ws if w <= s.max_context) + tuple(
        Probe(table, rope_table_features(s, w), (("arange", w, 100),
                                                 ("zeros", (w, s.head_dim), "float32")))
        for w in ws), cache))

    # Launch latency: the smallest linear kernel timed back to back (batched, as every other
    # probe) and with a synchronisation after each call, as a split op on a discrete unit
    # runs it (the host waits for its share before the concat).
    full = s.linear_dims("o")[0]
    small = linear_kernel("o", full, 1)
    small_args = linear_args(s, "o", full, 1, fmt("o"), opts.rotate_bytes)
    feats = dataclasses.replace(linear_features(s, "o", 1), op="launch")
    groups.append(ProbeGroup("launch", tuple(
        Probe(small, dataclasses.replace(feats, kind=mode), small_args)
        for mode in LAUNCH_MODES)))

    norm = kernel("rms_norm", ops.rms_norm, s.hidden, 1e-5)
    silu = kernel(ACTIVATION_KERNELS[s.activation], ops.ACTIVATIONS[s.activation],
                  s.intermediate)
    amax = kernel("argmax", ops.argmax, s.vocab)
    hfmt = head_dtype(wdtype)
    if is_quant(hfmt):
        embed = kernel(f"embed_{hfmt}", quant.embed_quant, s.vocab, s.hidden, hfmt)
        table = ("quant", (s.vocab, s.hidden), hfmt, 1)
    else:
        embed = kernel("embed", ops.embed, s.vocab, s.hidden, wdtype)
        b = ops.pack_block(s.vocab)
        table = ("rand", (s.vocab // b, s.hidden, b), wdtype, 0.05, 1)
    groups += [
        ProbeGroup("rms_norm", tuple(Probe(norm, rms_norm_features(s, w), (
            ("rand", (w, s.hidden), "float32", 0.05, 1), ("rand", (s.hidden,), "float32", 0.05, 1),
            ("zeros", (w, s.hidden), "float32"))) for w in ws)),
        ProbeGroup("silu_mul", tuple(Probe(silu, silu_mul_features(s, w), (
            ("rand", (w, 2 * s.intermediate), "float32", 0.05, 1),
            ("zeros", (w, s.intermediate), "float32"))) for w in ws)),
        ProbeGroup("argmax", tuple(Probe(amax, argmax_features(s, w), (
            ("rand", (w, s.vocab), "float32", 0.05, 1), ("zeros", (w,), "int32"))) for w in ws)),
        ProbeGroup("embed", tuple(Probe(embed, embed_features(s, w), (
            ("randint", w, s.vocab, 8), table, ("zeros", (w, s.hidden), "float32")))
            for w in ws)),
        ProbeGroup("copy", tuple(Probe(None, copy_features(w, n), (("copy", w, n),))
                                 for n in (s.hidden, 2 * s.intermediate, s.vocab) for w in ws)),
    ]
    if s.post_norms:  # Gemma: the residual norms after attention and the MLP
        res_norm = kernel("rms_norm_res", ops.rms_norm, s.hidden, 1e-6, residual=True)
        groups.append(ProbeGroup("rms_norm_res", tuple(Probe(
            res_norm, rms_norm_features(s, w, residual=True), (
                ("rand", (w, s.hidden), "float32", 0.05, 1),
                ("rand", (s.hidden,), "float32", 0.05, 1),
                ("rand", (w, s.hidden), "float32", 0.05, 1),
                ("zeros", (w, s.hidden), "float32"))) for w in ws)))
    if s.qk_norm:  # Gemma: the per-head q/k norm before RoPE
        qk = kernel("qk_norm", script_ops.qk_norm, s.heads, s.kv_heads, s.head_dim, 1e-6)
        groups.append(ProbeGroup("qk_norm", tuple(Probe(qk, qk_norm_features(s, w), (
            ("rand", (w, s.qkv_size), "float32", 0.05, 1),
            ("rand", (s.head_dim,), "float32", 0.05, 1),
            ("rand", (s.head_dim,), "float32", 0.05, 1),
            ("zeros", (w, s.qkv_size), "float32"))) for w in ws)))
    return groups, kernels


def probe_tree(width: int) -> Tree:
    """The tree the sparse-attention probes run: node i's parent is ``(i - 1) // 4``, 1-4
    levels deep up to W = 64, as the Medusa trees the compiler builds (the features record
    its mask non-zeros, so the cost model learns per ancestor count)."""
    return Tree(tuple((i - 1) // 4 if i else -1 for i in range(width)), (-1,) * width,
                (1.0,) * width)


def attention_probes(s: ModelShape, opts: ProfileOptions, kernel, cache, exact: bool = False
                     ) -> list[ProbeGroup]:
    """The attention kernels at the widths verify runs each (:mod:`hetcomp.decoder`): the
    fused masked kernel at the fused widths, the dense part (per cache length), the sparse
    part (over :func:`probe_tree`) and the merge at the others; on GPUs also the CUDA-graph
    build's ``tree_attention`` at every width. ``exact`` (quantized weights): also the fused
    kernel at the other widths, where a one-unit build on int8 activations runs it
    (:attr:`ProbeGroup.int8_only`)."""
    from ..kernels import ops, script_ops, sparse_attention

    h, g, d, nl, c = s.heads, s.kv_heads, s.head_dim, s.layers, s.max_context
    kv = "float16" if s.kv_bytes == 2 else "float32"  # the cache's element type

    def q(w):
        return ("rand", (h, w, d), "float32", 0.5, 1)

    def part(w):  # a part's output with its log-sum-exp
        return ("zeros", (w, h, d + 1), "float32")

    fused = [w for w in opts.widths if w in FUSED_WIDTHS]
    split = [w for w in opts.widths if w not in FUSED_WIDTHS]
    fused_probes, exact_probes, dense_probes = [], [], []
    for cl in sorted(opts.cache_lens):
        for w in fused + (split if exact else []):
            if cl + w <= c:
                f = kernel(f"attention_w{w}", ops.attention, h, g, d, nl, c, rows=w,
                           kv_dtype=kv)
                (fused_probes if w in fused else exact_probes).append(Probe(
                    f, attention_features(s, w, cl), (
                        q(w), ("shared", "kc"), ("shared", "vc"), ("tril", w), ("mod", nl),
                        ("int", cl), ("zeros", (w, h, d), "float32"))))
        for w in split:
            if cl + w <= c:
                f = kernel(f"attention_dense_w{w}", ops.attention, h, g, d, nl, c, rows=w,
                           part="dense", kv_dtype=kv)
                dense_probes.append(Probe(f, dense_attention_features(s, w, cl), (
                    q(w), ("shared", "kc"), ("shared", "vc"), ("mod", nl), ("int", cl),
                    part(w))))
    sparse = kernel("sparse_tree_attention", sparse_attention.sparse_tree_attention, h, g, d)
    merge = {w: kernel(f"attention_merge_w{w}", ops.attention_merge, h, d, rows=w)
             for w in split}
    tree_probes = []
    for w in split:
        nnz = int(probe_tree(w).mask().sum())
        tree_probes.append(Probe(sparse, sparse_attention_features(s, w, nnz), (
            q(w), ("rand", (g, w, d), "float32", 0.5, 1), ("rand", (g, w, d), "float32", 0.5, 1),
            ("tree_csr", w, 0), ("tree_csr", w, 1), part(w))))
        tree_probes.append(Probe(merge[w], merge_features(s, w), (
            ("rand", (w, h, d + 1), "float32", 0.5, 1), ("rand", (w, h, d + 1), "float32", 0.5, 1),
            ("zeros", (w, h, d), "float32"))))
    # The CUDA-graph build's attention, at every width (it serves them all): a chain tree
    # (causal mask) after cl keys, so positions[0], the length it reads, is cl; the qkv rows
    # and their RoPE table (it rotates them and writes the tree's K/V into the caches).
    # Gemma's kernel norms the q/k heads too (two gammas after the table).
    eps = 1e-6 if s.qk_norm else None
    device = kernel("tree_attention", script_ops.tree_attention, h, g, d, nl, c, kv_dtype=kv,
                    qk_norm_eps=eps)
    gammas = (("rand", (d,), "float32", 1.0, 1),) * 2 if s.qk_norm else ()
    device_probes = [Probe(device, tree_attention_features(s, w, cl), (
        ("rand", (w, s.qkv_size), "float32", 0.5, 1), ("rand", (w, d), "float32", 1.0, 1),
        *gammas, ("shared", "kc"), ("shared", "vc"), ("tril", w), ("arange", w, cl),
        ("mod", nl), ("zeros", (w, h, d), "float32")))
        for cl in sorted(opts.cache_lens) for w in opts.widths if cl + w <= c]
    groups = [ProbeGroup("attention (fused)", tuple(fused_probes), cache)] if fused_probes else []
    if exact_probes:
        groups.append(ProbeGroup("attention (fused, exact builds)", tuple(exact_probes), cache,
                                 int8_only=True))
    if device_probes:
        groups.append(ProbeGroup("tree_attention (CUDA-graph build)", tuple(device_probes),
                                 cache, gpu_only=True))
    if dense_probes:
        groups.append(ProbeGroup("attention dense part", tuple(dense_probes), cache))
    if tree_probes:
        groups.append(ProbeGroup("attention sparse part + merge", tuple(tree_probes), cache))
    return groups


# ---- kits: the probe kernels compiled for one unit ------------------------------------------

KIT_FORMAT = "hetcomp-profile-kit/1"


#: The CPU targets a kit can be built for (``--target``; ``cuda`` names no CPU).
KIT_CPU_TARGETS = tuple(t for t in TARGET_NAMES if t != "cuda")


def probe_target(unit_name: str, cpu_target: str = "host",
                 cuda_arch: str = DEFAULT_CUDA_ARCH) -> dict:
    """The target a unit's probe kernels are compiled for: the kit's CPU ``cpu_target`` (a
    named target, ``x86-64-v3`` for a kit that travels) for ``cpu``; for ``cuda``, CUDA of
    ``cuda_arch`` driven by that same CPU (its host code runs there)."""
    if cpu_target not in KIT_CPU_TARGETS:
        raise HetcompError(f"--target {cpu_target} is not a CPU target: a kit's --target names "
                           f"the CPU that measures it ({' | '.join(KIT_CPU_TARGETS)}); a cuda "
                           "unit's probes are compiled for CUDA anyway")
    cpu = host_part(target_dict(cpu_target))
    if unit_name == "cuda":
        return {**target_dict("cuda", check_cuda_arch(cuda_arch)), "host": cpu}
    return cpu


def has_int8_kernels(target: dict) -> bool:
    """Whether a unit of ``target`` runs quantized linears on int8 activations in one-unit
    builds (a CPU with VNNI / sdot: :func:`hetcomp.schedules.int8_dot.has_int8_dot`), so
    that its probe library has the :attr:`ProbeGroup.int8_only` kernels."""
    from .._tvm import compiler
    from ..schedules.int8_dot import has_int8_dot

    return has_int8_dot(compiler().Target(dict(target)))


def schedule_probes(target: dict, kernels: dict[str, Callable[[], object]],
                    int8: frozenset[str] = frozenset()):
    """The probe kernels as one scheduled IRModule for ``target`` (CPU rules for LLVM
    targets, GPU rules otherwise: exactly how the model's kernels are scheduled). Quantized
    linears dequantize, as a partitioned plan's do; those named in ``int8``
    (:func:`int8_kernels`) take int8 activations where :func:`has_int8_kernels`, and are
    left out elsewhere."""
    from .._tvm import compiler
    from ..codegen.build import schedule_module
    from ..schedules.int8_dot import has_int8_dot

    c = compiler()
    tgt = c.Target(dict(target))
    with_int8 = has_int8_dot(tgt)  # (has_int8_kernels, on the Target already made)

    def module(names):
        return c.IRModule({name: kernels[name]().with_attr("global_symbol", name)
                           for name in names})

    mod = schedule_module(module([n for n in kernels if n not in int8]), tgt, int8_dot=False)
    if with_int8 and int8:
        mod.update(schedule_module(module(sorted(int8)), tgt))
    return mod


def build_probe_library(unit_name: str, target: dict, kernels: dict[str, Callable[[], object]],
                        progress: Progress | None = None, int8: frozenset[str] = frozenset()):
    """Compile the probe kernels for ``target`` into one runtime module
    (:func:`schedule_probes`)."""
    from .._tvm import compiler

    c = compiler()
    say = progress or _stderr
    t0 = time.time()
    mod = schedule_probes(target, kernels, int8)
    tgt = c.Target(dict(target))
    lib = c.compile(mod, target=tgt)
    say(f"[profile {unit_name}] compiled {len(mod.functions_items())} probe kernels in "
        f"{time.time() - t0:.0f}s")
    return lib


def is_kit(path: str) -> bool:
    """True when ``path`` holds a profile kit (``kit.json`` of :data:`KIT_FORMAT`)."""
    return holds_format(path, "kit.json", KIT_FORMAT)


def build_kit(out_dir: str, units: Iterable[str], shape: ModelShape, model: str,
              opts: ProfileOptions = ProfileOptions(), wdtype: str = "float32",
              cpu_target: str = "host", progress: Progress | None = None,
              force: bool = False, cuda_arch: str = DEFAULT_CUDA_ARCH) -> str:
    """Write a profile kit: ``kit.json`` (shape, options, probes) and ``<unit>.so`` per unit
    (a cuda unit's: CUDA source for ``cuda_arch``, compiled for it where the kit loads).

    ``hetcomp profile --kit DIR`` measures it with the TVM runtime only, where the units are.
    An existing kit at ``out_dir`` is replaced only with ``force``; anything else is refused.
    """
    # Refused before the work: a target that names no CPU, a cross linker that is missing.
    targets = {name: probe_target(name, cpu_target, cuda_arch) for name in units}
    fcompile = export_compiler(cpu_target)  # every library's host code runs on that CPU
    groups, kernels = plan_probes(shape, opts, wdtype)
    with output_dir(out_dir, is_kit, "profile kit", force) as tmp:
        libs = {}
        for name, target in targets.items():
            build_probe_library(name, target, kernels, progress,
                                int8_kernels(groups)).export_library(
                os.path.join(tmp, f"{name}.so"), fcompile=fcompile)
            # "cpu": what the CPU that loads it must have (a GPU library's host code too);
            # "int8_dot": it has the int8-only groups' kernels
            libs[name] = {"target": target, "library": f"{name}.so",
                          "cpu": cpu_requirements([target]),
                          "int8_dot": has_int8_kernels(target)}
        with open(os.path.join(tmp, "kit.json"), "w") as fh:
            json.dump({"format": KIT_FORMAT, "model": model, "wdtype": wdtype,
                       "shape": dataclasses.asdict(shape), "options": dataclasses.asdict(opts),
                       "units": libs, "groups": [g.to_json() for g in groups]}, fh)
    return os.path.abspath(out_dir)


def read_kit(path: str) -> dict:
    """A profile kit's ``kit.json``, checked: every key its readers use (``model``,
    ``units`` with each library's target and file, ``options``, ``groups``) is there and of
    its type, so a damaged or foreign kit is one line naming the key, not a traceback."""
    try:
        with open(os.path.join(path, "kit.json"), "rb") as fh:
            kit = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise HetcompError(f"not a profile kit: {path} ({str(e).splitlines()[0]})") from None
    if not isinstance(kit, dict) or kit.get("format") != KIT_FORMAT:
        raise HetcompError(f"not a profile kit (format is not {KIT_FORMAT}): {path}")

    def bad(key: str, want: str):
        return HetcompError(f"profile kit {path}: kit.json's {key!r} is missing or not {want}")

    if not isinstance(kit.get("model"), str):
        raise bad("model", "a string")
    units = kit.get("units")
    if not isinstance(units, dict) or not units:
        raise bad("units", "an object naming each unit's library")
    for name, info in units.items():
        key = f"units.{name}"
        if not isinstance(info, dict):
            raise bad(key, "an object")
        target = info.get("target")
        if not isinstance(target, dict) or not isinstance(target.get("kind"), str):
            raise bad(f"{key}.target", "a target object with a 'kind'")
        lib = info.get("library")
        # a file of the kit itself: a name, never a path that leaves the folder
        if not isinstance(lib, str) or lib in ("", ".", "..") or os.path.basename(lib) != lib:
            raise bad(f"{key}.library", "a file name in the kit")
        cpu = info.get("cpu", {"arch": "", "features": []})  # (older kits have none)
        if (not isinstance(cpu, dict) or not isinstance(cpu.get("arch"), str)
                or not isinstance(cpu.get("features"), list)
                or not all(isinstance(f, str) for f in cpu["features"])):
            raise bad(f"{key}.cpu", "an object with 'arch' and a list of 'features'")
        if not isinstance(info.get("int8_dot", False), bool):  # (older kits have none)
            raise bad(f"{key}.int8_dot", "true or false")
    _kit_probes(path, kit)
    return kit


@dataclasses.dataclass(frozen=True)
class Kit:
    """A profile kit: its folder and its ``kit.json``, read and checked once (:meth:`open`)."""

    path: str
    meta: dict

    @classmethod
    def open(cls, path: str) -> Kit:
        return cls(path, read_kit(path))


def _kit_probes(path: str, kit: dict) -> tuple[ProfileOptions, list[ProbeGroup]]:
    """A kit's options and probe groups, parsed (one line naming the key when they do not)."""
    try:
        opts = kit["options"]
        if not isinstance(opts, dict):
            raise TypeError("not an object")
        opts = ProfileOptions(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in opts.items()})
        if opts.mode not in ("quick", "full"):
            raise ValueError(f"mode {opts.mode!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise HetcompError(f"profile kit {path}: kit.json's 'options' is missing or not "
                           f"profile options ({type(e).__name__}: {e})") from None
    try:
        groups = kit["groups"]
        if not isinstance(groups, list):
            raise TypeError("not a list")
        groups = [ProbeGroup.from_json(g) for g in groups]
        for g in groups:
            if not isinstance(g.desc, str) or not all(
                    isinstance(p.func, str | None) for p in g.probes):
                raise TypeError(f"group {g.desc!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise HetcompError(f"profile kit {path}: kit.json's 'groups' is missing or not probe "
                           f"groups ({type(e).__name__}: {e})") from None
    return opts, groups


# ---- running probes (TVM runtime only) ------------------------------------------------------


class _Runner:
    """Creates a probe group's buffers on the unit's device and returns ``call(i)`` per probe."""

    def __init__(self, lib, device):
        self.tvm, self.lib, self.dev = _tvm, lib, device
        self.host = _tvm.cpu()
        self.rng = np.random.default_rng(0)
        self._funcs: dict[str, object] = {}
        self.rotate_factor = 1

    def fit_rotation(self, rotate_bytes: int) -> None:
        """Scale the weight rotation to 4x this host's last-level caches (a kit built
        elsewhere cannot know them; a server's L3 can exceed the kit's rotation, and weights
        timed from cache make a decode step look several times faster than it is)."""
        if self.dev.dlpack_device_type() == self.host.dlpack_device_type():
            self.rotate_factor = max(1, math.ceil(4 * last_level_cache_bytes() / rotate_bytes))

    def func(self, name):
        if name not in self._funcs:
            self._funcs[name] = self.lib[name]
        return self._funcs[name]

    def _tensor(self, arr):
        return self.tvm.tensor(np.ascontiguousarray(arr), self.dev)

    def _make(self, spec, shared, cache):
        """A list of buffers (rotated per call), an int function of i, or a constant."""
        kind = spec[0]
        if kind == "shared":
            return shared[spec[1]]
        key = json_key(spec)
        if key in cache:
            return cache[key]
        if kind == "rand":
            _, shape, dtype, scale, copies = spec
            a = (self.rng.standard_normal(tuple(shape)) * scale).astype(dtype)
            if copies > 1:  # rotated weights: make sure they exceed this host's caches
                copies = min(4096, copies * self.rotate_factor)
            val = [self._tensor(a) for _ in range(int(copies))]
        elif kind == "quant":  # one valid weight, its copies rotated as "rand"'s
            _, (n, k), qtype, copies = spec
            m = QuantMatrix.quantize(self.rng.standard_normal((n, k)).astype("float32"), qtype)
            if copies > 1:
                copies = min(4096, copies * self.rotate_factor)
            val = [self._tensor(pack_quant_weight(m)) for _ in range(int(copies))]
        elif kind == "zeros":
            val = [self._tensor(np.zeros(tuple(spec[1]), spec[2]))]
        elif kind == "tril":
            val = [self._tensor(np.tril(np.ones((spec[1], spec[1]), "int32")))]
        elif kind == "arange":
            val = [self._tensor(np.arange(spec[1], dtype="int32") + spec[2])]
        elif kind == "tree_csr":  # (row_ptr, col_idx)[spec[2]] of probe_tree(spec[1])
            val = [self._tensor(probe_tree(spec[1]).csr()[spec[2]])]
        elif kind == "randint":
            val = [self._tensor(self.rng.integers(0, spec[2], spec[1]).astype("int32"))
                   for _ in range(int(spec[3]))]
        elif kind == "mod":
            val = ("mod", int(spec[1]))
        elif kind == "int":
            val = ("int", int(spec[1]))
        else:
            raise HetcompError(f"unknown probe argument {spec!r}")
        cache[key] = val
        return val

    def setup(self, probe: Probe, shared, cache) -> Callable[[int], object]:
        if probe.func is None:  # host <-> unit copy of [w, n] float32
            _, w, n = probe.args[0]
            src = (self.rng.standard_normal((w, n))).astype("float32")
            if self.dev.dlpack_device_type() == self.host.dlpack_device_type():
                a, b = self._tensor(src), self._tensor(np.zeros_like(src))
                return lambda i: b.copyfrom(a)
            dev = self._tensor(np.zeros_like(src))

            def round_trip(i):  # to the unit and back: what a split op pays
                dev.copyfrom(src)
                return dev.numpy()
            return round_trip
        f = self.func(probe.func)
        vals = [self._make(a, shared, cache) for a in probe.args]

        def pick(v, i):
            if isinstance(v, tuple):
                return i % v[1] if v[0] == "mod" else v[1]
            return v[i % len(v)]
        return lambda i: f(*[pick(v, i) for v in vals])

    def check_linear(self, probe: Probe, shared, cache) -> float:
        """Relative error of a linear probe's kernel against numpy (the kernel measured must
        compute the right thing: a unit's kernels are first run here on its device)."""
        from ..kernels.ops import unpack_linear_weight

        vals = [self._make(a, shared, cache) for a in probe.args]
        args = [v[0] for v in vals]
        self.func(probe.func)(*args)
        got = args[-1].numpy()
        packed = args[1].numpy()
        if packed.dtype == np.uint8:  # GGUF blocks (probe spec "quant"), decoded by gguf
            w = unpack_quant_weight(packed, probe.args[1][2]).dequantize()
        else:
            w = unpack_linear_weight(packed.astype("float32"))
        x = args[0].numpy()
        res = args[2].numpy() if len(args) == 4 else 0.0
        # A linear_int8 probe computes with int8-rounded inputs (or with float ones where its
        # weight's panels leave the dequantizing kernel in place: int8_dot.eligible); every
        # other linear with float ones.
        inputs = [x, int8_rounded(x)] if probe.features.op == "linear_int8" else [x]
        want = [xi @ w.T + res for xi in inputs]
        return min(float(np.abs(got - wi).max() / max(np.abs(wi).max(), 1e-30)) for wi in want)

    def shared(self, group: ProbeGroup, cache):
        return {k: self._make(spec, {}, cache) for k, spec in group.shared}


def last_level_cache_bytes() -> int:
    """Total last-level cache of this machine: per distinct cache (shared_cpu_list) of the
    highest level in sysfs; 0 if unknown."""
    root = "/sys/devices/system/cpu"
    seen, total, level = set(), 0, 0
    try:
        cpus = [d for d in os.listdir(root) if d.startswith("cpu") and d[3:].isdigit()]
    except OSError:
        return 0
    for cpu in cpus:
        cdir = os.path.join(root, cpu, "cache")
        for idx in os.listdir(cdir) if os.path.isdir(cdir) else []:
            p = os.path.join(cdir, idx)
            try:
                with open(os.path.join(p, "level")) as fh:
                    lv = int(fh.read())
                with open(os.path.join(p, "size")) as fh:
                    txt = fh.read().strip()
                with open(os.path.join(p, "shared_cpu_list")) as fh:
                    shared = fh.read().strip()
                unit = {"K": 1 << 10, "M": 1 << 20}.get(txt[-1:], 1)
                size = int(txt[:-1] if unit > 1 else txt) * unit
            except (OSError, ValueError):
                continue  # not a cache entry (uevent)
            if lv > level:
                seen, total, level = set(), 0, lv
            if lv == level and shared not in seen:
                seen.add(shared)
                total += size
    return total


def json_key(spec) -> str:
    return json.dumps(spec)


def _synced(call, dev):
    def run(i):
        out = call(i)
        dev.sync()
        return out
    return run


def measure_groups(unit: Unit, lib, groups: list[ProbeGroup], opts: ProfileOptions,
                   progress: Progress | None = None) -> list[Measurement]:
    """Time every probe of ``groups`` on ``unit`` (alone, and co-run if ``opts.corun``).

    Buffers live one group at a time; progress lines go to ``progress`` (stderr by default).
    """
    say = progress or _stderr
    dev_type, dev_id = unit.device.split(":")
    dev = _tvm.device(dev_type, int(dev_id))
    runner = _Runner(lib, dev)
    runner.fit_rotation(opts.rotate_bytes)
    rows: list[Measurement] = []
    t_start = time.time()
    layout = (corun_layout(dev_type, _tvm.cpu_pool_threads(), _tvm.cpu_pool_core_order(),
                           _allowed_cores()) if opts.corun else None)
    corun = layout is not None and layout.possible
    if layout is not None:
        say(_layout_line(unit.name, layout))
    with (CoRunLoad(layout.load_core) if corun else _NoLoad()) as load:
        for gi, group in enumerate(groups):
            if group.gpu_only and dev_type == "cpu":
                continue
            cache: dict = {}
            shared = runner.shared(group, cache)
            calls = []
            for p in group.probes:
                call = runner.setup(p, shared, cache)
                synced = p.features.op == "launch" and p.features.kind == "synced"
                calls.append(_synced(call, dev) if synced else call)
            worst = max((runner.check_linear(p, shared, cache) for p in group.probes
                         if p.features.op in LINEAR_OPS), default=0.0)
            if worst > 1e-4:
                raise HetcompError(f"{group.desc} on {unit.name} differs from numpy (relative "
                                   f"error {worst:.1e}): not measuring a wrong kernel")
            if any(p.features.op in LINEAR_OPS for p in group.probes):
                time.sleep(BLAS_PARK_S)  # numpy's BLAS threads spin after the check
            alone = time_calls(calls, opts.min_time_s, opts.rounds, sync=dev.sync)
            timed = [(False, alone)]
            if corun:
                timed.append((True, _corun_times(calls, alone, opts, dev.sync, load, layout)))
            for beside, times in timed:
                for p, (sec, ncalls) in zip(group.probes, times, strict=True):
                    rows.append(Measurement(unit.name, p.features.with_corun(beside), sec,
                                            ncalls))
            done = [[sec for sec, _ in times] for _, times in timed]
            shown = " ".join(f"{1e3 * t:.3g}" for t in done[0])
            slow = (f", co-run x{statistics.median(np.divide(done[1], done[0])):.2f}"
                    if corun else "")
            say(f"[profile {unit.name} {gi + 1}/{len(groups)} {time.time() - t_start:5.0f}s]"
                f" {group.desc}: {shown} ms{slow}")
    return rows


def measure_unit(unit: Unit, shape: ModelShape, opts: ProfileOptions = ProfileOptions(),
                 wdtype: str = "float32", progress: Progress | None = None
                 ) -> list[Measurement]:
    """Compile the probe kernels for ``unit`` here and measure them (the one-machine path)."""
    groups, kernels = plan_probes(shape, opts, wdtype)
    lib = build_probe_library(unit.name, unit.target, kernels, progress, int8_kernels(groups))
    groups = unit_groups(groups, has_int8_kernels(unit.target))
    return measure_groups(unit, lib, groups, opts, progress)


def _corun_times(calls, alone, opts: ProfileOptions, sync, load: CoRunLoad,
                 layout: CoRunLayout) -> list[tuple[float, int]]:
    """Each call's seconds and call count beside the load (see :class:`CoRunLayout`)."""
    def beside_load():
        load.resume()
        try:
            return time_calls(calls, opts.min_time_s, opts.rounds, sync=sync)
        finally:
            load.pause()

    if layout.threads is None:
        return beside_load()
    with _tvm.cpu_pool_limited(layout.threads):
        short = time_calls(calls, opts.min_time_s, opts.rounds, sync=sync)
        beside = beside_load()
    return [(a * b / s, n) for (a, _), (s, _), (b, n) in zip(alone, short, beside, strict=True)]


def _allowed_cores() -> set[int] | None:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None


def _layout_line(unit: str, layout: CoRunLayout) -> str:
    if not layout.possible:
        return f"[profile {unit}] one core: no co-run timing (the load would share it)"
    where = "unpinned" if layout.load_core is None else f"on core {layout.load_core}"
    if layout.threads is None:
        return f"[profile {unit}] co-run load {where}"
    return (f"[profile {unit}] co-run load {where}; slowdown timed one pool thread short "
            f"({layout.threads}), applied to the whole pool's time")


class _NoLoad:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def pause(self):
        pass

    def resume(self):
        pass


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class ProfileResult:
    """The rows of a unit's profile and whether they were reused from the database."""

    unit: Unit
    rows: list
    reused: bool
    mode: str


def kit_units(kit: Kit, units: Iterable[str] | None = None) -> dict[str, Unit]:
    """The units of a profile kit (``units``: some of them) found here, each with the
    fingerprint its library's target gives; one line for a unit the kit lacks, or this
    machine does, or whose CPU extensions it lacks (before anything is measured)."""
    kit_dir, libraries = kit.path, kit.meta["units"]
    found = {}
    for name in units or list(libraries):
        if name not in libraries:
            raise HetcompError(f"profile kit {kit_dir} has no library for unit {name!r}")
        info = libraries[name]
        kind = info["target"]["kind"]
        if (kind == "cuda") != (name == "cuda"):
            raise HetcompError(f"the {name} probe library of {kit_dir} is built for {kind}, "
                               f"not for the {name} unit: rebuild the kit")
        if "cpu" in info:  # (older kits: the library's load is the only check)
            check_cpu(info["cpu"], f"the {name} probe library of {kit_dir}")
        found[name] = detect_unit(name, target=info["target"])
    return found


def load_kit_libraries(kit: Kit, units: Iterable[str]) -> dict[str, object]:
    """Each of ``units``' probe library of a kit, loaded (one line for one that is missing
    or does not load here; a cuda library's CUDA source compiled for the GPU the kit was
    built for): what a measurement needs, checked before a database is made."""
    kit_dir, libs = kit.path, {}
    for name in units:
        info = kit.meta["units"][name]
        path = os.path.join(kit_dir, info["library"])
        if not os.path.isfile(path):
            raise HetcompError(f"profile kit {kit_dir} lacks its {name} probe library "
                               f"{info['library']}")
        try:
            _tvm.ensure_backend(info["target"]["kind"])
            with _tvm.cuda_arch(info["target"].get("arch")):
                libs[name] = _tvm.load_module(path)
        except Exception as e:
            raise HetcompError(f"cannot load the {name} probe library of {kit_dir}: "
                               f"{str(e).splitlines()[-1] if str(e) else e}") from None
    return libs


def profile_kit(kit: Kit, db: ProfileDB, units: Iterable[str] | None = None,
                force: bool = False, progress: Progress | None = None,
                found: dict[str, Unit] | None = None,
                libs: dict[str, object] | None = None) -> dict:
    """Measure a profile kit's units present here into ``db`` (TVM runtime only); ``found``
    and ``libs``: their :func:`kit_units` and :func:`load_kit_libraries`, when the caller
    looked them up already (before making the database).

    Returns per unit its fingerprint (taken here, with the kit's target), row count and
    whether a stored profile was reused.
    """
    opts, groups = _kit_probes(kit.path, kit.meta)
    # HETCOMP_PROFILE_SKIP: op classes left out (comma-separated group names), e.g. a kernel
    # that crashes a unit's driver; the cost model falls back to the roofline for them.
    skip = {x for x in os.environ.get("HETCOMP_PROFILE_SKIP", "").split(",") if x}
    groups = [g for g in groups if g.desc.split(" ")[0] not in skip]
    found = found if found is not None else kit_units(kit, units)
    libs = libs if libs is not None else load_kit_libraries(kit, found)
    model, out = kit.meta["model"], {}
    for name, unit in found.items():
        digest = unit.fingerprint.digest
        if not force and db.is_complete(digest, model, opts.mode):
            (progress or _stderr)(f"[profile {name}] reusing profile {digest} from {db.path}")
            out[name] = {"fingerprint": unit.fingerprint.to_json(), "reused": True,
                         "measurements": len(db.measurements(digest, model)),
                         "mode": db.complete_mode(digest, model)}
            continue
        int8 = bool(kit.meta["units"][name].get("int8_dot", False))
        rows = measure_groups(unit, libs[name], unit_groups(groups, int8), opts, progress)
        db.store(unit.to_json(), digest, model, opts.mode, rows)
        out[name] = {"fingerprint": unit.fingerprint.to_json(), "reused": False,
                     "measurements": len(rows), "mode": opts.mode}
    return out


def profile_unit(unit: Unit, shape: ModelShape, db: ProfileDB, model: str,
                 opts: ProfileOptions = ProfileOptions(), wdtype: str = "float32",
                 force: bool = False, progress: Progress | None = None) -> ProfileResult:
    """The unit's profile for ``model``: reused from ``db`` if its fingerprint matches.

    A quick request is satisfied by a stored full profile; ``force`` always re-measures.
    """
    digest = unit.fingerprint.digest
    if not force and db.is_complete(digest, model, opts.mode):
        mode = db.complete_mode(digest, model)
        (progress or _stderr)(f"[profile {unit.name}] reusing {mode} profile {digest} "
                              f"from {db.path}")
        return ProfileResult(unit, db.measurements(digest, model), True, mode)
    rows = measure_unit(unit, shape, opts, wdtype, progress)
    db.store(unit.to_json(), digest, model, opts.mode, rows)
    return ProfileResult(unit, rows, False, opts.mode)
