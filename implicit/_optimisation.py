"""Optimisation problems as root problems: ``argmin objective(z)`` and ``argmin ½ Σ residuals(z)²``.

An unconstrained minimum ``z*`` of a smooth objective solves ``∇objective(z*) = 0``,
so an optimisation problem is the root problem of its gradient: every root solver
runs it, and the implicit function theorem differentiates it with the Hessian
(symmetric) as the Jacobian. The gradient is computed with autograd inside the
residual, so that it is itself differentiable with respect to ``z`` and to every
tensor the objective reads, as the backward pass needs.

Two routes to the gradient give the same values:

* plain autograd (``torch.autograd.grad`` on leaf copies of the variables, a
  graph only where one is being recorded), wherever no ``torch.func``
  transform or forward-mode level is active: it keeps the saved-tensor hooks
  of the caller and of the backward pass working. Under inference mode it
  runs with inference mode off for the gradient's own graph (on copies of
  the variables), and falls back to ``torch.func.grad`` where the objective
  reads tensors made in inference mode, which autograd cannot save;
* ``torch.func.grad`` elsewhere, which composes with those transforms (plain
  autograd would have to call ``requires_grad_`` inside them, which they refuse).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from . import _compat

__all__ = [
    "LeastSquaresObjective",
    "ObjectiveGradient",
    "check_value",
    "flatten_residuals",
    "leaf",
    "plain_autograd",
    "recording",
]


def plain_autograd() -> bool:
    """Whether a gradient can be taken by ``torch.autograd.grad`` here (see the module docstring)."""
    return not _compat.transforms_active() and not _compat.forward_ad_active()


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Autograd on, and inference mode off where it is on: for the graph of a gradient taken inside a solve."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.enable_grad():
            yield
    else:
        with torch.enable_grad():
            yield


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that requires grad (a copy of its memory if it is an inference tensor, which cannot)."""
    return (t.clone() if t.is_inference() else t.detach()).requires_grad_()


def _leaves(z: Any) -> list[torch.Tensor]:
    if isinstance(z, torch.Tensor):
        return [z]
    if isinstance(z, Mapping):
        return list(z.values())
    return list(z)


def _rebuild(z: Any, leaves: list[torch.Tensor]) -> Any:
    if isinstance(z, torch.Tensor):
        return leaves[0]
    if isinstance(z, Mapping):
        return dict(zip(z.keys(), leaves))
    return type(z)(leaves) if isinstance(z, (tuple, list)) else leaves


