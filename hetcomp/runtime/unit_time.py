"""Per-unit busy time of a decode step, so that overlap between units is visible.

A heterogeneous step overlaps its units: GPU launches are asynchronous and the host computes
its share meanwhile (``OrderForOverlap``). To show how much, each unit's *busy* time is
measured separately: a VM instrument synchronises every device around each kernel call and
charges the call's time to the device its output lives on (cross-device copies to ``copy``).
The instrumented run is serial by construction, so ``sum(busy)`` is the step time without
overlap; the plain step time measured beside it is what the overlap achieves.

TVM runtime only (``VirtualMachine.set_instrument``).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import time

import numpy as np

from .. import _tvm

# VMInstrumentReturnKind.NO_OP: run the call normally.
_NO_OP = 0


@contextlib.contextmanager
def _compiled_calls(art):
    """The artifact's compiled step calls as they were, ``(verify by width, verify, commit,
    draft)``, put back after the block whatever it replaced them with."""
    saved = (dict(art._verify_static), art._verify, art._commit, art._medusa)
    try:
        yield saved
    finally:
        art._verify_static, art._verify, art._commit, art._medusa = saved


@contextlib.contextmanager
def gc_paused():
    """Timed decoding without the cyclic garbage collector, as ``timeit`` times (collected
    once before, re-enabled after). Importing TVM leaves ~240K long-lived objects, and one
    full collection over them took 171 ms here: rare in a decode (none in 24 held-out
    decodes), but on a GPU, where a step takes about a millisecond, one landing in a timed
    decode would be counted as that width's."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _device_name(dev) -> str:
    kind = {1: "cpu", 2: "cuda"}.get(int(dev.dlpack_device_type()), str(dev.dlpack_device_type()))
    return kind if int(dev.index) == 0 else f"{kind}:{int(dev.index)}"


class SyncTimer:
    """Synchronised seconds and calls per key while installed on a VM (an instrument): every
    device is synchronised around each call, so a call's time is its own. ``key`` names
    what a call is charged to; the default is the called function's symbol.

    Each timed interval also holds the timer's own work (leaving the instrument, the device
    syncs, the VM handing the call's arguments to it, entering it again): measured on
    :data:`PROBE`, a VM builtin without arguments that does nothing, :meth:`own_seconds` a
    call, and taken off every call's time by :meth:`net_seconds`. A call with arguments
    costs the timer more than the probe, so what is left is an upper bound: on the 2-core
    CPU here SmolLM2's float16 step charged its 335 tensor allocations 0.85 ms, 0.58 with
    the probe's ~0.6 us a call taken off, while a 30-layer model of tiny kernels spent 0.29
    ms a step in the VM altogether, its 275 kernel calls and allocations included
    (``benchmarks/vm_overhead.py``). On a GPU, whose kernels take a few microseconds, the
    syncs are most of a small kernel's timed interval."""

    #: KillAfterLastUse's builtin (it only drops a reference): its time is the timer's.
    PROBE = "vm.builtin.null_value"

    def __init__(self, devices, key=None):
        self.devices = list(devices)
        self.key = key or (lambda symbol, args: str(symbol))
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._probe = [0.0, 0]  # seconds, calls
        self._t0 = 0.0

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()
        self._probe = [0.0, 0]

    def __call__(self, func, symbol, before, ret, *args):
        for d in self.devices:
            d.sync()
        if before:
            self._t0 = time.perf_counter()
            return _NO_OP
        dt = time.perf_counter() - self._t0  # (before charging it to a key)
        k = self.key(symbol, args)
        self.seconds[k] = self.seconds.get(k, 0.0) + dt
        self.calls[k] = self.calls.get(k, 0) + 1
        if str(symbol) == self.PROBE:
            self._probe[0] += dt
            self._probe[1] += 1
        return _NO_OP

    def own_seconds(self) -> float:
        """The timer's own seconds in each timed call: the probe's mean (0 where the
        function never called it)."""
        seconds, calls = self._probe
        return seconds / calls if calls else 0.0

    def net_seconds(self) -> dict[str, float]:
        """Seconds per key without the timer's own (:meth:`own_seconds` a call, at least 0)."""
        own = self.own_seconds()
        return {k: max(0.0, t - own * self.calls[k]) for k, t in self.seconds.items()}


def _unit_of_call(symbol, args) -> str:
    """The unit a call's time belongs to: its output's device, or the copies between units."""
    if "to_device" in str(symbol) or "copy" in str(symbol):
        return "copy"
    tensors = [a for a in args if hasattr(a, "device") and hasattr(a, "shape")]
    if tensors:
        return _device_name(tensors[-1].device)
    return "host"  # VM builtins without tensors (shape bookkeeping)


