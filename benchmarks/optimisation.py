"""Optimisation problems: implicit next to torchopt, qpth and scipy.optimize.minimize (L-BFGS-B).

Run from the repository root::

    python -m benchmarks.optimisation                 # about a minute on 2 cores
    python -m benchmarks.optimisation --quick --out /tmp/optim.md

Three comparisons, every method on the same problem, in float64, timed in
round-robin rounds (every method once per round, in rotating order; medians
with the interquartile range):

(a) bilevel: the hypergradient ``dL/dθ`` of the validation loss of a logistic
    regression with one L2 penalty ``e^{θ_g}`` per feature group
    (``examples/logistic_hypergradient.py``) at ``θ = 0``. ``implicit.argmin``
    (``lbfgs`` forward, ``cg`` adjoint) against ``torchopt.diff.implicit.custom_root``
    with torchopt's CG (``solve_cg``) on the same optimality condition, its
    forward solve either ``torch.optim.LBFGS`` (strong Wolfe) or implicit's own
    ``lbfgs`` run without its derivative (the same forward: only the
    differentiation differs). Reference: the dense float64 IFT at a solution to
    1e-13 (Hessian materialised).
(b) QP layer: batched random QPs ``min ½xᵀQx + qᵀx, Ax = b, Gx ≤ h``
    (``Q = LLᵀ/N + 0.1 I``), ``qpth.qp.QPFunction`` (batched primal-dual
    interior point) against implicit's ``newton`` on the Fischer–Burmeister
    KKT residual (as in ``tests/test_qp_fischer_burmeister.py``), gradients of
    ``Σ c ⊙ x*`` with respect to ``L, q, G, h, A, b``. Reference: the KKT
    system of the active constraints, solved densely per sample.
(c) batched inner solves: ``B = 64`` of the logistic problems of (a), each
    with its own penalties, by implicit's batched ``lbfgs`` against
    ``scipy.optimize.minimize(method="L-BFGS-B")`` one sample at a time (a NumPy
    objective with its analytic gradient, and the torch objective with its
    autograd gradient), ``maxcor = m = 10``, SciPy's ``gtol`` set so that its
    stop implies implicit's (``‖∇f‖∞ ≤ tol·‖z*‖/√N``), ``ftol = 0``.

A competitor that is not installed is skipped with one line.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np
import scipy.optimize
import torch
from threadpoolctl import threadpool_limits

import implicit

from .measure import Series, describe_machine, load_average

f64 = torch.float64
ATOL = 1e-12  # implicit's absolute tolerance floor, passed explicitly where the figures use it
ROOT = Path(__file__).resolve().parents[1]


def example(name: str) -> ModuleType:
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def optional(name: str) -> ModuleType | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError:
        print(f"{name} not installed: its rows are skipped (pip install {name})")
        return None


@dataclass
class Row:
    """One method's runs: forward and backward times (s), and what its first run returned."""

    name: str
    run: Callable[[], tuple[float, float, Any]]
    fwd: Series = field(default_factory=Series)
    bwd: Series = field(default_factory=Series)
    out: Any = None

    @property
    def total(self) -> float:
        return float(np.median([f + b for f, b in zip(self.fwd.values, self.bwd.values)]))


def time_rows(rows: list[Row], reps: int) -> None:
    """A first run of each row (its result and warm-up), then ``reps`` rounds in rotating order."""
    for row in rows:
        _, _, row.out = row.run()
    for r in range(reps):
        for row in rows[r % len(rows) :] + rows[: r % len(rows)]:
            f, b, _ = row.run()
            row.fwd.add(f)
            row.bwd.add(b)


def ms(s: Series) -> str:
    lo, hi = s.quartiles()
    return f"{1e3 * s.median:.3g} [{1e3 * lo:.3g}–{1e3 * hi:.3g}]"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


# ----------------------------------------------------------------------------- (a) bilevel


