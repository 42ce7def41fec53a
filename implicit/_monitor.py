"""Convergence bookkeeping shared by every solver: tolerance, history, freezing, NaN."""

from __future__ import annotations

import math

import torch

from ._stats import SolverStats
from ._structure import Structure

__all__ = ["Monitor"]


class Monitor:
    """Tracks ``‖F(z)‖ ≤ tol·‖z‖ + atol`` per sample over the iterations of one solve.

    A solver calls :meth:`check` once per iterate with the iterate and its
    residual (any vector whose norm is ``‖F(z)‖``); it returns ``True`` when the
    solve should stop: every sample converged, ``max_iter`` steps were taken,
    or a non-finite value appeared. Each call costs one host synchronisation,
    the only one per iteration.

    Args:
        structure: The layout of the state, used to name variables in messages.
        tol: Relative tolerance.
        atol: Absolute tolerance floor.
        max_iter: The most steps the solver may take.
        reference: Per-sample norms ``(B,)`` to scale ``tol`` by instead of
            ``‖z‖`` (a linear solve ``A x = b`` passes ``‖b‖``).
    """

    def __init__(
        self,
        structure: Structure,
        *,
        tol: float,
        atol: float,
        max_iter: int,
        reference: torch.Tensor | None = None,
    ) -> None:
        self.structure = structure
        self.reference = reference
        self.tol = tol
        self.atol = atol
        self.max_iter = max_iter
        self.iterations = 0
        self.history: list[torch.Tensor] = []
        self.residual: torch.Tensor | None = None
        self.nonfinite: list[str] = []
        self.message = ""
        self._margin: torch.Tensor | None = None
        self._active: torch.Tensor | None = None
        self._converged: torch.Tensor | None = None
        self._frozen = False  # whether any sample has converged (only then is freezing needed)

    @property
    def converged(self) -> torch.Tensor | None:
        """Per-sample convergence ``(B,)`` at the last check (``None`` before)."""
        if self._margin is None:
            return None
        if self._converged is None:
            self._converged = self._margin <= self.atol
        return self._converged

    @property
    def active(self) -> torch.Tensor | None:
        """Per-sample mask ``(B,)`` of the samples still iterating (``None`` before)."""
        if self._margin is None:
            return None
        if self._active is None:
            self._active = self._margin > self.atol
        return self._active

    def check(self, z: torch.Tensor, r: torch.Tensor) -> bool:
        """Record the residual of iterate ``z`` and say whether to stop."""
        rn = torch.linalg.vector_norm(r, dim=1)
        zn = torch.linalg.vector_norm(z, dim=1) if self.reference is None else self.reference
        # ‖F(z)‖ - tol·‖z‖ ≤ atol where converged; its maximum answers "all
        # converged?" and, being NaN or infinite otherwise, "all finite?" in
        # the single host synchronisation of the iteration.
        margin = torch.sub(rn, zn, alpha=self.tol)
        self.history.append(rn)
        self.residual = rn
        self._margin = margin
        self._active = self._converged = None
        if margin.numel() == 1:
            worst = best = float(margin)
        else:
            lo, hi = torch.aminmax(margin)
            worst, best = float(hi), float(lo)  # one synchronisation: the second value is ready
        self._frozen = best <= self.atol
        if not math.isfinite(worst) and not bool(torch.isfinite(rn).all() & torch.isfinite(zn).all()):
            # r may be a (B, 1) vector of residual norms (gmres within a cycle): no variables to name.
            bad = (self.structure.nonfinite(r) if r.shape[1] == z.shape[1] else []) or self.structure.nonfinite(z)
            bad = bad or ["(unknown)"]
            self.nonfinite = bad
            self.message = f"non-finite value in {', '.join(bad)} after {self.iterations} iterations"
            return True
        if worst <= self.atol:
            self.message = f"converged in {self.iterations} iterations"
            return True
        if self.iterations >= self.max_iter:
            self.message = f"reached max_iter={self.max_iter} before meeting tol={self.tol:g}"
            return True
        self.iterations += 1
        return False

    def freeze(self, z_new: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``z_new`` for the samples still iterating, ``z`` for converged ones."""
        if self._margin is None or not self._frozen or z.shape[0] == 1:
            return z_new
        return torch.where(self.active[:, None], z_new, z)  # type: ignore[index]

    def stats(self, solver: str, nfe: int, batched: bool) -> SolverStats:
        """The :class:`SolverStats` of the solve so far."""
        converged = self.converged
        assert self.residual is not None and converged is not None, "check() was never called"
        history = torch.stack(self.history)
        residual = self.residual
        if not batched:
            residual, converged, history = residual[0], converged[0], history[:, 0]
        return SolverStats(
            solver=solver,
            iterations=self.iterations,
            nfe=nfe,
            residual=residual,
            converged=converged,
            history=history,
            message=self.message,
        )
