"""The methods compared: implicit, torchdeq, the hand-written loop, unrolled backprop, scipy.

Every method runs the same :class:`~benchmarks.problems.Problem` (its map
counts evaluations) at the same ``tol`` and ``max_iter``. ``forward`` returns
an :class:`Outcome` whose ``z`` carries the method's gradient; the harness
times ``forward`` and ``torch.autograd.grad(problem.loss(z), problem.params)``
separately.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import autograd, nn

import implicit

from .problems import Problem, Reference

# -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    z: Any
    iterations: float
    converged: bool
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    """One row of the comparison."""

    family = ""
    differentiable = True
    dtype: torch.dtype = torch.float32

    def __init__(self, label: str) -> None:
        self.label = label

    def available(self, problem: Problem) -> str | None:
        """``None`` when the method can run ``problem``, else why not."""
        return None

    def prepare(self, problem: Problem, ref: Reference) -> None:
        """Set-up outside the timed region (build modules, per-sample tolerances)."""

    def forward(self, problem: Problem, tol: float, max_iter: int) -> Outcome:
        raise NotImplementedError

    def backward_iterations(self, out: Outcome) -> float | None:
        return None


# --- implicit -----------------------------------------------------------------------------


class Implicit(Method):
    family = "implicit"

    def __init__(self, solver: str, adjoint: str, dtype: torch.dtype = torch.float32) -> None:
        suffix = "" if dtype == torch.float32 else " (float64)"
        super().__init__(f"implicit {solver} + {adjoint}{suffix}")
        self.solver, self.adjoint, self.dtype = solver, adjoint, dtype

    def available(self, problem: Problem) -> str | None:
        if self.adjoint == "exact":
            max_size = implicit.get_adjoint("exact")().options().get("max_size", 2**26)
            z = problem.flatten(problem.z0())
            if z.shape[0] * z.shape[1] ** 2 > max_size:
                return f"Jacobian of {z.shape[0]} x {z.shape[1]}² entries is over exact's max_size"
        return None

    def forward(self, problem: Problem, tol: float, max_iter: int) -> Outcome:
        sol = implicit.solve(
            implicit.ImplicitProblem.fixed_point(problem.f, batched=True),
            problem.z0(),
            solver=self.solver,
            adjoint=self.adjoint,
            tol=tol,
            atol=1e-12 if tol > 0 else 0.0,  # tol = 0: run exactly max_iter iterations
            max_iter=max_iter,
            on_failure="ignore",
            # tol = 0 (the saved-bytes pass runs exactly max_iter iterations) is no adjoint tolerance
            adjoint_options={"tol": tol or 1e-12, "max_iter": max_iter} if self.adjoint != "exact" else None,
        )
        return Outcome(sol.z, sol.stats.iterations, sol.converged, {"solution": sol})

    def backward_iterations(self, out: Outcome) -> float | None:
        stats = out.info["solution"].adjoint_stats
        return None if stats is None else stats.iterations


# --- torchdeq 0.1.0 -----------------------------------------------------------------------


def torchdeq_layer(solver: str, tol: float, max_iter: int) -> Any:
    """``torchdeq.get_deq(ift=True)`` with ``solver`` forward and backward, relative stops, in train mode."""
    from torchdeq import get_deq

    return get_deq(
        f_solver=solver,
        b_solver=solver,
        f_max_iter=max_iter,
        b_max_iter=max_iter,
        f_tol=tol,
        b_tol=tol,
        f_stop_mode="rel",
        b_stop_mode="rel",
        ift=True,
    ).train()


class TorchDEQ(Method):
    """``torchdeq.get_deq(ift=True)`` with the same solver forward and backward.

    Quirks handled here: torchdeq reads every option from one config (``f_*`` /
    ``b_*`` pairs); its tolerance is compared with ``max`` over the batch of
    ``‖f(z) − z‖ / ‖f(z)‖`` under ``stop_mode='rel'`` (the closest to implicit's
    per-sample ``‖f(z) − z‖ ≤ tol·‖z‖``); ``max_iter`` counts evaluations of
    ``f`` (Anderson's two start-up evaluations included); it returns ``f`` of
    the best iterate, the IFT needs training mode, and a tuple state is
    flattened into one vector by its ``MDEQWrapper`` (the map then receives
    the variables as positional arguments).
    """

    family = "torchdeq"

    def __init__(self, solver: str, limited_memory: bool = False) -> None:
        super().__init__(f"torchdeq {solver}" + (" (memory as implicit's)" if limited_memory else ""))
        self.solver = solver
        self.limited_memory = limited_memory
        self._deqs: dict[tuple[float, int], Any] = {}
        self._bwd: list[float] = []

    def available(self, problem: Problem) -> str | None:
        try:
            import torchdeq  # noqa: F401
        except ImportError:
            return "torchdeq is not installed (pip install torchdeq==0.1.0)"
        return None

    def _solver_name(self) -> str:
        """The torchdeq solver name, or a limited-memory Broyden registered with torchdeq.

        torchdeq's Broyden keeps ``LBFGS_thres`` rank-one terms, ``max_iter`` by
        default, and zero-fills buffers of ``batch x dim x LBFGS_thres`` on every
        call (forward and backward); with a large max_iter that fill costs as
        much as many evaluations of ``f``. The limited-memory row gives it the
        memory of implicit's Broyden instead (it then overwrites its oldest
        term when full, where implicit's restarts).
        """
        if not self.limited_memory:
            return self.solver
        from functools import partial

        from torchdeq.solver import broyden_solver, register_solver

        memory = (
            implicit.get_solver("broyden")().options().get("memory", 20)
            if "broyden" in implicit.available_solvers()
            else 20
        )
        name = f"broyden_mem{memory}"
        register_solver(name, partial(broyden_solver, LBFGS_thres=memory))
        return name

    def _deq(self, tol: float, max_iter: int) -> Any:
        key = (tol, max_iter)
        if key not in self._deqs:
            self._deqs[key] = torchdeq_layer(self._solver_name(), tol, max_iter)
        return self._deqs[key]

    def prepare(self, problem: Problem, ref: Reference) -> None:
        self._deq(0.0, 1)

    def forward(self, problem: Problem, tol: float, max_iter: int) -> Outcome:
        deq = self._deq(tol, max_iter)
        info_bwd: dict[str, float] = {}

        def writer(info: dict[str, torch.Tensor]) -> None:
            info_bwd["iterations"] = float(info["nstep"].max())

        keys = problem.keys
        if keys is None:
            z_out, info = deq(problem.f, problem.z0(), backward_writer=writer)
            z = z_out[-1]
        else:
            z0 = problem.z0()

            def func(*zs: torch.Tensor) -> tuple[torch.Tensor, ...]:
                out = problem.f(dict(zip(keys, zs)))
                return tuple(out[k] for k in keys)

            z_out, info = deq(func, tuple(z0[k] for k in keys), backward_writer=writer)
            z = dict(zip(keys, z_out[-1]))
        return Outcome(
            z, float(info["nstep"].max()), bool(info["rel_lowest"].max() < tol) if tol > 0 else False, {"bwd": info_bwd}
        )

    def backward_iterations(self, out: Outcome) -> float | None:
        return out.info["bwd"].get("iterations")


# --- the hand-written loop of the original question -----------------------------------------


def forward_iteration(
    f: Any, x0: torch.Tensor, max_iter: int = 50, tol: float = 1e-2
) -> tuple[torch.Tensor, list[float]]:
    """The question's Picard loop, verbatim (a batch-global relative residual)."""
    f0 = f(x0)
    res = []
    for _k in range(max_iter):
        x = f0
        f0 = f(x)
        res.append((f0 - x).norm().item() / (1e-5 + f0.norm().item()))
        if res[-1] < tol:
            break
    return f0, res


class DEQFixedPoint(nn.Module):
    """The question's layer, verbatim: no-grad Picard, one ``f`` with graph, and a
    backward hook solving ``g = Jᵀ g + grad`` by the same fixed-point loop."""

    def __init__(self, f: Any, solver: Any, **kwargs: Any) -> None:
        super().__init__()
        self.f = f
        self.solver = solver
        self.kwargs = kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z, self.forward_res = self.solver(lambda z: self.f(z, x), torch.zeros_like(x), **self.kwargs)
        z = self.f(z, x)
        z0 = z.clone().detach().requires_grad_()
        f0 = self.f(z0, x)

        def backward_hook(grad: torch.Tensor) -> torch.Tensor:
            g, self.backward_res = self.solver(
                lambda y: autograd.grad(f0, z0, y, retain_graph=True)[0] + grad, grad, **self.kwargs
            )
            return g

        z.register_hook(backward_hook)
        return z


class HandLoop(Method):
    """The question's layer on the flat state (a dict state is concatenated by hand)."""

    family = "hand"

    def __init__(self) -> None:
        super().__init__("hand loop (question)")

    def forward(self, problem: Problem, tol: float, max_iter: int) -> Outcome:
        layer = DEQFixedPoint(lambda v, _x: problem.f_flat(v), forward_iteration, max_iter=max_iter, tol=tol)
        x = problem.flatten(problem.z0())  # the state's shape; zeros, as in the question
        z = layer(x)
        out = Outcome(problem.unflatten(z), len(layer.forward_res), layer.forward_res[-1] < tol, {"layer": layer})
        return out

    def backward_iterations(self, out: Outcome) -> float | None:
        res = getattr(out.info["layer"], "backward_res", None)
        return None if res is None else len(res)


class PerVariableHooks(Method):
    """The question's attempt completed as asked: one hook per variable, each solving
    its own block ``g_x = J_xxᵀ g_x + grad_x``. It ignores the coupling: wrong gradients."""

    family = "hand"

    def __init__(self) -> None:
        super().__init__("hand loop, one hook per variable")

    def available(self, problem: Problem) -> str | None:
        return None if problem.keys is not None else "single-variable problem"

    def forward(self, problem: Problem, tol: float, max_iter: int) -> Outcome:
        keys = problem.keys
        assert keys is not None
        with torch.no_grad():
            v, res = forward_iteration(problem.f_flat, problem.flatten(problem.z0()), max_iter=max_iter, tol=tol)
        z = problem.f(problem.unflatten(v))
        z0 = {k: z[k].clone().detach().requires_grad_() for k in keys}
        f0 = problem.f(z0)
        bwd: dict[str, int] = {}
        for k in keys:

            def backward_hook(grad: torch.Tensor, k: str = k) -> torch.Tensor:
                g, r = forward_iteration(
                    lambda y: autograd.grad(f0[k], z0[k], y, retain_graph=True)[0] + grad,
                    grad,
                    max_iter=max_iter,
                    tol=tol,
                )
                bwd[k] = len(r)
                return g

            z[k].register_hook(backward_hook)
        return Outcome(z, len(res), res[-1] < tol, {"bwd": bwd})

    def backward_iterations(self, out: Outcome) -> float | None:
        return max(out.info["bwd"].values()) if out.info["bwd"] else None


# --- unrolled backprop --------------------------------------------------------------------


class Unrolled(Method):
    """Picard iteration recorded by autograd; the gradient is backprop through every step."""

    family = "unrolled"

    def __init__(self) -> None:
        super().__init__("unrolled backprop (Picard)")

    def forward(self, problem: Problem, tol: float, max_iter: int) -> Outcome:
        z = problem.z0()
        converged = False
        k = 0
        for k in range(1, max_iter + 1):  # noqa: B007
            fz = problem.f(z)
            with torch.no_grad():
                zf, ff = problem.flatten(z), problem.flatten(fz)
                ok = ((ff - zf).norm(dim=1) <= tol * zf.norm(dim=1) + 1e-12).all().item()
            z = fz
            if ok:
                converged = True
                break
        return Outcome(z, k, converged)


# --- scipy.optimize, one sample at a time in float64 ---------------------------------------


class Scipy(Method):
    """``scipy.optimize.<method>`` on ``F(z) = f(z) − z`` per sample, float64 on the CPU.

    The tolerance is implicit's: ``‖F(z_b)‖₂ ≤ tol·‖z*_b‖`` (scipy's ``f_tol`` is
    absolute, so it is set per sample from the reference solution's norm, with
    ``tol_norm`` the Euclidean norm instead of scipy's default max-norm).
    Anderson gets ``alpha=1`` (the right initial Jacobian ``−I`` for a fixed-point
    residual; scipy's default guesses a scale from the first residual).
    """

    family = "scipy"
    differentiable = False
    dtype = torch.float64

    def __init__(self, method: str) -> None:
        super().__init__(f"scipy {method} (per sample, float64)")
        self.method = method
        self._norms: torch.Tensor | None = None

    def available(self, problem: Problem) -> str | None:
        if problem.params[0].device.type != "cpu":
            return "CPU only"
        return None

    def prepare(self, problem: Problem, ref: Reference) -> None:
        self._norms = ref.sample_norms

    def forward(self, problem: Problem, tol: float, max_iter: int) -> Outcome:
        import scipy.optimize as so

        assert self._norms is not None
        z0 = problem.flatten(problem.z0())
        batch = z0.shape[0]
        out, iters, ok_all = [], [], True
        with torch.no_grad():
            for b in range(batch):
                count = [0]

                def F(v: np.ndarray, b: int = b, count: list[int] = count) -> np.ndarray:
                    count[0] += 1
                    t = torch.from_numpy(v).view(1, -1)
                    return (problem.f_sample(t, b) - t).view(-1).numpy()

                kw = dict(f_tol=tol * float(self._norms[b]) + 1e-12 if tol > 0 else 1e-300, tol_norm=np.linalg.norm)
                try:
                    if self.method == "newton_krylov":
                        x = so.newton_krylov(F, z0[b].numpy(), maxiter=max_iter, **kw)
                    else:
                        x = so.anderson(F, z0[b].numpy(), maxiter=max_iter, alpha=1.0, M=5, **kw)
                except so.NoConvergence as exc:
                    x, ok_all = exc.args[0], False
                out.append(torch.as_tensor(x))
                iters.append(count[0])
        z = problem.unflatten(torch.stack(out))
        return Outcome(z, float(np.mean(iters)), ok_all, {"per_sample_calls": iters})


# -----------------------------------------------------------------------------------------


def all_methods(device: torch.device) -> list[Method]:
    """Every row: each registered implicit solver, the adjoints, and the competitors."""
    solvers = implicit.available_solvers()
    adjoints = implicit.available_adjoints()
    primary = "gmres" if "gmres" in adjoints else "neumann"
    methods: list[Method] = [Implicit(s, primary) for s in solvers]
    base = "fixed_point"
    for a in ("neumann", "gmres", "exact"):
        if a in adjoints and a != primary:
            methods.append(Implicit(base, a))
    if "newton_krylov" in solvers and device.type == "cpu":
        methods.append(Implicit("newton_krylov", primary, dtype=torch.float64))
    methods += [TorchDEQ(s) for s in ("fixed_point_iter", "anderson", "broyden")]
    methods.append(TorchDEQ("broyden", limited_memory=True))
    methods += [HandLoop(), PerVariableHooks(), Unrolled()]
    if device.type == "cpu":
        methods += [Scipy("newton_krylov"), Scipy("anderson")]
    return methods


def finite(x: float | None) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))