def target(what: str, measured: str, met: bool | None, note: str = "") -> str:
    """One row of the targets table; ``met=None`` where the comparison cannot be made as stated."""
    verdict = "n/a" if met is None else "met" if met else "**missed**"
    return f"| {what} | {measured} | {verdict} | {note} |"


def bilevel(reps: int) -> tuple[list[str], list[str]]:
    torchopt = optional("torchopt")
    ex = example("logistic_hypergradient")
    data = ex.load()
    n = data.X.shape[1] + 1  # w and b in one vector
    theta0 = torch.zeros(len(ex.GROUPS), dtype=f64)
    unflat = lambda v: {"w": v[:-1], "b": v[-1]}  # noqa: E731
    objective = lambda v, t: ex.training_objective(unflat(v), t, data)  # noqa: E731
    validation = lambda v: ex.validation_loss(unflat(v), data)  # noqa: E731
    optimality = torch.func.grad(objective)  # ∇_z f(z, θ), what torchopt differentiates

    exact = implicit.solve(
        implicit.ImplicitProblem.argmin(lambda v: objective(v, theta0)),
        torch.zeros(n, dtype=f64),
        solver="newton_cg",
        tol=1e-13,
        max_iter=200,
        on_failure="raise",
    ).z
    hessian = torch.func.hessian(objective)(exact, theta0)
    mixed = torch.func.jacrev(optimality, argnums=1)(exact, theta0)
    reference = -mixed.T @ torch.linalg.solve(hessian, torch.func.grad(validation)(exact))

    # Forward solves without derivatives, for torchopt to differentiate: (z*, iterations).
    def implicit_lbfgs_forward(v0: torch.Tensor, t: torch.Tensor, tol: float) -> tuple[torch.Tensor, int]:
        problem = implicit.ImplicitProblem.argmin(lambda v: objective(v, t.detach()))
        sol = implicit.solve(problem, v0, solver="lbfgs", tol=tol, max_iter=2000, on_failure="raise")
        return sol.z.detach(), sol.stats.iterations

    def torch_lbfgs_forward(v0: torch.Tensor, t: torch.Tensor, tol: float) -> tuple[torch.Tensor, int]:
        v = v0.clone().requires_grad_()
        opt = torch.optim.LBFGS(
            [v],
            lr=1,
            max_iter=2000,
            history_size=10,
            line_search_fn="strong_wolfe",
            tolerance_change=0.0,
            tolerance_grad=tol * float(exact.norm()) / math.sqrt(n),  # ‖∇f‖∞ ≤ that implies implicit's stop
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            f = objective(v, t.detach())
            f.backward()
            return f

        opt.step(closure)
        return v.detach(), int(opt.state[v]["n_iter"])

    def timed_hypergradient(solve: Callable[[torch.Tensor], tuple[torch.Tensor, int]]) -> tuple[float, float, Any]:
        t = theta0.clone().requires_grad_()
        t0 = time.perf_counter()
        z, iterations = solve(t)
        loss = validation(z)
        t1 = time.perf_counter()
        (g,) = torch.autograd.grad(loss, t)
        t2 = time.perf_counter()
        zd = z.detach()
        return t1 - t0, t2 - t1, (g, float(optimality(zd, theta0).norm() / zd.norm()), iterations)

    def implicit_row(tol: float) -> Row:
        def solve(t: torch.Tensor) -> tuple[torch.Tensor, int]:
            sol = implicit.solve(
                implicit.ImplicitProblem.argmin(lambda v: objective(v, t)),
                torch.zeros(n, dtype=f64),
                solver="lbfgs",
                adjoint="cg",
                tol=tol,
                max_iter=2000,
                adjoint_options={"tol": tol, "max_iter": 1000},
                on_failure="raise",
            )
            return sol.z, sol.stats.iterations

        return Row(f"implicit argmin: lbfgs + cg, tol {tol:g}", lambda: timed_hypergradient(solve))

    def torchopt_row(tol: float, forward: Callable, label: str) -> Row:
        assert torchopt is not None
        cg = torchopt.linear_solve.solve_cg(rtol=tol, maxiter=1000)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1, has_aux=True, solve=cg)
        def solver(v0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
            return forward(v0, t, tol)

        def run() -> tuple[float, float, Any]:
            with warnings.catch_warnings():  # torchopt 0.7 calls functorch.vjp, deprecated since PyTorch 2.0
                warnings.simplefilter("ignore", FutureWarning)
                return timed_hypergradient(lambda t: solver(torch.zeros(n, dtype=f64), t))

        return Row(f"torchopt custom_root + solve_cg, forward {label}, tol {tol:g}", run)

    lines = [
        f"### (a) Bilevel: logistic hypergradient (breast cancer, {len(ex.GROUPS)} penalty groups, {n} variables)",
        "",
        "| method | inner iterations | ‖∇f‖/‖z‖ reached | fwd ms [IQR] | bwd ms [IQR] | total ms | time ÷ implicit's | "
        "hypergrad. rel. err | max rel. diff to implicit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    targets = []
    for tol in (1e-6, 1e-10):
        rows = [implicit_row(tol)]
        if torchopt is not None:
            rows += [
                torchopt_row(tol, torch_lbfgs_forward, "torch.optim.LBFGS"),
                torchopt_row(tol, implicit_lbfgs_forward, "implicit lbfgs"),
            ]
        time_rows(rows, reps)
        base = rows[0]
        g0 = base.out[0]
        for row in rows:
            g, reached, iterations = row.out
            diff = float((g - g0).abs().max() / g0.abs().max())
            lines.append(
                f"| {row.name} | {iterations} | {reached:.1e} | {ms(row.fwd)} | {ms(row.bwd)} | "
                f"{1e3 * row.total:.3g} | {row.total / base.total:.2f} | {rel(g, reference):.1e} | {diff:.1e} |"
            )
        for row in rows[1:]:
            ratio, bwd = base.total / row.total, base.bwd.median / row.bwd.median
            what = f"hypergradient (fwd + bwd) no slower than torchopt's, {row.name.split(', ', 1)[1]}"
            measured = f"implicit ÷ torchopt time {ratio:.2f} (backward alone {bwd:.2f})"
            if row.out[1] > tol:
                note = f"torch.optim.LBFGS stops at ‖∇f‖/‖z‖ = {row.out[1]:.0e} (no decrease measurable), short of tol"
                targets.append(target(what, measured, None, note))
                continue
            fwd = f"{1e3 * base.fwd.median:.0f} vs {1e3 * row.fwd.median:.0f} ms"
            if ratio <= 1:
                note = ""
            elif "implicit lbfgs" in row.name:  # the same forward solver: what differs is noise and the attach
                lo, hi = base.fwd.quartiles()
                note = (
                    f"the same forward solver, {row.out[2]} iterations in both; forward {fwd} (implicit's IQR "
                    f"{1e3 * lo:.0f}–{1e3 * hi:.0f} ms): the timing spread, plus one evaluation at z* to attach"
                )
            else:
                note = (
                    f"the forward solve: {fwd}, {base.out[2]} vs {row.out[2]} iterations, "
                    f"{1e3 * base.fwd.median / base.out[2]:.1f} vs {1e3 * row.fwd.median / row.out[2]:.1f} ms each"
                )
            targets.append(target(what, measured, ratio <= 1, note))
    lines += [
        "",
        "`‖∇f‖/‖z‖ reached`: the inner gradient at the returned solution. `hypergrad. rel. err`: "
        "‖g − g_ref‖ / ‖g_ref‖ against the dense IFT. `max rel. diff to implicit`: max_k |g_k − g_implicit,k| / "
        "max_k |g_implicit,k|. The forward time of implicit includes the evaluation that attaches the derivative.",
        "",
    ]
    return lines, targets


# ----------------------------------------------------------------------------- (b) QP layer


def qp(reps: int, batch: int = 32, nx: int = 20, neq: int = 5, nineq: int = 20) -> tuple[list[str], list[str]]:
    qpth = optional("qpth")
    g = torch.Generator().manual_seed(0)
    L = torch.randn(batch, nx, nx, dtype=f64, generator=g)
    A = torch.randn(batch, neq, nx, dtype=f64, generator=g)
    G = torch.randn(batch, nineq, nx, dtype=f64, generator=g)
    feasible = torch.randn(batch, nx, dtype=f64, generator=g)
    b = (A @ feasible[..., None])[..., 0]
    h = (G @ feasible[..., None])[..., 0] + torch.rand(batch, nineq, dtype=f64, generator=g)
    q = 2 * torch.randn(batch, nx, dtype=f64, generator=g)
    c = torch.randn(batch, nx, dtype=f64, generator=g)  # the loss Σ c ⊙ x*
    inputs = {"L": L, "q": q, "G": G, "h": h, "A": A, "b": b}
    Q_of = lambda L: L @ L.mT / nx + 0.1 * torch.eye(nx, dtype=f64)  # noqa: E731
    mv = lambda m, v: (m @ v[..., None])[..., 0]  # noqa: E731

    def leaves() -> dict[str, torch.Tensor]:
        return {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def timed(solve: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, Any]]) -> tuple[float, float, Any]:
        p = leaves()
        t0 = time.perf_counter()
        x, extra = solve(p)
        t1 = time.perf_counter()
        grads = torch.autograd.grad((c * x).sum(), list(p.values()))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, (x.detach(), dict(zip(p, grads)), extra)

    def fischer_burmeister(adjoint: str) -> Row:
        def solve(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
            Q = Q_of(p["L"])

            def kkt(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                x, nu, lam = z["x"], z["nu"], z["lam"]
                s = p["h"] - mv(p["G"], x)
                return {
                    "x": mv(Q, x) + p["q"] + mv(p["A"].mT, nu) + mv(p["G"].mT, lam),
                    "nu": mv(p["A"], x) - p["b"],
                    "lam": lam + s - torch.sqrt(lam**2 + s**2),  # φ(λ, s) = 0 ⇔ λ ≥ 0, s ≥ 0, λs = 0
                }

            z0 = {
                "x": torch.zeros(batch, nx, dtype=f64),
                "nu": torch.zeros(batch, neq, dtype=f64),
                "lam": torch.zeros(batch, nineq, dtype=f64),
            }
            options = None if adjoint == "exact" else {"tol": 1e-12, "max_iter": 200}
            sol = implicit.solve(
                implicit.ImplicitProblem(kkt, batched=True),
                z0,
                solver="newton",
                adjoint=adjoint,
                tol=1e-12,
                max_iter=100,
                adjoint_options=options,
                on_failure="raise",
            )
            return sol.z["x"], sol.z["lam"].detach()

        return Row(f"implicit newton + {adjoint}, Fischer–Burmeister KKT", lambda: timed(solve))

    def qpth_row() -> Row:
        assert qpth is not None
        layer = qpth.qp.QPFunction(verbose=-1, eps=1e-12, maxIter=20)

        def solve(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
            return layer(Q_of(p["L"]), p["q"], p["G"], p["h"], p["A"], p["b"]), None

        return Row("qpth QPFunction (PDIPM batched, eps 1e-12)", lambda: timed(solve))

    rows = [fischer_burmeister("exact"), fischer_burmeister("gmres")]
    if qpth is not None:
        rows.append(qpth_row())
    time_rows(rows, reps)

    # The active-set reference: K [x; μ] = [−q; b; h_active] with K = [[Q, Cᵀ], [C, 0]], C = [A; G_active],
    # so d(cᵀx)/d(−q, b, h_active) = K⁻¹ [c; 0] (K symmetric).
    x_star, _, lam = rows[0].out
    ref = {k: torch.zeros_like(inputs[k]) for k in ("q", "h", "b")}
    margin = float("inf")
    for i in range(batch):
        slack = h[i] - G[i] @ x_star[i]
        margin = min(margin, float(torch.maximum(lam[i], slack).min()))
        active = lam[i] > slack
        C = torch.cat([A[i], G[i][active]])
        k = C.shape[0]
        K = torch.cat([torch.cat([Q_of(L[i]), C.T], 1), torch.cat([C, torch.zeros(k, k, dtype=f64)], 1)])
        u = torch.linalg.solve(K, torch.cat([c[i], torch.zeros(k, dtype=f64)]))
        ref["q"][i] = -u[:nx]
        ref["b"][i] = u[nx : nx + neq]
        ref["h"][i][active] = u[nx + neq :]

    def ref_err(grads: dict[str, torch.Tensor]) -> float:
        return max(rel(grads[k], ref[k]) for k in ref)

    base = rows[-1] if qpth is not None else rows[0]
    lines = [
        f"### (b) QP layer: {batch} random QPs, {nx} variables, {neq} equalities, {nineq} inequalities (float64)",
        "",
        f"Strict complementarity margin min max(λ, s) = {margin:.1e}.",
        "",
        f"| method | fwd ms [IQR] | bwd ms [IQR] | total ms | this ÷ {'qpth' if qpth else 'first row'} | "
        f"grad. rel. diff to {'qpth' if qpth else 'first row'} (max over L, q, G, h, A, b) | "
        "grad. rel. err (q, h, b) vs active-set KKT |",
        "|---|---|---|---|---|---|---|",
    ]
    targets = []
    for row in rows:
        diff = max(rel(row.out[1][k], base.out[1][k]) for k in inputs)
        lines.append(
            f"| {row.name} | {ms(row.fwd)} | {ms(row.bwd)} | {1e3 * row.total:.3g} | {row.total / base.total:.2f} | "
            f"{diff:.1e} | {ref_err(row.out[1]):.1e} |"
        )
        if row is not base and qpth is not None:
            note = f"against the active-set KKT gradient: qpth {ref_err(base.out[1]):.0e}, implicit {ref_err(row.out[1]):.0e}"
            targets.append(
                target(
                    f"QP gradients within 1e-6 relative of qpth's, float64 ({row.name})",
                    f"{diff:.1e}",
                    diff <= 1e-6,
                    note,
                )
            )
    lines.append("")
    return lines, targets


# ----------------------------------------------------------------------------- (c) batched L-BFGS


def batched_lbfgs(reps: int, batch: int = 64, tol: float = 1e-6) -> tuple[list[str], list[str]]:
    ex = example("logistic_hypergradient")
    data = ex.load()
    g = torch.Generator().manual_seed(0)
    theta = 4 * torch.rand(batch, len(ex.GROUPS), dtype=f64, generator=g) - 2  # λ from 0.14 to 7.4
    lam = theta.exp()[:, data.group]  # (B, 30): each sample's penalty per feature
    X1 = torch.cat([data.X, torch.ones(len(data.y), 1, dtype=f64)], 1)  # the bias as a last feature
    n = X1.shape[1]
    penalty = torch.cat([lam, torch.zeros(batch, 1, dtype=f64)], 1)

    def objective(z: torch.Tensor) -> torch.Tensor:  # (B, n) ↦ (B,)
        logits = z @ X1.T
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, data.y.expand(batch, -1), reduction="none")
        return bce.sum(1) + 0.5 * (penalty * z**2).sum(1)

    problem = implicit.ImplicitProblem.argmin(objective, batched=True)
    z0 = torch.zeros(batch, n, dtype=f64)
    exact = implicit.solve(problem, z0, solver="newton_cg", tol=1e-12, max_iter=200, on_failure="raise").z
    gtol = tol * torch.linalg.vector_norm(exact, dim=1).numpy() / math.sqrt(n)
    stats: dict[str, Any] = {}

    def run_implicit() -> tuple[float, float, Any]:
        t0 = time.perf_counter()
        sol = implicit.solve(problem, z0, solver="lbfgs", tol=tol, atol=ATOL, max_iter=2000, on_failure="raise")
        t1 = time.perf_counter()
        stats["implicit"] = sol.stats
        return t1 - t0, 0.0, sol.z

    Xn, yn, pn = X1.numpy(), data.y.numpy(), penalty.numpy()

    def numpy_fg(v: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
        u = Xn @ v
        prob = 0.5 * (1 + np.tanh(0.5 * u))  # the logistic function, without overflow
        return float(np.logaddexp(0, u).sum() - yn @ u + 0.5 * p @ v**2), Xn.T @ (prob - yn) + p * v

    def torch_fg(v: np.ndarray, p: torch.Tensor) -> tuple[float, np.ndarray]:
        vt = torch.from_numpy(v).requires_grad_()
        f = torch.nn.functional.binary_cross_entropy_with_logits(X1 @ vt, data.y, reduction="sum")
        f = f + 0.5 * (p * vt**2).sum()
        (grad,) = torch.autograd.grad(f, vt)
        return f.item(), grad.numpy()

    def run_scipy(fg: Callable, penalties: Any, name: str) -> Callable[[], tuple[float, float, Any]]:
        def run() -> tuple[float, float, Any]:
            t0 = time.perf_counter()
            results = [
                scipy.optimize.minimize(
                    fg,
                    np.zeros(n),
                    args=(penalties[i],),
                    jac=True,
                    method="L-BFGS-B",
                    options={"maxcor": 10, "gtol": gtol[i], "ftol": 0.0, "maxiter": 2000},
                )
                for i in range(batch)
            ]
            t1 = time.perf_counter()
            stats[name] = results
            return t1 - t0, 0.0, torch.as_tensor(np.stack([r.x for r in results]))

        return run

    rows = [
        Row("implicit lbfgs, batched", run_implicit),
        Row("scipy L-BFGS-B per sample, NumPy objective + gradient", run_scipy(numpy_fg, pn, "numpy")),
        Row("scipy L-BFGS-B per sample, torch objective + autograd", run_scipy(torch_fg, penalty, "torch")),
    ]
    time_rows(rows, reps)

    # Where implicit's time goes: one batched value-and-gradient, the solve's only use of the objective.
    evals = Series()
    for _ in range(20):
        zz = exact.clone().requires_grad_()
        t0 = time.perf_counter()
        torch.autograd.grad(objective(zz).sum(), zz)
        evals.add(time.perf_counter() - t0)
    st = stats["implicit"]
    zfin = torch.linalg.vector_norm(rows[0].out, dim=1)
    per_sample = (st.history <= tol * zfin + ATOL).to(torch.int64).argmax(0)  # first check met

    def reached(z: torch.Tensor) -> float:
        zz = z.clone().requires_grad_()
        (grad,) = torch.autograd.grad(objective(zz).sum(), zz)
        return float((torch.linalg.vector_norm(grad, dim=1) / torch.linalg.vector_norm(z, dim=1)).max())

    lines = [
        f"### (c) Inner problems in a batch: {batch} logistic regressions ({n} variables each), tol {tol:g}",
        "",
        "| method | iterations median / max | evaluations per sample | ms [IQR] | µs per sample-iteration | "
        "speed-up of implicit | max ‖∇f‖/‖z‖ reached | max rel. diff to implicit |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = rows[0]
    its = per_sample.to(f64)
    lines.append(
        f"| {base.name} | {float(its.median()):.0f} / {st.iterations} | {st.nfe} (batched) | {ms(base.fwd)} | "
        f"{1e6 * base.fwd.median / (batch * st.iterations):.0f} | 1 | {reached(base.out):.1e} | 0 |"
    )
    speed_up = {}
    for row, key in zip(rows[1:], ("numpy", "torch")):
        res = stats[key]
        nit = np.array([r.nit for r in res])
        nfev = np.mean([r.nfev for r in res])
        diff = float(((row.out - base.out).abs().max(1).values / base.out.abs().max(1).values).max())
        speed_up[key] = row.fwd.median / base.fwd.median
        lines.append(
            f"| {row.name} | {np.median(nit):.0f} / {nit.max()} | {nfev:.0f} | {ms(row.fwd)} | "
            f"{1e6 * row.fwd.median / nit.sum():.0f} | {speed_up[key]:.1f}× | {reached(row.out):.1e} | {diff:.1e} |"
        )
    floor = st.nfe * evals.median  # the solve's time if it did nothing but evaluate the objective
    lines += [
        "",
        f"implicit's iterations: per sample from its residual history (first check within tolerance), the batch's "
        f"{st.iterations} being its slowest sample's. One batched value-and-gradient of the {batch} objectives takes "
        f"{1e3 * evals.median:.2f} ms; its {st.nfe} evaluations ({1e3 * floor:.0f} ms) are {floor / base.fwd.median:.0%} "
        "of the solve's time, the rest is the L-BFGS two-loop recursion and the batched strong-Wolfe line search on "
        "(B, N) tensors.",
        "",
    ]
    scipy_ms = rows[1].fwd.median
    note = (
        f"{1e3 * base.fwd.median / st.iterations:.1f} ms per batched iteration, {floor / base.fwd.median:.0%} of it in "
        f"objective evaluations ({st.nfe / st.iterations:.2f} per iteration: a trial step is evaluated for the whole batch "
        f"while any sample needs it); the batch runs {st.iterations} iterations, its slowest sample (median "
        f"{float(its.median()):.0f}, SciPy's {float(np.median([r.nit for r in stats['numpy']])):.0f}); with no solver "
        f"overhead at all (the evaluations alone) the speed-up would be {scipy_ms / floor:.1f}×"
    )
    targets = [
        target(
            f"batched lbfgs ≥ 5× faster than per-sample SciPy L-BFGS-B at B = {batch} (NumPy objective)",
            f"{speed_up['numpy']:.1f}× (torch objective: {speed_up['torch']:.1f}×)",
            speed_up["numpy"] >= 5,
            "" if speed_up["numpy"] >= 5 else note,
        )
    ]
    return lines, targets


# ----------------------------------------------------------------------------- report


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timing rounds instead of 9")
    parser.add_argument("--reps", type=int, default=None, help="timing rounds (default 9, 3 with --quick)")
    parser.add_argument("--out", default=None, help="also write the report (markdown) to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    reps = args.reps if args.reps is not None else (3 if args.quick else 9)
    torch.set_num_threads(1)
    start, load = time.perf_counter(), load_average()
    # One thread for NumPy's and SciPy's BLAS too: OpenBLAS threads that wait spinning for a busy core
    # made SciPy's per-sample loop 40 times slower on this shared 2-core machine.
    with threadpool_limits(limits=1):
        a_lines, a = bilevel(reps)
        b_lines, b = qp(reps)
        c_lines, c = batched_lbfgs(reps)
    versions = []
    for name in ("torchopt", "qpth"):
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} not installed")
    machine = describe_machine(torch.device("cpu"), 1)
    report = [
        "## Optimisation problems",
        "",
        f"Generated by `python -m benchmarks.optimisation{' --quick' if args.quick else ''}` in "
        f"{(time.perf_counter() - start) / 60:.1f} min, {reps} round-robin rounds, float64, "
        f"torch.set_num_threads(1) and one BLAS thread; {machine['cpu']}; torch {machine['torch']}, scipy {machine.get('scipy', '?')}, "
        f"{', '.join(versions)}; load average {load} at start, {load_average()} at end.",
        "",
        "| target | measured | verdict | note |",
        "|---|---|---|---|",
        *c,
        *a,
        *b,
        "",
        *a_lines,
        *b_lines,
        *c_lines,
    ]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