def _verify_step(art, width: int, cache_len: int):
    """A function running one ``verify`` of the width's tree after ``cache_len`` tokens."""
    sess = art.new_session()
    sess.prefill(np.arange(1, cache_len + 1) % art.config.vocab_size)
    tree = art.tree(width)
    tokens = np.full(width, 5, "int32")
    positions = (sess.length + tree.depths).astype("int32")
    mask, csr = np.asarray(tree.mask(), "int32"), tree.csr()

    def one():
        t0 = time.perf_counter()
        ids, _, _ = sess.verify(tokens, positions, mask, csr)  # .numpy() synchronises
        return time.perf_counter() - t0, ids

    return one


def _breakdown(art, width: int, steps: int, cache_len: int, key=None):
    """Median plain seconds of ``verify`` at ``width``, then its synchronised seconds (the
    timer's own taken off, :meth:`SyncTimer.net_seconds`) and calls per key, each averaged
    per step, and the timer's own seconds a call.

    Runs after a prefill of ``cache_len`` tokens (ids 1..), on the width's compiled tree
    (positions, mask and CSR as the generator builds them); nothing is committed, so every step
    sees the same cache.
    """
    one = _verify_step(art, width, cache_len)
    one()
    plain = float(np.median([one()[0] for _ in range(steps)]))
    timer = SyncTimer(art.devices, key)
    art.vm.set_instrument(_tvm.ffi_function(timer))
    try:
        one()  # discarded warm call
        timer.clear()
        for _ in range(steps):
            one()
    finally:
        # None, not a Python no-op: a no-op still costs a Python call per VM call
        # (~2 us here, ~5 us on a 16-core Xeon), which slowed every later step.
        art.vm.set_instrument(None)
    return (plain, {k: t / steps for k, t in timer.net_seconds().items()},
            {k: c // steps for k, c in timer.calls.items()}, timer.own_seconds())


def kernel_breakdown(art, width: int = 1, steps: int = 8, cache_len: int = 64) -> dict:
    """Median plain step time and synchronised seconds per kernel (and VM builtin) of one
    ``verify`` at ``width``: where a step's time goes, kernel by kernel."""
    step_s, per, calls, own = _breakdown(art, width, steps, cache_len)
    return {"width": width, "step_s": step_s,
            "kernels": dict(sorted(per.items(), key=lambda kv: -kv[1])), "calls": calls,
            "timer_s": own}


def step_breakdown(art, width: int = 1, steps: int = 8, cache_len: int = 64) -> dict:
    """Median plain step time and per-unit busy time of ``verify`` at ``width`` (see
    :func:`_breakdown` for the setting)."""
    step_s, busy, calls, own = _breakdown(art, width, steps, cache_len, _unit_of_call)
    return {"width": width, "step_s": step_s, "busy_s": busy,
            # VM bookkeeping ("host": allocations, shapes) is not a unit's work.
            "serial_s": sum(t for u, t in busy.items() if u != "host"), "calls": calls,
            "timer_s": own}


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB. On Linux from ``VmHWM`` (this
    program's own): ``getrusage``'s ``ru_maxrss`` survives ``exec``, so a process started
    from a large one (a test runner, a notebook) reported its parent's size."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def host_split(art, prompt_ids, widths, new_tokens: int = 96) -> list[dict]:
    """Where a decode step's time goes, per width (greedy, EOS ignored, the same prompt at
    every width; each width's first pass is a warm-up): ``vm_ms`` inside the compiled
    functions (on a GPU: enqueueing kernels and graphs, which run asynchronously),
    ``wait_ms`` reading results back to the host (a GPU step's wait for the device lands
    here), ``host_ms`` the rest (Python: the tree's inputs, acceptance, copies to the
    device), and ``reads_per_step``. A CPU's kernels run inside the VM calls."""
    from .generate import Generation, default_lookup

    real_download = _tvm.download  # what the runtime reads results back with
    vm, wait, reads = [0.0], [0.0], [0]

    def timed(fn):
        def call(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                vm[0] += time.perf_counter() - t0
        return call

    def counted_download(tensor):
        t0 = time.perf_counter()
        try:
            return real_download(tensor)
        finally:
            wait[0] += time.perf_counter() - t0
            reads[0] += 1

    rows = []
    with _compiled_calls(art) as (static, verify, commit, medusa):
        art._verify_static = {w: timed(f) for w, f in static.items()}
        art._verify, art._commit = timed(verify), timed(commit)
        if medusa is not None:
            art._medusa = timed(medusa)
        _tvm.download = counted_download
        try:
            for width in widths:
                for _ in range(2):  # the second pass is kept
                    steps: list = []
                    gen = Generation(art, prompt_ids, new_tokens, False, width, steps,
                                     default_lookup(art, width))
                    next(iter(gen))  # prefill and its first token, outside the counts
                    vm[0] = wait[0] = 0.0
                    reads[0] = 0
                    res = gen.result()
                n, total = res.steps, sum(steps)
                rows.append({"width": width, "steps": n,
                             "accepted_per_step": round(res.accepted_per_step, 3),
                             "step_ms": round(1e3 * total / n, 3),
                             "vm_ms": round(1e3 * vm[0] / n, 3),
                             "wait_ms": round(1e3 * wait[0] / n, 3),
                             "host_ms": round(1e3 * (total - vm[0] - wait[0]) / n, 3),
                             "reads_per_step": round(reads[0] / n, 2)})
        finally:
            _tvm.download = real_download
    return rows


def decode_step_seconds(art, prompt_ids, widths, new_tokens: int = 12, rounds: int = 2,
                        worth_timing=None) -> dict[int, float]:
    """Seconds of one greedy decode step at each width (the draft, ``verify``, acceptance and
    ``commit``, as :class:`~hetcomp.runtime.generate.Generation` runs them with the default
    n-gram lookup), decoding ``new_tokens`` after ``prompt_ids`` with EOS ignored: the
    median over the steps of ``rounds`` passes but the first of each (it warms the width's
    workspace), the widths interleaved in each pass so that a busy spell of a shared machine
    falls on all of them. A step's time hardly depends on what it accepts: any prompt
    serves.

    ``worth_timing(w, step_s)``, if given, is asked before each width's pass with the medians
    so far (the widths timed in earlier passes, and before ``w`` in this one); False leaves
    ``w`` out of this pass and the later ones: it keeps the times it has, and a width never
    timed is absent from the result (what decides is the caller's:
    :func:`~hetcomp.planner.may_beat_best` for compile's width)."""
    from .generate import Generation, default_lookup

    steps: dict[int, list[float]] = {}
    left = list(widths)
    for _ in range(rounds):
        for w in list(left):
            if worth_timing is not None and not worth_timing(
                    w, {v: float(np.median(t)) for v, t in steps.items()}):
                left.remove(w)
                continue
            times: list[float] = []
            Generation(art, prompt_ids, new_tokens, False, w, times,
                       default_lookup(art, w)).result()
            steps.setdefault(w, []).extend(times[1:] or times)
    return {w: float(np.median(steps[w])) for w in widths if w in steps}


def host_replay(art, prompts, width: int, new_tokens: int = 64, rounds: int = 3) -> dict:
    """The host's share of a decode step alone: each prompt is decoded once for real (greedy,
    EOS ignored, the default lookup), recording what the compiled functions returned that
    the host reads (the draft's tree tokens, verify's greedy ids), then decoded ``rounds``
    times more with every compiled call of a step answered at once from the record (the
    caches passed through), so a step's time is the generator's own work: the lookup draft,
    the tree's inputs and their uploads, reading ids back, acceptance, the cache bookkeeping.
    Each round starts from empty step-shape and datastore caches, as a first decode does.
    On a CPU the real calls evict the host's caches and spin the thread pool, which inflates
    :func:`host_split`'s host share several times; a GPU's host stays warm, as here.

    Returns ``{"width", "steps", "host_us"}``: microseconds a step, the best round's mean,
    and refuses (``AssertionError``) a replay that did not reproduce the recorded tokens."""
    from .generate import Generation, default_lookup

    record: dict[str, list] = {"draft": [], "greedy": []}

    def recording(fn, key, index):
        def call(*args):
            out = fn(*args)
            record[key].append(art.upload(np.ascontiguousarray(_tvm.download(out[index]))))
            return out
        return call

    def replaying():
        it = {k: iter(v) for k, v in record.items()}

        def verify(*args):  # (tokens, positions, mask, row_ptr, col_idx, k, v, length, ...)
            return None, None, next(it["greedy"]), args[5], args[6]

        return verify, (lambda *a: (None, None, next(it["draft"]))), (lambda k, v, *a: (k, v))

    def decode(ids):
        return Generation(art, ids, new_tokens, False, width, None,
                          default_lookup(art, width)).result()

    with _compiled_calls(art) as (static, verify, _, medusa):
        art._verify_static = {w: recording(f, "greedy", 2) for w, f in static.items()}
        art._verify = recording(verify, "greedy", 2)
        if medusa is not None:
            art._medusa = recording(medusa, "draft", 2)
        expected = [decode(ids).ids for ids in prompts]
        best = float("inf")
        for _ in range(rounds):
            art.step_shapes.clear()
            art.medusa_parts.clear()
            art._tree_tensors.clear()
            if art._datastore is not None:
                art._datastore._found.clear()
            fake_verify, fake_draft, fake_commit = replaying()
            art._verify_static = {w: fake_verify for w in static}
            art._verify, art._commit = fake_verify, fake_commit
            if medusa is not None:
                art._medusa = fake_draft
            total, steps = 0.0, 0
            for ids, want in zip(prompts, expected):
                times: list = []
                res = Generation(art, ids, new_tokens, False, width, times,
                                 default_lookup(art, width)).result()
                assert res.ids == want, "the replay did not reproduce the recorded decode"
                total, steps = total + sum(times), steps + len(times)
            best = min(best, total / steps)
    return {"width": width, "steps": steps, "host_us": round(1e6 * best, 1)}
