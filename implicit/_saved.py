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

Autograd checks the version counter of a saved tensor when it unpacks it,
but not under saved-tensor hooks, which replace the tensor by whatever they
packed. Both kinds of hook here record the version of every tensor they
save and check it on unpack (or on recomputation), so a parameter or input
of the map modified in place between the solve and ``backward()`` (an
``optimizer.step()`` too early, a ``W.mul_()`` under ``no_grad``) raises
:func:`modified_in_place` as plain autograd would, at the cost of one integer
per saved tensor.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from . import _compat

__all__ = ["SharedSaves", "evaluate_without_saving", "modified_in_place"]

_top_hooks = _compat.top_saved_tensors_hooks


class _Slot:
    """One tensor saved for backward by both evaluations (or by one of them only)."""

    __slots__ = ("__weakref__", "meta", "tensor", "version")

    def __init__(self, tensor: torch.Tensor, meta: tuple[Any, ...] | None = None) -> None:
        # Held detached: a node's own output held with its history would hold
        # the node, and so the graph, in a cycle that is never freed. A detached
        # tensor shares the version counter of the one saved.
        self.tensor = tensor
        self.version = tensor._version
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

    Unpacking a slot whose tensor was modified in place since it was saved
    raises (:func:`modified_in_place`), as autograd does without hooks.

    Use :meth:`create`, run the evaluations under :meth:`first` and
    :meth:`second`, then :meth:`settle`.

    Args:
        reads: The map whose evaluations are saved, searched for the name of
            a tensor modified in place (see :func:`modified_in_place`).
    """

    def __init__(self, reads: Any = None) -> None:
        # Held weakly: the hooks live in the graph's nodes, and a map that
        # closes over the graph's output (a module keeping its last result)
        # would otherwise close a cycle through them that is never freed.
        self._reads = _weak(reads)
        # Held weakly: a slot lives as long as a graph's node that saved it, so the
        # temporaries of a graph that G builds and differentiates inside itself go
        # with that graph.
        self._slots: list[weakref.ref[_Slot]] = []
        self._matched = 0
        self._lock = threading.Lock()

    @classmethod
    def create(cls, reads: Any = None) -> SharedSaves | None:
        """Hooks for the calling context, or ``None`` where they cannot be used.

        Not usable: saved-tensor hooks are disabled (a ``torch.func``
        transform is active), the caller has hooks of their own, or they
        cannot be read (PyTorch before they could be).
        """
        if _top_hooks is None or not _compat.saved_tensors_hooks_enabled():
            return None
        if _top_hooks(False) is not None:
            return None
        return cls(reads)

    @contextmanager
    def first(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack_first, self._unpack):
            yield

    @contextmanager
    def second(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack_second, self._unpack):
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
                slot.tensor, slot.version, slot.meta = t.detach(), t._version, None
                return slot
        return _Slot(t.detach())

    def _unpack(self, slot: _Slot) -> torch.Tensor:
        if slot.tensor._version != slot.version:
            raise modified_in_place(slot.tensor, slot.version, self._reads())
        return slot.tensor


def modified_in_place(t: torch.Tensor, expected: int, reads: Any = None) -> RuntimeError:
    """The error for a saved tensor ``t`` found at another version than ``expected``, the one it was saved at.

    ``reads`` (the user's map) is searched for a name for ``t``: its
    parameters and buffers if it is a module, the tensors and modules it
    closes over or holds as attributes otherwise. Only on this path, so
    naming costs nothing while nothing is wrong.
    """
    name = _name_of(t, reads)
    what = f"{name} " if name is not None else "a tensor that the map read or computed "
    return RuntimeError(
        f"{what}(shape {tuple(t.shape)}, dtype {t.dtype}) was modified in place after the solve: it is at "
        f"version {t._version}, expected version {expected}, when the solution was attached for backward. The "
        "implicit gradient needs the values the map read at the solution, and a gradient from the changed ones "
        "would be wrong. Call backward() before changing parameters or inputs in place (optimizer.step() "
        "before backward() is the usual cause), or change a clone instead."
    )


def _weak(obj: Any) -> Callable[[], Any]:
    if obj is None:
        return lambda: None
    try:
        return weakref.ref(obj)
    except TypeError:  # a bound method (a fresh object) or a builtin: unnamed
        return lambda: None


def _name_of(t: torch.Tensor, reads: Any) -> str | None:
    """A name for the tensor ``t`` shares memory and version with, among those ``reads`` holds."""
    if reads is None:
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except RuntimeError:  # pragma: no cover - a tensor without storage
        return None
    if ptr == 0:  # no memory of its own to compare (an empty tensor)
        return None
    for name, candidate in _named_tensors(reads):
        if candidate.untyped_storage().data_ptr() == ptr and candidate._version == t._version:
            kind = "parameter" if isinstance(candidate, torch.nn.Parameter) else "tensor"
            return f"{kind} {name!r}"
    return None


def _named_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors ``obj`` reads, named: a module's, a closure's free variables, an object's attributes."""
    if isinstance(obj, torch.nn.Module):
        yield from obj.named_parameters(remove_duplicate=False)
        yield from obj.named_buffers(remove_duplicate=False)
        return
    items: list[tuple[str, Any]] = []
    fn = getattr(obj, "__func__", obj)
    code, cells = getattr(fn, "__code__", None), getattr(fn, "__closure__", None)
    if code is not None:
        items += [(n, c.cell_contents) for n, c in zip(code.co_freevars, cells or ()) if _filled(c)]
        scope = getattr(fn, "__globals__", {})
        items += [(n, scope[n]) for n in code.co_names if n in scope]
        if hasattr(obj, "__self__"):
            items.append(("self", obj.__self__))
    elif hasattr(obj, "__dict__"):
        items += list(vars(obj).items())
    for name, value in items:
        if isinstance(value, torch.Tensor):
            yield name, value
        elif isinstance(value, torch.nn.Module):
            for sub, tensor in _named_tensors(value):
                yield f"{name}.{sub}", tensor


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # a free variable not yet bound
        return False
    return True


def _meta(t: torch.Tensor) -> tuple[Any, ...]:
    return (t.shape, t.dtype, t.device, t.requires_grad)


def evaluate_without_saving(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reads: Any = None
) -> torch.Tensor:
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
    return _Recomputed(fn, x, reads).run()


def _autocast_enabled() -> bool:
    return _compat.any_autocast_enabled()


class _Recomputed:
    """Saved-tensor hooks that store an index for each tensor autograd saves, and nothing else.

    The first unpack in a backward pass evaluates ``fn(x)`` again with grad
    enabled and collects, in order, the tensors that evaluation saves
    (detached: on unpack autograd gives each the history of the tensor it
    replaces). Each is released once handed out, so nothing outlives the
    backward pass that needed it; a later pass (``retain_graph=True``, a
    double backward) evaluates again. ``fn`` must be deterministic: the same
    operations on the same input; a different list of saved tensors raises.
    So does a saved tensor at another version than the first time: the
    tensors ``fn`` reads (its parameters) are the same ones, modified in
    place since, and those it creates get the same versions from the same
    operations.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reads: Any = None) -> None:
        self._fn, self._x, self._reads = fn, x, _weak(reads)
        self._saved: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self._versions: list[int] = []
        self._values: list[torch.Tensor | None] | None = None
        self._lock = threading.Lock()  # device threads of the engine may unpack concurrently

    def run(self) -> torch.Tensor:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return self._fn(self._x)

    def _pack(self, t: torch.Tensor) -> int:
        self._saved.append((t.shape, t.dtype, t.device))
        self._versions.append(t._version)
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
        for t, version in zip(values, self._versions):
            if t is not None and t._version != version:
                raise modified_in_place(t, version, self._reads())
        return values


def _identity(t: Any) -> Any:
    return t
