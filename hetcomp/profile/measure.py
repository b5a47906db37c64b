"""Measure the project's own compiled kernels, per op class, with the model's real shapes.

Every kernel is built from :mod:`hetcomp.frontend.ops` / :mod:`~hetcomp.frontend.script_ops`,
scheduled by the unit's rules (``ApplyDefaultSchedule`` inside the target) and compiled
with ``tvm.compile``, exactly as the model is. Times come from many back-to-back calls in a
Python loop under ``time.perf_counter`` (``time_evaluator`` showed a spurious ~1.5 ms for
multi-threaded kernels on the development VM). Weights rotate through enough copies to exceed
the last-level cache, and attention rotates through the layers of a full-size KV cache, so
each call reads from DRAM as it does inside a decode step.

Each shape is measured alone and while a concurrent memory-streaming load runs in another
process (the stand-in for another unit running its share on the same memory), so the co-run
slowdown is measured rather than assumed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from ..cost.roofline import (LINEAR_KINDS, Features, ModelShape, argmax_features,
                             attention_features, copy_features, embed_features,
                             linear_features, rms_norm_features, rope_features,
                             silu_mul_features, split_columns)
from ..errors import HetcompError
from .db import Measurement, ProfileDB
from .units import Unit

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
        Also measure every shape under the concurrent streaming load.
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


class CoRunLoad:
    """A memory-streaming process (numpy copies over 2 x 64 MB) that can be paused and resumed.

    Started once and kept stopped (SIGSTOP) while kernels are timed alone; resumed (SIGCONT)
    for the co-run timings. Use as a context manager.
    """

    _SOURCE = (
        "import sys, numpy as np\n"
        "a = np.ones(16 << 20, np.float32); b = np.empty_like(a)\n"
        "sys.stdout.write('ready\\n'); sys.stdout.flush()\n"
        "while True:\n"
        "    np.copyto(b, a); np.copyto(a, b)\n"
    )

    def __init__(self):
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> CoRunLoad:
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self._proc = subprocess.Popen([sys.executable, "-c", self._SOURCE],
                                      stdout=subprocess.PIPE, env=env)
        if self._proc.stdout.readline().strip() != b"ready":
            self.__exit__()
            raise HetcompError("the co-run streaming load failed to start")
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


def time_calls(calls: list[Callable[[int], object]], min_time_s: float, rounds: int
               ) -> list[tuple[float, int]]:
    """Seconds per call and call count for each kernel call in ``calls``.

    Each round times every call in turn for at least ``min_time_s`` of back-to-back calls;
    a call's time is its median round. Interleaving the rounds spreads a transient slowdown
    (another process, a descheduled vCPU) over one round of many shapes instead of every
    round of one. ``call(i)`` runs the kernel once; ``i`` counts up to rotate buffers.
    """
    for call in calls:
        call(0)  # warm-up: page in code and buffers
    per_round: list[list[float]] = [[] for _ in calls]
    counts = [0] * len(calls)
    for _ in range(rounds):
        for j, call in enumerate(calls):
            n, t0 = 0, time.perf_counter()
            while True:
                call(counts[j] + n + 1)
                n += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= min_time_s:
                    break
            per_round[j].append(elapsed / n)
            counts[j] += n
    return [(statistics.median(r), c) for r, c in zip(per_round, counts, strict=True)]


@dataclasses.dataclass
class _Bench:
    """One compiled kernel: per shape, its features and a ``setup()`` returning ``call(i)``."""

    desc: str
    shapes: list[tuple[Features, Callable[[], Callable[[int], object]]]]


class _Builder:
    """Builds the model's kernels for one unit (TVM imported here, not at module import)."""

    def __init__(self, unit: Unit, shape: ModelShape, opts: ProfileOptions, wdtype: str):
        from .._tvm import compiler, runtime

        if unit.name != "cpu":
            raise HetcompError(f"measuring unit {unit.name!r} needs its schedule rules; only "
                               "'cpu' has them (describe other units with a DeviceSpec)")
        self.c, self.rt = compiler(), runtime
        self.target = self.c.Target(unit.target)
        dev_type, dev_id = unit.device.split(":")
        self.dev = runtime.device(dev_type, int(dev_id))
        self.shape, self.opts, self.wdtype = shape, opts, wdtype
        self.rng = np.random.default_rng(0)

    def compile(self, func) -> Callable:
        from ..codegen.build import schedule_module

        mod = self.c.IRModule({"main": func.with_attr("global_symbol", "main")})
        mod = schedule_module(mod, self.target)
        return self.c.compile(mod, target=self.target)["main"]

    def t(self, arr) -> object:
        return self.rt.tensor(np.ascontiguousarray(arr), self.dev)

    def rand(self, shape, dtype="float32", scale=0.05):
        return self.t((self.rng.standard_normal(shape) * scale).astype(dtype))

    # ---- op classes -------------------------------------------------------------------------

    def linear(self, kind: str) -> Iterator[_Bench]:
        """One kernel per split width, built lazily (an LM head's rotated weights are large)."""
        from ..frontend import ops

        full, k, residual = self.shape.linear_dims(kind)
        for n in sorted({split_columns(full, r) for r in self.opts.ratios}):
            b = ops.pack_block(n)
            wbytes = n * k * np.dtype(self.wdtype).itemsize
            copies = max(1, min(4096, math.ceil(self.opts.rotate_bytes / wbytes)))
            w0 = (self.rng.standard_normal((n // b, k, b)) * 0.05).astype(self.wdtype)
            weights = [self.t(w0) for _ in range(copies)]

            def setup(w, weights=weights, n=n, k=k, copies=copies):
                # The width-specialised kernel, as verify_w{W} runs it (exact row tiles).
                f = self.compile(ops.linear(n, k, self.wdtype, residual, rows=w))
                x, y = self.rand((w, k)), self.t(np.zeros((w, n), "float32"))
                extra = (self.rand((w, n)),) if residual else ()
                return lambda i: f(x, weights[i % copies], *extra, y)

            shapes = [(linear_features(self.shape, kind, w, n / full), _bind(setup, w))
                      for w in self.opts.widths]
            yield _Bench(f"linear {kind} n={n}", shapes)

    def attention(self) -> list[_Bench]:
        from ..frontend import ops

        s = self.shape
        kc = self.rand((s.layers, s.kv_heads, s.head_dim, s.max_context), scale=0.5)
        vc = self.rand((s.layers, s.kv_heads, s.max_context, s.head_dim), scale=0.5)

        def setup(w, cl):
            f = self.compile(ops.attention(s.heads, s.kv_heads, s.head_dim, s.layers,
                                           s.max_context, rows=w))
            q = self.rand((s.heads, w, s.head_dim), scale=0.5)
            mask = self.t(np.tril(np.ones((w, w), "int32")))
            out = self.t(np.zeros((w, s.heads, s.head_dim), "float32"))
            return lambda i: f(q, kc, vc, mask, i % s.layers, cl, out)

        shapes = [(attention_features(s, w, cl), _bind(setup, w, cl))
                  for cl in sorted({0, *self.opts.cache_lens}) for w in self.opts.widths
                  if cl + w <= s.max_context]
        return [_Bench("attention", shapes)]

    def rope(self) -> list[_Bench]:
        from ..frontend import script_ops

        s = self.shape
        f = self.compile(script_ops.rope_kv(s.heads, s.kv_heads, s.head_dim, s.layers,
                                            s.max_context, 10000.0))
        kc = self.t(np.zeros((s.layers, s.kv_heads, s.head_dim, s.max_context), "float32"))
        vc = self.t(np.zeros((s.layers, s.kv_heads, s.max_context, s.head_dim), "float32"))

        def setup(w):
            qkv, pos = self.rand((w, s.qkv_size)), self.t(np.arange(w, dtype="int32") + 100)
            q = self.t(np.zeros((s.heads, w, s.head_dim), "float32"))
            return lambda i: f(qkv, pos, kc, vc, i % s.layers, 100, q)

        return [_Bench("rope", [(rope_features(s, w), _bind(setup, w))
                                for w in self.opts.widths])]

    def rowwise(self) -> list[_Bench]:
        from ..frontend import ops

        s = self.shape
        norm = self.compile(ops.rms_norm(s.hidden, 1e-5))
        silu = self.compile(ops.silu_mul(s.intermediate))
        amax = self.compile(ops.argmax(s.vocab))
        embed = self.compile(ops.embed(s.vocab, s.hidden, self.wdtype))
        gamma = self.rand((s.hidden,))
        b = ops.pack_block(s.vocab)
        table = self.rand((s.vocab // b, s.hidden, b), self.wdtype)

        def norm_setup(w):
            x, y = self.rand((w, s.hidden)), self.t(np.zeros((w, s.hidden), "float32"))
            return lambda i: norm(x, gamma, y)

        def silu_setup(w):
            gu = self.rand((w, 2 * s.intermediate))
            y = self.t(np.zeros((w, s.intermediate), "float32"))
            return lambda i: silu(gu, y)

        def amax_setup(w):
            logits, idx = self.rand((w, s.vocab)), self.t(np.zeros(w, "int32"))
            return lambda i: amax(logits, idx)

        def embed_setup(w):
            toks = [self.t(self.rng.integers(0, s.vocab, w).astype("int32")) for _ in range(8)]
            out = self.t(np.zeros((w, s.hidden), "float32"))
            return lambda i: embed(toks[i % 8], table, out)

        ws = self.opts.widths
        return [
            _Bench("rms_norm", [(rms_norm_features(s, w), _bind(norm_setup, w)) for w in ws]),
            _Bench("silu_mul", [(silu_mul_features(s, w), _bind(silu_setup, w)) for w in ws]),
            _Bench("argmax", [(argmax_features(s, w), _bind(amax_setup, w)) for w in ws]),
            _Bench("embed", [(embed_features(s, w), _bind(embed_setup, w)) for w in ws]),
        ]

    def copies(self) -> list[_Bench]:
        s = self.shape

        def setup(w, n):
            src, dst = self.rand((w, n)), self.t(np.zeros((w, n), "float32"))
            return lambda i: dst.copyfrom(src)

        shapes = [(copy_features(w, n), _bind(setup, w, n))
                  for n in (s.hidden, 2 * s.intermediate, s.vocab) for w in self.opts.widths]
        return [_Bench("copy", shapes)]


def _bind(fn, *args):
    return lambda: fn(*args)


def measure_unit(unit: Unit, shape: ModelShape, opts: ProfileOptions = ProfileOptions(),
                 wdtype: str = "float32", progress: Progress | None = None
                 ) -> list[Measurement]:
    """Measure every op class of ``shape`` on ``unit`` (alone, and co-run if ``opts.corun``).

    Kernels are built lazily, one op class at a time, so at most one class's buffers are
    alive; progress lines go to ``progress`` (stderr by default).
    """
    say = progress or _stderr
    builder = _Builder(unit, shape, opts, wdtype)
    groups: list[Callable[[], Iterable[_Bench]]] = [
        *[(lambda k=k: builder.linear(k)) for k in opts.kinds],
        builder.attention, builder.rope, builder.rowwise, builder.copies]
    rows: list[Measurement] = []
    t_start = time.time()
    with (CoRunLoad() if opts.corun else _NoLoad()) as load:
        for gi, group in enumerate(groups):
            for bench in group():
                done = []
                for corun in ((False, True) if opts.corun else (False,)):
                    if corun:
                        load.resume()
                    try:
                        timed = time_calls([setup() for _, setup in bench.shapes],
                                           opts.min_time_s, opts.rounds)
                    finally:
                        if corun:
                            load.pause()
                    for (feat, _), (sec, calls) in zip(bench.shapes, timed, strict=True):
                        rows.append(Measurement(unit.name, feat.with_corun(corun), sec, calls))
                        done.append(sec)
                k = len(bench.shapes)
                alone = " ".join(f"{1e3 * t:.3g}" for t in done[:k])
                slow = (f", co-run x{statistics.median(np.divide(done[k:], done[:k])):.2f}"
                        if opts.corun else "")
                say(f"[profile {unit.name} {gi + 1}/{len(groups)} {time.time() - t_start:5.0f}s]"
                    f" {bench.desc}: {alone} ms{slow}")
    return rows


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
