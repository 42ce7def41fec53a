"""Convergence bookkeeping shared by every solver: tolerance, history, freezing, NaN."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import _compat
from ._stats import SolverStats
from ._structure import Structure

__all__ = ["DIVERGENCE", "HOST_NUMEL", "Monitor"]

HOST_NUMEL = 64
"""The largest state (``B·N`` numbers) that a :class:`Monitor` checks in Python arithmetic on the CPU."""

DIVERGENCE = 1e8
"""A solve whose largest residual norm exceeds this multiple of its first has diverged, and stops."""


def _norms(rows: list[list[float]]) -> list[float]:
    """The Euclidean norm of each row of a ``tolist()``-ed ``(B, N)`` tensor."""
    return [math.hypot(*row) for row in rows]


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
        track_best: Keep, per sample, the iterate of smallest residual seen
            (one state-sized buffer, updated without host synchronisation);
            :meth:`result` then returns it and the stats report its residual.
            Ties go to the later iterate, so a solve whose residual never
            rises returns its last iterate; a sample that converged returns
            the iterate that met the tolerance.

    A state of at most :data:`HOST_NUMEL` numbers on the CPU is checked in
    Python arithmetic on its values (read with ``tolist``): for so few
    numbers each tensor operation costs more than the arithmetic, and on a
    CPU reading values back costs no synchronisation. The decisions are the
    same (the norms are taken in double precision); the residual norms,
    masks and history are turned into tensors when asked for.
    """

    def __init__(
        self,
        structure: Structure,
        *,
        tol: float,
        atol: float,
        max_iter: int,
        reference: torch.Tensor | None = None,
        track_best: bool = False,
    ) -> None:
        self.structure = structure
        self.track_best = track_best
        # The best iterate per sample and its residual norm: tensors, or on the
        # host path rows of values and floats (with whether each is the last check's).
        self._best: torch.Tensor | None = None
        self._best_rn: torch.Tensor | None = None
        self._best_rows: list[list[float]] | None = None
        self._best_rn_host: list[float] | None = None
        self._best_is_last: list[bool] = []
        self._last_rows: list[list[float]] = []
        self.reference = reference
        self.tol = tol
        self.atol = atol
        self.max_iter = max_iter
        self.iterations = 0
        # The residual norms of every check, and the last margins ‖F(z)‖ - tol·‖z‖:
        # (B,) tensors, or lists of floats on the host path.
        self._history: list[torch.Tensor] | list[list[float]] = []
        self.nonfinite: list[str] = []
        self.nonfinite_input = False  # the non-finite value came with the right-hand side (see blame_input)
        self.message = ""
        # The kind of failure in words without figures, where a solver's own stop has one
        # (divergence, stagnation, negative curvature): warnings carry it, so repeats are recognised.
        self.kind = ""
        self.reason = ""  # "converged", "max_iter", "nonfinite", or "" (a solver's own stop)
        self._host = structure.device.type == "cpu" and structure.batch * structure.size <= HOST_NUMEL
        self._reference = None if reference is None or not self._host else _compat.tolist(reference)
        self._margin: torch.Tensor | list[float] | None = None
        self._residual: torch.Tensor | None = None
        self._active: torch.Tensor | None = None
        self._converged: torch.Tensor | None = None
        self._frozen = False  # whether any sample has converged (only then is freezing needed)
        self._initial: float | None = None  # the largest residual norm at the first check
        self.diverged = False

    def _tensor(self, values: list[float] | list[bool], mask: bool = False) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.bool if mask else self.structure.work_dtype)

    @property
    def residual(self) -> torch.Tensor | None:
        """Per-sample residual norms ``‖F(z)‖`` ``(B,)`` at the last check (``None`` before)."""
        if self._residual is None and self._history:
            last = self._history[-1]
            self._residual = last if isinstance(last, torch.Tensor) else self._tensor(last)
        return self._residual

    @property
    def final_residual(self) -> torch.Tensor | None:
        """Per-sample residual norms ``(B,)`` of the iterate the solve returns (``None`` before a check)."""
        last = self.residual
        if self._best_rn is not None and last is not None:
            return torch.where(self.converged, last, self._best_rn)  # type: ignore[arg-type]
        if self._best_rn_host is not None and isinstance(self._margin, list):
            rn = self._history[-1]
            conv = self._host_converged()
            return self._tensor([a if c else b for a, b, c in zip(rn, self._best_rn_host, conv)])  # type: ignore[misc]
        return last

    def _host_converged(self) -> list[bool]:
        return [v <= self.atol for v in self._margin]  # type: ignore[union-attr]

    def result(self, z: torch.Tensor) -> torch.Tensor:
        """What the solve returns, given the last checked iterate ``z``, when the best is tracked.

        A sample that converged returns its last iterate (the one that met
        the tolerance, which is relative: a converged iterate far out may
        have a larger residual norm than an unconverged one near the start);
        one that did not returns the iterate of smallest residual norm seen.
        """
        if self._best is not None:
            return torch.where(self.converged[:, None], z, self._best)  # type: ignore[index]
        if self._best_rows is not None:
            conv = self._host_converged()
            if all(last or c for last, c in zip(self._best_is_last, conv)):
                return z
            rows = [last if c else best for last, best, c in zip(self._last_rows, self._best_rows, conv)]
            return torch.tensor(rows, dtype=z.dtype, device=z.device).view_as(z)
        return z

    def _keep_best(self, z: torch.Tensor, rn: torch.Tensor) -> None:
        """Tensor path of ``track_best``: rows of ``z`` whose residual is no larger than the best's."""
        if self._best is None or self._best_rn is None:
            self._best, self._best_rn = z.clone(), rn.clone()
            return
        # No larger (ties to the later iterate), or the best is NaN and this is not.
        better = ~(rn > self._best_rn) & ~rn.isnan()
        torch.where(better[:, None], z, self._best, out=self._best)
        torch.where(better, rn, self._best_rn, out=self._best_rn)

    def _keep_best_host(self, z_rows: list[list[float]], rn: list[float]) -> None:
        """Host path of ``track_best``, on the values already read."""
        self._last_rows = z_rows
        if self._best_rows is None or self._best_rn_host is None:
            self._best_rows, self._best_rn_host = list(z_rows), list(rn)
            self._best_is_last = [True] * len(rn)
            return
        best_rn = self._best_rn_host
        for b, value in enumerate(rn):
            better = not value > best_rn[b] and value == value
            if better:
                self._best_rows[b] = z_rows[b]
                best_rn[b] = value
            self._best_is_last[b] = better

    @property
    def history(self) -> torch.Tensor:
        """The residual norms of every check so far, ``(checks, B)``."""
        first = self._history[0]
        if isinstance(first, torch.Tensor):
            return torch.stack(self._history)  # type: ignore[arg-type]
        return self._tensor(self._history)  # type: ignore[arg-type]

    @property
    def converged(self) -> torch.Tensor | None:
        """Per-sample convergence ``(B,)`` at the last check (``None`` before)."""
        if self._converged is None:
            self._converged = self._mask(converged=True)
        return self._converged

    @property
    def active(self) -> torch.Tensor | None:
        """Per-sample mask ``(B,)`` of the samples still iterating (``None`` before)."""
        if self._active is None:
            self._active = self._mask(converged=False)
        return self._active

    def _mask(self, converged: bool) -> torch.Tensor | None:
        """Where the last margins are within ``atol`` (or, not ``converged``, beyond it; NaN in neither)."""
        m, atol = self._margin, self.atol
        if m is None:
            return None
        if isinstance(m, torch.Tensor):
            return m <= atol if converged else m > atol
        return self._tensor([v <= atol if converged else v > atol for v in m], mask=True)

    def check(self, z: torch.Tensor, r: torch.Tensor) -> bool:
        """Record the residual of iterate ``z`` and say whether to stop."""
        if self._host:
            return self._check_host(z, _norms(_compat.tolist(r)), None, lambda: r)
        self._residual = self._active = self._converged = None
        rn = torch.linalg.vector_norm(r, dim=1)
        zn = torch.linalg.vector_norm(z, dim=1) if self.reference is None else self.reference
        # ‖F(z)‖ - tol·‖z‖ ≤ atol where converged; its maximum answers "all
        # converged?" and, being NaN or infinite otherwise, "all finite?" in
        # the single host synchronisation of the iteration.
        margin = torch.sub(rn, zn, alpha=self.tol)
        if self.track_best:
            self._keep_best(z, rn)
        self._history.append(rn)  # type: ignore[arg-type]
        self._residual = rn
        self._margin = margin
        if margin.numel() == 1:
            worst = best = float(margin)
        elif margin.numel() == 0:  # an empty batch has nothing to solve
            worst = best = -math.inf
        else:
            lo, hi = torch.aminmax(margin)
            worst, best = float(hi), float(lo)  # one synchronisation: the second value is ready
        self._frozen = best <= self.atol
        if self._initial is None:  # one more read, at the first check only
            self._initial = float(rn.max()) if rn.numel() else 0.0
        if not math.isfinite(worst) and not bool(torch.isfinite(rn).all() & torch.isfinite(zn).all()):
            return self._stop_nonfinite(z, r)
        if worst > DIVERGENCE * self._initial:
            return self._stop_diverged(z, r, float(rn.max()))
        return self._decide(worst)

    def _check_host(
        self,
        z: torch.Tensor,
        rn: list[float],
        z_rows: list[list[float]] | None,
        residual: Callable[[], torch.Tensor],
    ) -> bool:
        """:meth:`check` given the residual norms (and ``z``'s values, read here if not given)."""
        self._residual = self._active = self._converged = None
        if z_rows is None and (self._reference is None or self.track_best):
            z_rows = _compat.tolist(z)
        zn = self._reference if self._reference is not None else _norms(z_rows)  # type: ignore[arg-type]
        if self.track_best:
            self._keep_best_host(z_rows, rn)  # type: ignore[arg-type]
        tol = self.tol
        margin = [a - tol * b for a, b in zip(rn, zn)]
        self._history.append(rn)  # type: ignore[arg-type]
        self._margin = margin
        if self._initial is None:
            self._initial = max(rn, default=0.0)
        if all(map(math.isfinite, margin)):
            self._frozen = min(margin, default=-math.inf) <= self.atol
            worst = max(margin, default=-math.inf)  # an empty batch has nothing to solve
            if worst > DIVERGENCE * self._initial:
                return self._stop_diverged(z, residual(), max(rn))
            return self._decide(worst)
        self._frozen = min((v for v in margin if v == v), default=math.inf) <= self.atol
        if not all(map(math.isfinite, rn + zn)):
            return self._stop_nonfinite(z, residual())
        return self._decide(math.nan)

    def _stop_nonfinite(self, z: torch.Tensor, r: torch.Tensor) -> bool:
        """Name the variables holding a NaN or infinity, and stop."""
        # r may be a (B, 1) vector of residual norms (gmres within a cycle): no variables to name.
        bad = (self.structure.nonfinite(r) if r.shape[1] == z.shape[1] else []) or self.structure.nonfinite(z)
        if not bad:  # every value finite, but a norm overflowed: the iteration diverged
            return self._stop_diverged(z, r, math.inf)
        self.nonfinite = bad
        self.message = f"non-finite value in {', '.join(bad)} after {self.iterations} iterations"
        self.reason = "nonfinite"
        return True

    def blame_input(self, names: list[str], source: str) -> None:
        """Record that the non-finite value stopping the solve came with its right-hand side ``source``."""
        self.nonfinite = names or self.nonfinite
        self.nonfinite_input = True
        self.message = f"non-finite value in {', '.join(self.nonfinite)} of {source}, before any iteration"

    def _stop_diverged(self, z: torch.Tensor, r: torch.Tensor, now: float) -> bool:
        """Stop a solve whose residual grew past :data:`DIVERGENCE` times its first (or overflowed)."""
        self.diverged = True
        self.reason = "diverged"
        where = ""
        if r.shape[1] == z.shape[1]:  # the variable holding the largest residual entry
            peaks = [float(part.abs().max()) if part.numel() else 0.0 for part in r.split(self.structure.sizes, dim=1)]
            where = f", largest in {self.structure.names[max(range(len(peaks)), key=peaks.__getitem__)]}"
        initial = self._initial or 0.0
        self.kind = f"diverged (the residual norm grew past {DIVERGENCE:g} times its first or overflowed){where}"
        if initial == math.inf:
            self.message = f"the residual norm overflowed at the start (every value finite){where}"
        else:
            growth = "overflowed (every value finite)" if now == math.inf else f"grew to {now:.3e}"
            self.message = (
                f"diverged: the residual norm {growth} from {initial:.3e} at the start "
                f"after {self.iterations} iterations{where}"
            )
        return True

    def _decide(self, worst: float) -> bool:
        """Stop when every sample has converged (``worst`` margin within ``atol``) or at ``max_iter``."""
        if worst <= self.atol:
            self.message = f"converged in {self.iterations} iterations"
            self.reason = "converged"
            return True
        if self.iterations >= self.max_iter:
            self.message = f"reached max_iter={self.max_iter} before meeting tol={self.tol:g}"
            self.reason = "max_iter"
            return True
        self.iterations += 1
        return False

    def freeze(self, z_new: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``z_new`` for the samples still iterating, ``z`` for converged ones."""
        if self._margin is None or not self._frozen or z.shape[0] == 1:
            return z_new
        return torch.where(self.active[:, None], z_new, z)  # type: ignore[index]

    def stats(self, solver: str, nfe: int, batched: bool, approximate: bool = False) -> SolverStats:
        """The :class:`SolverStats` of the solve so far.

        For an ``approximate`` adjoint (which solves no equation) the
        residual is NaN, not measured, and no sample counts as converged.
        """
        converged = self.converged
        assert self._history and converged is not None, "check() was never called"
        history = self.history
        residual = self.final_residual
        assert residual is not None
        message = self.message
        if approximate:
            residual = torch.full_like(residual, math.nan)
            history = torch.full_like(history, math.nan)
            converged = torch.zeros_like(converged)
            message = "approximate: the adjoint equation is not solved, so no residual is measured"
        if not batched:
            residual, converged, history = residual[0], converged[0], history[:, 0]
        return SolverStats(
            solver=solver,
            iterations=self.iterations,
            nfe=nfe,
            residual=residual,
            converged=converged,
            history=history,
            message=message,
            approximate=approximate,
        )
