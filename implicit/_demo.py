"""The main job: the two-variable equilibrium ``(x*, y*) = f(x*, y*)`` run by every plugin.

The problem is the one that motivates the package: two state variables of
different sizes (``x`` of size 3, ``y`` of size 5), a batch of independent
samples, coupled both ways through a random contraction, with the map closing
over its parameters::

    x ← tanh(A x + B y + b_x + u)
    y ← tanh(C x + D y + b_y)

where ``[[A, B], [C, D]]`` is a random matrix of spectral norm ``contraction``
(below one, so ``f`` is a contraction) and ``u`` is a per-sample input. Each
case solves it with one forward solver and one adjoint by name, differentiates
a scalar loss with respect to every parameter and the input, and compares the
gradient with a reference computed here without the library: the fixed point
refined by Newton's method with the dense Jacobian, and the implicit function
theorem written out with the dense Jacobian and ``torch.linalg.solve``.

Every name comes from the registry, so solvers and adjoints installed by
third-party packages are run like the built-in ones. A case that fails
(no convergence, an exception) is reported with its status; it never stops the
run.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ._problem import ImplicitProblem
from ._registry import available_adjoints, available_solvers, forms_of, get_adjoint, get_solver
from ._solve import solve

__all__ = [
    "CaseResult",
    "DemoProblem",
    "Reference",
    "default_pairs",
    "make_problem",
    "reference_solution",
    "run_case",
    "run_demo",
]

State = dict[str, torch.Tensor]
PARAM_NAMES = ("A", "B", "C", "D", "b_x", "b_y", "u")


@dataclass
class DemoProblem:
    """The parameters of the demo equilibrium, every one of them requiring grad.

    Attributes:
        params: ``A (nx, nx)``, ``B (nx, ny)``, ``C (ny, nx)``, ``D (ny, ny)``,
            ``b_x (nx,)``, ``b_y (ny,)`` and the input ``u (batch, nx)``.
        loss_weights: Fixed weights ``w_x (batch, nx)``, ``w_y (batch, ny)`` of the loss.
        batch: Number of independent samples.
        nx: Size of ``x``.
        ny: Size of ``y``.
    """

    params: dict[str, torch.Tensor]
    loss_weights: dict[str, torch.Tensor]
    batch: int
    nx: int
    ny: int

    def f(self, z: State, params: dict[str, torch.Tensor] | None = None) -> State:
        """The fixed-point map ``(x, y) ↦ f(x, y)``, batched over dim 0."""
        p = self.params if params is None else params
        x, y = z["x"], z["y"]
        return {
            "x": torch.tanh(x @ p["A"].T + y @ p["B"].T + p["b_x"] + p["u"]),
            "y": torch.tanh(x @ p["C"].T + y @ p["D"].T + p["b_y"]),
        }

    def loss(self, z: State) -> torch.Tensor:
        """A scalar loss of the solution, nonlinear in both variables."""
        w = self.loss_weights
        return (w["x"] * z["x"]).sum() + (w["y"] * torch.sin(z["y"])).sum() + 0.5 * z["x"].pow(2).sum()

    def z0(self) -> State:
        """The initial state: zeros."""
        dtype = self.params["A"].dtype
        return {
            "x": torch.zeros(self.batch, self.nx, dtype=dtype),
            "y": torch.zeros(self.batch, self.ny, dtype=dtype),
        }

    def problem(self) -> ImplicitProblem:
        """The batched fixed-point problem, closing over :attr:`params`."""
        return ImplicitProblem.fixed_point(self.f, batched=True)


def make_problem(*, batch: int = 4, nx: int = 3, ny: int = 5, contraction: float = 0.9, seed: int = 0) -> DemoProblem:
    """The demo equilibrium in float64 with random parameters.

    Args:
        batch: Number of samples.
        nx: Size of ``x``.
        ny: Size of ``y``.
        contraction: Spectral norm of the coupling matrix ``[[A, B], [C, D]]``;
            below one makes ``f`` a contraction (``tanh`` is 1-Lipschitz).
        seed: Seed of the generator drawing the parameters.

    Returns:
        The problem, its parameters requiring grad.

    Raises:
        ValueError: for a non-positive size or contraction.
    """
    if min(batch, nx, ny) < 1:
        raise ValueError(f"batch, nx and ny must be positive; got batch={batch}, nx={nx}, ny={ny}")
    if not contraction > 0:
        raise ValueError(f"contraction must be positive; got {contraction}")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    w = torch.randn(nx + ny, nx + ny, dtype=f64, generator=g)
    w = w * (contraction / torch.linalg.matrix_norm(w, ord=2))
    params = {
        "A": w[:nx, :nx],
        "B": w[:nx, nx:],
        "C": w[nx:, :nx],
        "D": w[nx:, nx:],
        "b_x": 0.5 * torch.randn(nx, dtype=f64, generator=g),
        "b_y": 0.5 * torch.randn(ny, dtype=f64, generator=g),
        "u": torch.randn(batch, nx, dtype=f64, generator=g),
    }
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    weights = {
        "x": torch.randn(batch, nx, dtype=f64, generator=g),
        "y": torch.randn(batch, ny, dtype=f64, generator=g),
    }
    return DemoProblem(params=params, loss_weights=weights, batch=batch, nx=nx, ny=ny)


@dataclass
class Reference:
    """The exact solution and gradient, computed without the library.

    Attributes:
        z: The fixed point, refined by Newton's method to rounding.
        grads: ``dL/dθ`` for every parameter, by the dense implicit function theorem.
        residual: ``max |f(z) - z|`` at :attr:`z`.
    """

    z: State
    grads: dict[str, torch.Tensor]
    residual: float


def reference_solution(demo: DemoProblem, *, newton_steps: int = 50) -> Reference:
    """The fixed point and the loss gradient from dense Jacobians.

    The whole batch is one vector of ``batch·(nx+ny)`` unknowns; its Jacobian
    (block-diagonal, but not assumed so) comes from
    ``torch.autograd.functional.jacobian``. Newton's method on ``f(z) - z``
    finds ``z*``, then ``(I - ∂f/∂z)ᵀ v = ∂L/∂z`` is solved with
    ``torch.linalg.solve`` and ``v`` is pulled back through one evaluation of
    ``f`` to the parameters.

    Args:
        demo: The problem.
        newton_steps: The most Newton steps.

    Returns:
        The :class:`Reference`.
    """
    params = {k: v.detach() for k, v in demo.params.items()}
    shapes = {"x": (demo.batch, demo.nx), "y": (demo.batch, demo.ny)}
    split = demo.batch * demo.nx

    def unflat(v: torch.Tensor) -> State:
        return {"x": v[:split].reshape(shapes["x"]), "y": v[split:].reshape(shapes["y"])}

    def flat(z: State) -> torch.Tensor:
        return torch.cat([z["x"].reshape(-1), z["y"].reshape(-1)])

    def g(v: torch.Tensor) -> torch.Tensor:
        return flat(demo.f(unflat(v), params))

    v = flat(demo.z0())
    eye = torch.eye(v.numel(), dtype=v.dtype)
    with torch.no_grad():
        for _ in range(20):  # a few Picard steps bring Newton into its basin
            v = g(v)
    for _ in range(newton_steps):
        r = g(v) - v
        if float(r.abs().max()) <= 1e-15:
            break
        jac = torch.autograd.functional.jacobian(g, v)
        v = v - torch.linalg.solve(jac - eye, r)
    v = v.detach()
    residual = float((g(v) - v).abs().max())

    jac = torch.autograd.functional.jacobian(g, v)
    z_leaf = {k: t.clone().requires_grad_() for k, t in unflat(v).items()}
    dl_dz = torch.autograd.grad(demo.loss(z_leaf), [z_leaf["x"], z_leaf["y"]])
    rhs = torch.cat([d.reshape(-1) for d in dl_dz])
    adj = torch.linalg.solve((eye - jac).T, rhs)
    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    out = flat(demo.f(unflat(v), leaves))
    grads = torch.autograd.grad(out, list(leaves.values()), adj)
    return Reference(z=unflat(v), grads=dict(zip(leaves, grads)), residual=residual)


@dataclass
class CaseResult:
    """One row of the demo table.

    Attributes:
        solver: Forward solver name.
        adjoint: Adjoint name.
        status: ``"ok"``, ``"approx"`` (an approximate adjoint that ran),
            ``"symmetric"`` (an adjoint for symmetric Jacobians, such as ``cg``,
            that ran on this problem, whose Jacobian is not symmetric),
            ``"no conv"`` (forward did not converge), ``"adj no conv"``,
            ``"non-finite"`` or ``"error"``.
        iterations: Forward iterations (``None`` when the solve raised).
        nfe: Evaluations of ``f`` in the forward solve.
        adjoint_iterations: Iterations of the adjoint solve.
        forward_ms: Wall time of :func:`implicit.solve`, best of the repeats.
        backward_ms: Wall time of the backward pass, best of the repeats.
        residual: Largest per-sample ``‖f(z) - z‖`` at the end of the forward solve.
        solution_error: ``‖z - z_ref‖ / ‖z_ref‖``.
        grad_error: ``‖∇ - ∇_ref‖ / ‖∇_ref‖`` over all parameters together.
        history: Largest residual over the batch after each forward iteration.
        messages: Warnings and errors met, for the notes under the table.
    """

    solver: str
    adjoint: str
    status: str = "error"
    iterations: int | None = None
    nfe: int | None = None
    adjoint_iterations: int | None = None
    forward_ms: float = math.nan
    backward_ms: float = math.nan
    residual: float = math.nan
    solution_error: float = math.nan
    grad_error: float = math.nan
    history: list[float] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)


def _rel(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    da = torch.cat([x.reshape(-1) for x in a])
    db = torch.cat([x.reshape(-1) for x in b])
    return float(torch.linalg.vector_norm(da - db) / torch.linalg.vector_norm(db).clamp_min(1e-300))


def run_case(
    demo: DemoProblem,
    ref: Reference,
    solver: str,
    adjoint: str,
    *,
    tol: float = 1e-10,
    max_iter: int = 300,
    repeat: int = 1,
) -> CaseResult:
    """Solve and differentiate the demo with one solver and one adjoint.

    Never raises for a failure of the solver or adjoint: non-convergence,
    warnings and exceptions end up in :attr:`CaseResult.status` and
    :attr:`CaseResult.messages`.

    Args:
        demo: The problem.
        ref: Its reference solution and gradient.
        solver: A registered forward solver name.
        adjoint: A registered adjoint name.
        tol: Relative tolerance of the forward solve (and, by default, of the adjoint).
        max_iter: The most forward iterations.
        repeat: Runs to time; the best time is kept.

    Returns:
        The :class:`CaseResult`.
    """
    row = CaseResult(solver=solver, adjoint=adjoint)
    forward_times: list[float] = []
    backward_times: list[float] = []
    sol: object = None
    grads: tuple[torch.Tensor, ...] | None = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.simplefilter("ignore", category)  # about the environment, not about this case
        try:
            for _ in range(max(1, repeat)):
                grads = None
                start = time.perf_counter()
                sol = solve(demo.problem(), demo.z0(), solver=solver, adjoint=adjoint, tol=tol, max_iter=max_iter)
                forward_times.append(time.perf_counter() - start)
                loss = demo.loss(sol.z)  # type: ignore[attr-defined]
                start = time.perf_counter()
                grads = torch.autograd.grad(loss, list(demo.params.values()), allow_unused=True)
                backward_times.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - a plugin's failure is a row of the table, not a crash
            row.messages.append(f"{type(exc).__name__}: {exc}")
            grads = None
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in row.messages:
            row.messages.append(text)

    if forward_times:
        row.forward_ms = 1e3 * min(forward_times)
    if sol is not None:
        stats = sol.stats  # type: ignore[attr-defined]
        row.iterations, row.nfe = stats.iterations, stats.nfe
        row.residual = float(stats.residual.max())
        hist = stats.history
        row.history = [float(h) for h in (hist.amax(dim=1) if hist.dim() == 2 else hist)]
        z = sol.z  # type: ignore[attr-defined]
        row.solution_error = _rel([z["x"].detach(), z["y"].detach()], [ref.z["x"], ref.z["y"]])
        adj_stats = sol.adjoint_stats  # type: ignore[attr-defined]
        if adj_stats is not None:
            row.adjoint_iterations = adj_stats.iterations
    if grads is not None and backward_times:
        row.backward_ms = 1e3 * min(backward_times)
        got = [g if g is not None else torch.zeros_like(r) for g, r in zip(grads, ref.grads.values())]
        row.grad_error = _rel(got, list(ref.grads.values()))
    row.status = _status(row, sol, grads)
    return row


def _status(row: CaseResult, sol: object, grads: object) -> str:
    if sol is None or grads is None:
        return "error"
    stats = sol.stats  # type: ignore[attr-defined]
    if "non-finite" in stats.message or not math.isfinite(row.grad_error):
        return "non-finite"
    if not stats.all_converged:
        return "no conv"
    adj = sol.adjoint_stats  # type: ignore[attr-defined]
    if get_adjoint(row.adjoint).approximate:
        return "approx"
    if getattr(get_adjoint(row.adjoint), "symmetric", False):
        return "symmetric"  # solves the wrong equation here, by design: not judged against the reference
    if adj is not None and not adj.all_converged:
        return "adj no conv"
    return "ok"


def _default(name: str, available: Sequence[str], fallbacks: Iterable[str]) -> str:
    """``solve``'s default for ``name`` if registered, else the first registered fallback."""
    default = inspect.signature(solve).parameters[name].default
    for candidate in (default, *fallbacks):
        if candidate in available:
            return candidate
    return available[0]


