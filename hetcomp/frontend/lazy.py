"""Weights read from the model file when asked for (no TVM, no kernels: the loaders and the
runtime-only import path use it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping


class Deferred:
    """A tensor read when asked for: its ``shape`` now, its values from ``load()``."""

    def __init__(self, shape: tuple[int, ...], load: Callable[[], object],
                 source: str | None = None):
        self.shape, self.load, self.source = shape, load, source  # source: the file's type

    def map(self, fn: Callable) -> Deferred:
        """The same tensor passed through ``fn`` (a row permutation, say) when read."""
        return Deferred(self.shape, lambda: fn(self.load()), self.source)


class LazyWeights(Mapping):
    """Weights named as in :mod:`.weights`, each read from the model file on access, not kept.

    A GGUF holds its tensors quantized; dequantized to float32 all at once, a 1.5B model takes
    7 GB before packing starts. :func:`.weights.pack_weights` reads them one at a time, so a
    compile holds the packed weights plus one float32 tensor. Reading an entry twice reads it
    twice: callers that need a tensor often keep it themselves."""

    def __init__(self):
        self._items: dict[str, Deferred] = {}

    def __setitem__(self, name: str, value) -> None:
        self._items[name] = value if isinstance(value, Deferred) else Deferred(
            tuple(value.shape), lambda: value)

    def __getitem__(self, name: str):
        return self._items[name].load()

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._items[name].shape

    def source(self, name: str) -> str | None:
        """The tensor's type in the file (``q4_k``, ``f32``), if the loader said."""
        return self._items[name].source


def parameter_count(w: Mapping) -> int:
    """Elements in the weights, without reading a :class:`LazyWeights`' tensors."""
    if isinstance(w, LazyWeights):
        return sum(math.prod(w.shape(n)) for n in w)
    return int(sum(a.size for a in w.values()))