def check_value(value: Any, batched: bool, batch: int | None, what: str) -> torch.Tensor:
    """Validate what an objective returned: a 0-dim tensor, or ``(B,)`` when batched.

    Raises:
        ValueError: naming the expected and the actual type or shape.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} returned {type(value).__name__}; expected a tensor")
    if not value.is_floating_point():
        raise ValueError(f"{what} returned dtype {value.dtype}; expected a floating-point dtype")
    if batched:
        if value.dim() != 1 or (batch is not None and value.shape[0] != batch):
            expected = f"({batch},)" if batch is not None else "(B,)"
            raise ValueError(
                f"{what} returned shape {tuple(value.shape)}; expected {expected}, one value per sample "
                "(the problem is batched)"
            )
    elif value.dim() != 0:
        raise ValueError(
            f"{what} returned shape {tuple(value.shape)}; expected a scalar (0-dim) tensor "
            "(or build the problem with batched=True for one value per sample)"
        )
    return value


def _batch_of(z: Any, batched: bool) -> int | None:
    if not batched:
        return None
    leaves = _leaves(z)
    return int(leaves[0].shape[0]) if leaves and leaves[0].dim() > 0 else None


class ObjectiveGradient:
    """``z ↦ ∇objective(z)`` in the structure of ``z``: the residual of an optimisation problem.

    Differentiable with respect to ``z`` and to every tensor the objective
    reads (wherever a graph is being recorded). When batched, the gradient of
    ``objective(z).sum()``: sample ``i`` of it is the gradient of value ``i``.

    Args:
        objective: ``z ↦`` a 0-dim tensor (``(B,)`` when batched).
        batched: Whether dim 0 of every variable indexes samples.
        what: How the objective is called in messages.
    """

    def __init__(self, objective: Callable[[Any], torch.Tensor], *, batched: bool, what: str) -> None:
        self.objective = objective
        self.batched = batched
        self.what = what
        self.__qualname__ = f"gradient of {getattr(objective, '__qualname__', type(objective).__name__)}"

    def value(self, z: Any) -> torch.Tensor:
        """The objective at ``z``, validated."""
        return check_value(self.objective(z), self.batched, _batch_of(z, self.batched), self.what)

    def _total(self, z: Any) -> torch.Tensor:
        value = self.value(z)
        return value.sum() if self.batched else value

    def __call__(self, z: Any) -> Any:
        if not plain_autograd():
            return torch.func.grad(self._total)(z)
        if torch.is_inference_mode_enabled():
            try:
                return self._autograd(z)
            except RuntimeError:  # the objective reads inference tensors, which autograd cannot save
                return torch.func.grad(self._total)(z)
        return self._autograd(z)

    def _autograd(self, z: Any) -> Any:
        leaves = _leaves(z)
        create = torch.is_grad_enabled()  # the caller's mode: a graph only where one is being recorded
        with recording():
            inputs = [t if t.requires_grad else leaf(t) for t in leaves]
            total = self._total(_rebuild(z, inputs))
            if not total.requires_grad:  # the objective reads none of z: a zero gradient
                grads = [torch.zeros_like(t) for t in leaves]
            else:
                grads = list(
                    torch.autograd.grad(total, inputs, create_graph=create, allow_unused=True, materialize_grads=True)
                )
        return _rebuild(z, grads)


def flatten_residuals(out: Any, batched: bool, batch: int, what: str) -> torch.Tensor:
    """The residuals returned by a least-squares function as one ``(B, M)`` tensor.

    Args:
        out: A tensor, or a dict, tuple or list of tensors (each with dim 0 of
            size ``B`` when batched).
        batched: Whether dim 0 of every residual indexes samples.
        batch: ``B`` (``1`` when not batched).
        what: How the function is called in messages.

    Raises:
        ValueError: naming the residual and the expected and actual value.
    """
    if isinstance(out, torch.Tensor):
        named = [("r", out)]
    elif isinstance(out, Mapping):
        named = [(f"r[{k!r}]", t) for k, t in out.items()]
    elif isinstance(out, (tuple, list)):
        named = [(f"r[{i}]", t) for i, t in enumerate(out)]
    else:
        raise ValueError(f"{what} returned {type(out).__name__}; expected a tensor or a dict, tuple or list of tensors")
    if not named:
        raise ValueError(f"{what} returned no residuals; expected at least one tensor")
    rows = []
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{what} returned {name} of type {type(t).__name__}; expected a tensor")
        if not t.is_floating_point():
            raise ValueError(f"{what} returned {name} with dtype {t.dtype}; expected a floating-point dtype")
        if batched:
            if t.dim() == 0 or t.shape[0] != batch:
                raise ValueError(
                    f"{what} returned {name} with shape {tuple(t.shape)}; expected dim 0 of size {batch} "
                    "(one row of residuals per sample: the problem is batched)"
                )
            rows.append(t.reshape(batch, -1))
        else:
            rows.append(t.reshape(1, -1))
    dtype = rows[0].dtype
    for (name, t), row in zip(named, rows):
        if row.dtype != dtype or row.device != rows[0].device:
            raise ValueError(
                f"{what} returned {name} with dtype {t.dtype} on {t.device}; expected {dtype} on "
                f"{rows[0].device} as {named[0][0]}"
            )
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)


class LeastSquaresObjective:
    """``z ↦ ½ Σ residuals(z)²`` (per sample when batched), validating what ``residuals`` returns.

    Args:
        residuals: ``z ↦`` a tensor or a dict, tuple or list of tensors.
        batched: Whether dim 0 of every variable and residual indexes samples.
    """

    what = "the residuals function"

    def __init__(self, residuals: Callable[[Any], Any], *, batched: bool) -> None:
        self.residuals = residuals
        self.batched = batched
        self.__qualname__ = f"half squared norm of {getattr(residuals, '__qualname__', type(residuals).__name__)}"

    def flat(self, z: Any) -> torch.Tensor:
        """The residuals at ``z`` as one ``(B, M)`` tensor (``B = 1`` when not batched)."""
        batch = _batch_of(z, self.batched) if self.batched else 1
        return flatten_residuals(self.residuals(z), self.batched, batch or 0, self.what)

    def __call__(self, z: Any) -> torch.Tensor:
        r = self.flat(z)
        value = 0.5 * (r * r).sum(dim=1)
        return value if self.batched else value[0]