def default_pairs(
    solvers: Sequence[str] | None = None, adjoints: Sequence[str] | None = None, *, grid: bool = False
) -> list[tuple[str, str]]:
    """The (solver, adjoint) cases to run.

    Without ``grid``: every solver with the default adjoint, then every other
    adjoint with the default solver (the defaults of :func:`implicit.solve`
    when they are registered, else ``exact`` and ``fixed_point``). With
    ``grid``: every solver with every adjoint.

    Args:
        solvers: Solver names; all registered ones by default.
        adjoints: Adjoint names; all registered ones by default.
        grid: Run the full product.

    Returns:
        The pairs, in order.
    """
    # The demo is a fixed-point problem: solvers of optimisation problems only
    # (``forms`` without "root") have nothing to solve in it.
    all_solvers = [s for s in available_solvers() if "root" in forms_of(get_solver(s))]
    all_adjoints = [a for a in available_adjoints() if "root" in forms_of(get_adjoint(a))]
    solvers = list(solvers) if solvers else all_solvers
    adjoints = list(adjoints) if adjoints else all_adjoints
    if grid:
        return [(s, a) for s in solvers for a in adjoints]
    base_adjoint = _default("adjoint", adjoints, ("exact", "gmres", "neumann"))
    base_solver = _default("solver", solvers, ("anderson", "fixed_point"))
    pairs = [(s, base_adjoint) for s in solvers]
    pairs += [(base_solver, a) for a in adjoints if a != base_adjoint]
    return pairs


