"""What the two evaluations of the attach keep for backward: one set of saved tensors between them.

The attach evaluates ``G`` twice at the solution, ``G(z*)`` for the inner
Newton step and ``G(z_a)`` for the outer one, where ``z_a`` equals ``z*`` in
value and memory. The two evaluations run the same operations on the same
values, so the tensors they save for backward are equal: :class:`SharedSaves`
keeps one set for both graphs, and neither backward has anything to
recompute. Under saved-tensor hooks of the caller's own (offloading with
``save_on_cpu``, ``torch.utils.checkpoint`` around the solve, byte counters)
the two graphs must not read one packed tensor twice (``checkpoint`` refuses
it), so there the first evaluation keeps nothing and is recomputed when a
backward pass needs it (:func:`evaluate_without_saving`), and the caller's
hooks see the second evaluation's tensors only.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["SharedSaves", "evaluate_without_saving"]

_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


class _Slot:
    """One tensor saved for backward by both evaluations (or by one of them only)."""

    __slots__ = ("__weakref__", "meta", "tensor")

    def __init__(self, tensor: torch.Tensor, meta: tuple[Any, ...] | None = None) -> None:
        # Held detached: a node's own output held with its history would hold
        # the node, and so the graph, in a cycle that is never freed.
        self.tensor = tensor
        self.meta = meta  # set while the slot may still be matched by the second evaluation


class SharedSaves:
    """Saved-tensor hooks under which two evaluations of ``G`` at one point keep one set of tensors.

    The first evaluation's tensors are held as they are saved. The second
    evaluation's ``k``-th saved tensor takes the ``k``-th slot when its
    shape, dtype, device and ``requires_grad`` agree (the two inputs must
    both require grad: autograd saves different tensors for an input that
    does not): the slot then holds the second evaluation's tensor (whose
    output ``G(z_a)`` stays alive anyway) and the first one's is released. A
    tensor without a counterpart keeps a slot of its own.

    Use :meth:`create`, run the evaluations under :meth:`first` and
    :meth:`second`, then :meth:`settle`.
    """

    def __init__(self) -> None:
        # Held weakly: a slot lives as long as a graph's node that saved it, so the
        # temporaries of a graph that G builds and differentiates inside itself go
        # with that graph.
        self._slots: list[weakref.ref[_Slot]] = []
        self._matched = 0
        self._lock = threading.Lock()

    @classmethod
    def create(cls) -> SharedSaves | None:
        """Hooks for the calling context, or ``None`` where they cannot be used.

        Not usable: saved-tensor hooks are disabled (a ``torch.func``
        transform is active), the caller has hooks of their own, or they
        cannot be read (PyTorch before they could be).
        """
        if _top_hooks is None or not torch._C._autograd._saved_tensors_hooks_is_enabled():  # type: ignore[attr-defined]
            return None
        if _top_hooks(False) is not None:
            return None
        return cls()

    @contextmanager
    def first(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack_first, _unpack):
            yield

    @contextmanager
    def second(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack_second, _unpack):
            yield

    def settle(self) -> None:
        """End the matching: the first evaluation's slots are no longer looked up."""
        with self._lock:
            self._slots = []

    def _pack_first(self, t: torch.Tensor) -> _Slot:
        slot = _Slot(t.detach(), _meta(t))
        self._slots.append(weakref.ref(slot))
        return slot

    def _pack_second(self, t: torch.Tensor) -> _Slot:
        with self._lock:
            k = self._matched
            self._matched += 1
            slot = self._slots[k]() if k < len(self._slots) else None
            if slot is not None and slot.meta == _meta(t):
                slot.tensor, slot.meta = t.detach(), None
                return slot
        return _Slot(t.detach())


def _unpack(slot: _Slot) -> torch.Tensor:
    return slot.tensor


def _meta(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.shape, t.dtype, t.device, t.requires_grad)


def evaluate_without_saving(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` with its graph recorded but none of the tensors it saves for backward kept.

    The effect of ``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)``
    for a single call with no autocast and no random numbers, at a fraction
    of its fixed cost (about 10 µs instead of 90–150 µs per call on CPU, a
    third of an evaluation of a small map): see :class:`_Recomputed`. Under
    autocast, whose state the recomputation would have to restore, it falls
    back to ``checkpoint``.

    Raises:
        RuntimeError: from ``fn``, or where saved-tensor hooks are refused
            (``fn`` itself starts a ``torch.func`` transform); the caller
            decides what to do then.
    """
    if _autocast_enabled():
        return checkpoint(fn, x, use_reentrant=False, preserve_rng_state=False)  # type: ignore[no-any-return]
    return _Recomputed(fn, x).run()


def _autocast_enabled() -> bool:
    is_any = getattr(torch._C, "_is_any_autocast_enabled", None)
    return True if is_any is None else bool(is_any())


class _Recomputed:
    """Saved-tensor hooks that store an index for each tensor autograd saves, and nothing else.

    The first unpack in a backward pass evaluates ``fn(x)`` again with grad
    enabled and collects, in order, the tensors that evaluation saves
    (detached: on unpack autograd gives each the history of the tensor it
    replaces). Each is released once handed out, so nothing outlives the
    backward pass that needed it; a later pass (``retain_graph=True``, a
    double backward) evaluates again. ``fn`` must be deterministic: the same
    operations on the same input; a different list of saved tensors raises.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
        self._fn, self._x = fn, x
        self._saved: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self._values: list[torch.Tensor | None] | None = None
        self._lock = threading.Lock()  # device threads of the engine may unpack concurrently

    def run(self) -> torch.Tensor:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self._fn(self._x)

    def _pack(self, t: torch.Tensor) -> int:
        self._saved.append((t.shape, t.dtype, t.device))
        return len(self._saved) - 1

    def _unpack(self, index: int) -> torch.Tensor:
        with self._lock:
            if self._values is None or self._values[index] is None:
                self._values = self._recompute()
            value, self._values[index] = self._values[index], None
        assert value is not None
        return value

    def _recompute(self) -> list[torch.Tensor | None]:
        values: list[torch.Tensor | None] = []

        def keep(t: torch.Tensor) -> Any:
            t = t.detach()
            values.append(t)
            return t  # also serves a backward that fn itself runs

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, _identity):
            self._fn(self._x)
        got = [(t.shape, t.dtype, t.device) for t in values if t is not None]
        if got != self._saved:
            raise RuntimeError(
                "evaluated again at the solution for the backward pass, the map saved "
                f"{len(got)} tensors for backward where its first evaluation saved {len(self._saved)} "
                "(or their shapes, dtypes or devices differ): the map must run the same operations "
                "for the same input (no randomness or data-dependent branching between the two calls)"
            )
        return values


def _identity(t: Any) -> Any:
    return t
