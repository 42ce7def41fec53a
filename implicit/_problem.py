"""Implicit problems: a residual ``F(z) = 0`` or a fixed point ``z = f(z)``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ._structure import Structure

__all__ = ["ImplicitProblem", "System"]


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the caller's ``torch.autocast`` for ``device_type``, or ``None`` where it is off."""
    try:
        on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # PyTorch < 2.4: one function per device type
        if device_type == "cpu":
            on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        elif device_type == "cuda":
            on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            return None
    return dtype if on else None


class ImplicitProblem:
    """The equation ``F(z*) = 0`` over a state ``z`` (dict, tuple/list or tensor).

    ``F`` receives a state with the structure of ``z0`` and returns one with the
    same keys, shapes, dtype and device. It may close over parameters and
    inputs; gradients of the solution reach all of them.

    Args:
        fn: The residual ``F`` (root form).
        batched: If ``True``, dim 0 of every variable indexes independent
            systems: sample ``i`` of ``F(z)`` depends on sample ``i`` of ``z``
            only. Convergence is then tracked per sample.

    Examples:
        >>> import torch, implicit
        >>> problem = implicit.ImplicitProblem(lambda z: z**3 - 8.0)
        >>> implicit.solve(problem, torch.tensor(1.0), solver="newton_krylov").z
        tensor(2.)
    """

    def __init__(self, fn: Callable[[Any], Any], *, batched: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"the residual must be callable; got {type(fn).__name__}")
        self.fn = fn
        self.batched = bool(batched)
        self.is_fixed_point = False

    @classmethod
    def fixed_point(cls, f: Callable[[Any], Any], *, batched: bool = False) -> ImplicitProblem:
        """The fixed-point problem ``z* = f(z*)``; its residual is ``f(z) - z``.

        Args:
            f: The map; it receives and returns states with the structure of ``z0``.
            batched: As for :class:`ImplicitProblem`.

        Returns:
            A problem whose solvers use ``f`` directly when they iterate a map
            (Picard, Anderson) and ``f(z) - z`` when they want a residual.
        """
        problem = cls(f, batched=batched)
        problem.is_fixed_point = True
        return problem

    def __repr__(self) -> str:
        form = "fixed_point" if self.is_fixed_point else "root"
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"ImplicitProblem({name}, form={form!r}, batched={self.batched})"

    def bind(self, z0: Any) -> System:
        """The flat view of this problem at the structure of ``z0``."""
        return System(self, Structure(z0, self.batched))


class System:
    """An :class:`ImplicitProblem` seen by solvers: functions of one ``(B, N)`` tensor.

    ``map(z)`` is the fixed-point map ``G`` (``f`` for a fixed-point problem,
    ``z - F(z)`` for a root problem) and ``residual(z)`` is ``F`` (``f(z) - z``
    for a fixed-point problem), so every solver can run every problem and
    ``G(z) = z - F(z)`` holds throughout. Each call validates what the user's
    function returned and counts one evaluation in :attr:`nfe`.
    """

    def __init__(self, problem: ImplicitProblem, structure: Structure) -> None:
        self.problem = problem
        self.structure = structure
        self.batch = structure.batch
        self.size = structure.size
        self.dtype = structure.work_dtype  # of the flat state; the variables f sees keep structure.dtype
        self.device = structure.device
        self.nfe = 0
        self._what = "the map f" if problem.is_fixed_point else "the residual F"
        # The caller's autocast, if any, when the problem was bound (at the start of a
        # solve): the user's function runs under it wherever it is evaluated, and the
        # solvers' own arithmetic never does (see precision()).
        self.autocast = autocast_dtype(structure.device.type)

    def precision(self) -> Any:
        """A context for the solvers' own arithmetic: autocast off, where the caller had it on.

        Under ``torch.autocast`` a solver's products (``bmm``, ``matmul``) would
        run in half precision and turn the state's dtype on the way; the
        user's function is still evaluated under the caller's autocast.
        """
        if self.autocast is None and autocast_dtype(self.device.type) is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def call(self, z: torch.Tensor) -> torch.Tensor:
        """The user's function at flat ``z``, flattened (``f`` or ``F``).

        Raises:
            ValueError: the function returned the wrong structure, or wrote
                into its input (which is the solver's iterate: a map that
                does ``z.mul_(0.5)`` would look converged at once).
        """
        self.nfe += 1
        # Inference tensors keep no version counter: there the guard is off.
        version = None if z.is_inference() else z._version
        if self.autocast is None:
            out = self.problem.fn(self.structure.unflatten(z))
        else:
            with torch.autocast(self.device.type, dtype=self.autocast):
                out = self.problem.fn(self.structure.unflatten(z))
            # what autocast left in its lower precision returns to the state's dtype
            out = self.structure.recast(out, self.autocast)
        if version is not None and z._version != version:
            raise ValueError(
                f"{self._what} modified its input in place ({self.structure.describe()}); the input is the "
                "solver's current iterate, so return new tensors instead (z.mul(0.5) rather than z.mul_(0.5))"
            )
        return self.structure.flatten_output(out, self._what)

    def map(self, z: torch.Tensor) -> torch.Tensor:
        """The fixed-point map ``G(z)``."""
        out = self.call(z)
        return out if self.problem.is_fixed_point else z - out

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """The residual ``F(z)``, zero at the solution."""
        out = self.call(z)
        return out - z if self.problem.is_fixed_point else out

    def residual_jvp(self, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F(z)`` and the Jacobian-vector product ``(∂F/∂z) v``, by forward-mode AD."""
        out, tangent = torch.func.jvp(self.residual, (z,), (v,))[:2]
        return out, tangent
