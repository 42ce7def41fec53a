"""A bridge to :func:`scipy.optimize.root`, one sample at a time, in float64."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .. import _compat
from .._registry import register_solver
from .._settings import one_of
from .._solver import Solver
from .._transforms import plain
from ..plugin import Monitor, System

__all__ = ["ScipyRoot"]

_NONLIN = ("broyden1", "broyden2", "anderson", "linearmixing", "diagbroyden", "excitingmixing", "krylov")
_NONLIN_OPTIONS = ("nit", "disp", "maxiter", "ftol", "fatol", "xtol", "xatol", "tol_norm", "line_search", "jac_options")

# The options scipy.optimize.root accepts for each method (scipy.optimize.show_options("root", method)).
_OPTIONS: dict[str, tuple[str, ...]] = {
    "hybr": ("col_deriv", "xtol", "maxfev", "band", "eps", "factor", "diag"),
    "lm": ("col_deriv", "xtol", "ftol", "gtol", "maxiter", "eps", "factor", "diag"),
    "df-sane": ("ftol", "fatol", "maxfev", "fnorm", "disp", "M", "eta_strategy", "sigma_eps", "sigma_0", "line_search"),
    **{name: _NONLIN_OPTIONS for name in _NONLIN},
}
_METHODS = tuple(_OPTIONS)
_USES_JACOBIAN = ("hybr", "lm")
# Which option bounds the work of each method, and which result field counts it.
_BUDGET = {"hybr": ("maxfev", "nfev"), "lm": ("maxiter", "nfev"), "df-sane": ("maxfev", "nfev")}
_BUDGET.update({name: ("maxiter", "nit") for name in _NONLIN})


@register_solver("scipy")
@dataclass(frozen=True, kw_only=True)
class ScipyRoot(Solver):
    """Solves ``F(z*) = 0`` with :func:`scipy.optimize.root`, sample by sample, in float64 NumPy.

    The state is handed to SciPy as a float64 array and cast back to the
    state's dtype and device for every evaluation of ``F``. Methods that use
    a Jacobian (``hybr``, ``lm``) get it exactly, by forward-mode
    differentiation of ``F`` (``torch.func.jacfwd`` through
    ``System.residual_jvp``), never by finite differences.

    Batched problems are solved one sample after another. Sample ``b`` is
    solved as the function ``x ↦ F(z)[b]`` of row ``b`` alone, evaluated on
    the whole batch with the other rows held at their current values (the
    user's ``F`` may close over batched inputs, so a row cannot be evaluated
    on its own). This keeps each SciPy run the size of one sample (a dense
    ``hybr`` Jacobian of the block-diagonal whole would be ``(B·N)²``) at
    the price of one batched evaluation per SciPy evaluation: ``nfe`` is
    the sum over samples of SciPy's ``nfev`` (plus one evaluation per
    Jacobian), ``iterations`` the largest per-sample ``nit`` (``nfev`` for
    ``hybr``, ``lm``).

    The library's tolerance ``‖F(z)‖ ≤ tol·‖z‖ + atol`` decides convergence,
    checked once at the end. SciPy's stopping rules are set from it: the
    residual methods (``krylov``, ``broyden1``, …, ``df-sane``) stop at
    ``‖F‖₂ ≤ tol·s + atol``, with ``s`` the larger of ``‖z‖`` and
    ``‖z - F(z)‖`` at the start (an estimate of ``‖z*‖``, since ``‖z*‖`` is
    not known beforehand); ``hybr`` and ``lm`` get ``xtol = tol``. A sample
    that SciPy reports solved but that misses the library's tolerance is
    run again from where it stopped, with the estimate of ``‖z*‖`` renewed
    and ``xtol`` divided by 100, at most ``max_rounds`` times in all while
    budget remains. ``max_iter`` is each sample's budget, given to SciPy as
    ``maxfev`` (``hybr``, ``df-sane``) or ``maxiter`` (the others; ``lm``
    counts evaluations there). Options set in ``scipy_options`` win over
    all of these.

    Args:
        method: The :func:`scipy.optimize.root` method.
        scipy_options: Passed to :func:`scipy.optimize.root` as its
            ``options`` (named so to leave :meth:`Solver.options` alone).
            Unknown keys for the method are an error.
    """

    max_rounds: ClassVar[int] = 3

    method: str = "hybr"
    scipy_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        one_of("method", self.method, _METHODS)
        if self.scipy_options is not None:
            if not isinstance(self.scipy_options, Mapping):
                raise ValueError(f"scipy_options must be a dict or None; got {type(self.scipy_options).__name__}")
            known = _OPTIONS[self.method]
            for key in self.scipy_options:
                if key not in known:
                    close = difflib.get_close_matches(str(key), known, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"unknown scipy_options key {key!r} for method {self.method!r}{hint} Options: {', '.join(known)}"
                    )

    def solve(self, system: System, z0: torch.Tensor, monitor: Monitor) -> torch.Tensor:
        z = z0.clone()
        f = system.residual(z)
        if monitor.check(z, f):
            return z
        assert monitor.active is not None
        todo = _compat.tolist(monitor.active.cpu())
        work = [0] * system.batch
        failure = ""
        for b in range(system.batch):
            if todo[b]:
                work[b], why = self._solve_sample(system, z, f, b, monitor)
                failure = failure or why
        f = system.residual(z)
        used = max(work)
        monitor.iterations = used
        stopped = monitor.check(z, f)
        monitor.iterations = used  # check() counts a step to come when it does not stop; none comes
        assert monitor.converged is not None
        if not monitor.nonfinite and not bool(monitor.converged.all()):
            # SciPy's own account of the failure says more than the monitor's.
            if failure:
                monitor.message = failure
            elif not stopped:
                monitor.message = f"scipy.optimize.root(method={self.method!r}) stopped before meeting tol"
        return z

    def _solve_sample(
        self, system: System, z: torch.Tensor, f: torch.Tensor, b: int, monitor: Monitor
    ) -> tuple[int, str]:
        """Solve row ``b`` in place in ``z``; return SciPy's work count and why it stopped if it failed."""
        from scipy.optimize import root

        fun, jac = _sample_functions(system, z, b)
        budget_key, count_key = _BUDGET[self.method]
        user = dict(self.scipy_options or {})
        x = _numpy(z[b])
        scale = max(float(np.linalg.norm(x)), float(np.linalg.norm(x - _numpy(f[b]))))
        xtol = monitor.tol
        used = 0
        why = ""
        for _ in range(self.max_rounds):
            options: dict[str, Any] = {budget_key: max(monitor.max_iter - used, 1)}
            threshold = self._threshold(monitor, b, scale)
            if self.method in _USES_JACOBIAN:
                options["xtol"] = xtol
            elif self.method == "df-sane":
                options.update(fatol=threshold, ftol=0.0)
            else:
                options.update(fatol=threshold, tol_norm=np.linalg.norm)
            options.update(user)
            try:
                result = root(
                    fun, x, method=self.method, jac=jac if self.method in _USES_JACOBIAN else None, options=options
                )
            except _NonFinite:  # z[b] holds the point where F is not finite, for the final check
                return used, ""
            used += int(result.get(count_key, result.get("nfev", 0)))
            x = np.asarray(result.x, dtype=np.float64).reshape(-1)
            z[b] = torch.as_tensor(x, dtype=system.dtype, device=system.device)
            f_x = np.asarray(result.fun, dtype=np.float64).reshape(-1)
            residual = float(np.linalg.norm(f_x))
            scale = max(float(np.linalg.norm(x)), float(np.linalg.norm(x - f_x)))
            if math.isfinite(residual) and residual <= self._threshold(monitor, b, float(np.linalg.norm(x))):
                return used, ""
            why = f"scipy.optimize.root(method={self.method!r}) stopped on sample {b}: {result.message}"
            if not result.success or used >= monitor.max_iter or not math.isfinite(residual):
                break
            xtol /= 100
        return used, why

    @staticmethod
    def _threshold(monitor: Monitor, b: int, norm: float) -> float:
        """The library's residual bound for sample ``b`` when ``‖z_b‖`` is ``norm``."""
        reference = norm if monitor.reference is None else float(monitor.reference[b])
        return monitor.tol * reference + monitor.atol


