"""Picard (plain fixed-point) iteration with optional damping."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._registry import register_solver
from .._settings import interval, set_options
from .._solver import IterativeSolver
from ..plugin import Monitor, System

__all__ = ["FixedPointIteration"]


@register_solver("fixed_point")
@dataclass(frozen=True, kw_only=True)
class FixedPointIteration(IterativeSolver):
    """Picard iteration ``z ← (1 - β) z + β G(z)`` for ``z* = G(z*)``.

    Converges when ``G`` is a contraction (``β`` in ``(0, 1]``); damping
    (``β < 1``) can restore convergence when ``∂G/∂z`` has eigenvalues
    near ``-1``.

    Args:
        damping: ``β``, the weight of the new map value.
    """

    damping: float = 1.0

    def __post_init__(self) -> None:
        set_options(self, damping=interval("damping", self.damping, 0.0, 1.0))

    def init(self, system: System, z0: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}  # holds the map's value between direction() and step()

    def direction(self, system: System, z: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
        g = state["g"] = system.map(z)
        return g - z

    def step(
        self, system: System, z: torch.Tensor, r: torch.Tensor, state: dict[str, torch.Tensor], monitor: Monitor
    ) -> torch.Tensor:
        g = state.pop("g", None)
        if self.damping == 1.0:
            # Undamped, the map's value is the next iterate (when direction() kept it).
            return g if g is not None else z + r
        return z.add(r, alpha=self.damping)