def run_demo(
    pairs: Sequence[tuple[str, str]],
    *,
    demo: DemoProblem | None = None,
    tol: float = 1e-10,
    max_iter: int = 300,
    repeat: int = 1,
    progress: Callable[[int, int, CaseResult | None, str], None] | None = None,
) -> tuple[list[CaseResult], Reference]:
    """Run every case on the demo problem.

    Args:
        pairs: The (solver, adjoint) cases, e.g. from :func:`default_pairs`.
        demo: The problem; :func:`make_problem` with its defaults if ``None``.
        tol: Forward tolerance.
        max_iter: The most forward iterations.
        repeat: Timed runs per case.
        progress: Called as ``progress(i, n, result_or_None, label)`` before
            (``None``) and after each case.

    Returns:
        The results in the order of ``pairs`` and the reference.
    """
    demo = make_problem() if demo is None else demo
    ref = reference_solution(demo)
    rows = []
    for i, (s, a) in enumerate(pairs):
        label = f"{s} + {a}"
        if progress is not None:
            progress(i, len(pairs), None, label)
        row = run_case(demo, ref, s, a, tol=tol, max_iter=max_iter, repeat=repeat)
        rows.append(row)
        if progress is not None:
            progress(i, len(pairs), row, label)
    return rows, ref