class _NonFinite(Exception):
    """Raised by a sample's residual function to stop SciPy at a non-finite value."""


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy, flat (SciPy may write into its arrays; ``z`` must not change under it)."""
    return _matrix(t).reshape(-1)


def _matrix(t: torch.Tensor) -> np.ndarray:
    """A float64 NumPy copy of ``t`` in its shape."""
    # Inside a torch.func transform (grad or jvp over a solve) the values carry
    # the transform's wrappers, and new tensors would be wrapped again: read
    # the values beneath with the transforms switched off.
    with _compat.functorch_disabled():
        return plain(t.detach()).to(device="cpu", dtype=torch.float64, copy=True).numpy()


def _sample_functions(
    system: System, z: torch.Tensor, b: int
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """``x ↦ F(z)[b]`` with row ``b`` of ``z`` set to ``x``, and its Jacobian, on NumPy float64 arrays."""
    size = system.size

    def place(x: np.ndarray) -> None:
        z[b] = torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=system.dtype, device=system.device)

    def fun(x: np.ndarray) -> np.ndarray:
        place(x)
        out = _numpy(system.residual(z)[b])
        if not np.isfinite(out).all():
            raise _NonFinite  # SciPy would go on evaluating around it; the monitor names the variable
        return out

    def jac(x: np.ndarray) -> np.ndarray:
        place(x)
        # Tangent k is e_k in row b and zero elsewhere, so its product is column k of row b's
        # block. Chunks of tangents keep the vmapped batch near 2²² numbers.
        chunk = max(1, min(size, 2**22 // max(1, system.batch * size)))
        cols = []
        for start in range(0, size, chunk):
            k = torch.arange(start, min(start + chunk, size), device=system.device)
            basis = torch.zeros(len(k), system.batch, size, dtype=system.dtype, device=system.device)
            basis[torch.arange(len(k), device=system.device), b, k] = 1.0
            try:
                cols.append(torch.func.vmap(lambda v: system.residual_jvp(z, v)[1][b])(basis))
            except (RuntimeError, NotImplementedError):  # an op without a batching rule: one product each
                cols.append(torch.stack([system.residual_jvp(z, v)[1][b] for v in basis]))
        return _matrix(torch.cat(cols).T)

    return fun, jac
