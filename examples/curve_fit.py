"""Fitting a damped pendulum to noisy recordings by batched nonlinear least squares.

Each data set is a recording of the angle of a pendulum,

    θ'' = −ω² sin θ − c θ',    θ(0) = θ₀,  θ'(0) = 0,

every 0.2 s up to 8 s (40 times), with Gaussian noise. The model is the ODE
solved by a fixed-step fourth-order Runge–Kutta scheme in torch, and its
parameters ``z = (ω, c, θ₀)`` are fitted to every data set at once:

    z*_b = argmin_z ½ ‖model(z) − data_b‖²      (one problem per data set, solved as a batch)

with ``implicit.least_squares(..., batched=True)`` (Levenberg–Marquardt by
default, Gauss–Newton with ``--solver gauss_newton``). The fitted parameters
are differentiable with respect to the data by the implicit function theorem
(one conjugate-gradient solve with the Hessian of ``½‖r‖²`` per backward
pass), never by differentiating the iterations. Two uses of that derivative:

* a check: the directional derivative ``cᵀ (dz*/d data) v`` for random ``c``
  and ``v`` against central finite differences in float64 (both sides re-fitted
  to a tight tolerance);
* error propagation: the standard errors of the fitted parameters,
  ``σ · ‖∂z*_k/∂data‖``, from three backward passes (one per parameter, every
  data set at once).

The fit itself is compared with ``scipy.optimize.least_squares``
(``method="lm"``, MINPACK) run on each data set alone, on the same model with
the Jacobian by central differences: no derivative from torch goes into it.

Run: ``python examples/curve_fit.py [--solver levenberg_marquardt|gauss_newton] [--datasets B] [--quick]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.optimize
import torch

import implicit

PARAMS = ("omega", "c", "theta0")
DT, STEPS = 0.2, 40  # RK4 steps on [0, 8]; the angle is observed after every step
NOISE = 0.02
f64 = torch.float64


def model(z: torch.Tensor) -> torch.Tensor:
    """The angle at the observation times, ``(B, STEPS)``, for parameters ``z`` of shape ``(B, 3)``."""
    omega, c, theta = z.unbind(-1)
    velocity = torch.zeros_like(theta)
    w2 = omega**2
    acceleration = lambda th, v: -w2 * torch.sin(th) - c * v  # noqa: E731
    observed = []
    for _ in range(STEPS):
        a1 = acceleration(theta, velocity)
        v2 = velocity + 0.5 * DT * a1
        a2 = acceleration(theta + 0.5 * DT * velocity, v2)
        v3 = velocity + 0.5 * DT * a2
        a3 = acceleration(theta + 0.5 * DT * v2, v3)
        v4 = velocity + DT * a3
        a4 = acceleration(theta + DT * v3, v4)
        theta = theta + DT / 6 * (velocity + 2 * v2 + 2 * v3 + v4)
        velocity = velocity + DT / 6 * (a1 + 2 * a2 + 2 * a3 + a4)
        observed.append(theta)
    return torch.stack(observed, -1)


def make_data(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True parameters, noisy recordings and the initial guess (the truth off by up to 15 %)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(batch, dtype=f64, generator=g)  # noqa: E731
    truth = torch.stack([u(1.5, 3.0), u(0.1, 0.5), u(0.5, 2.0)], -1)
    data = model(truth) + NOISE * torch.randn(batch, STEPS, dtype=f64, generator=g)
    guess = truth * (1 + 0.15 * (2 * torch.rand(truth.shape, dtype=f64, generator=g) - 1))
    return truth, data, guess


def fit(data: torch.Tensor, guess: torch.Tensor, solver: str, tol: float = 1e-12) -> implicit.Solution:
    """``z*_b`` for every data set, differentiable in ``data``."""
    problem = implicit.ImplicitProblem.least_squares(lambda z: model(z) - data, batched=True)
    return implicit.solve(
        problem, guess, solver=solver, adjoint="cg", tol=tol, max_iter=500,
        adjoint_options={"tol": tol, "max_iter": 200}, on_failure="raise",
    )  # fmt: skip


def scipy_fit(data: torch.Tensor, guess: torch.Tensor) -> np.ndarray:
    """The same fits by ``scipy.optimize.least_squares``, one data set at a time."""
    fitted = []
    for d, z0 in zip(data, guess):  # the residual at a numpy vector, the Jacobian by central differences
        residual = lambda x, d=d: (model(torch.as_tensor(x)[None]) - d)[0].numpy()  # noqa: E731
        res = scipy.optimize.least_squares(
            residual, z0.numpy(), jac="3-point", method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15
        )
        fitted.append(res.x)
    return np.stack(fitted)


def derivative_check(z: torch.Tensor, data: torch.Tensor, solver: str, h: float = 1e-5, seed: int = 1) -> float:
    """Largest relative error over data sets of ``cᵀ (dz*/d data) v`` against central differences.

    ``z`` is the fit of ``data`` (which requires grad), with its graph.
    """
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(z.shape, dtype=f64, generator=g)
    v = torch.randn(data.shape, dtype=f64, generator=g)
    (grad,) = torch.autograd.grad((c * z).sum(), data, retain_graph=True)
    implicit_dir = (grad * v).sum(-1)
    with torch.no_grad():  # data sets are independent: one pair of batched re-fits gives every difference
        up = (c * fit(data + h * v, z, solver, tol=1e-14).z).sum(-1)
        down = (c * fit(data - h * v, z, solver, tol=1e-14).z).sum(-1)
    fd_dir = (up - down) / (2 * h)
    return float(((implicit_dir - fd_dir).abs() / fd_dir.abs()).max())


def standard_errors(z: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``σ ‖∂z*_bk/∂data_b‖`` for every data set ``b`` and parameter ``k``, ``(B, 3)``, for ``z`` the fit of ``data``."""
    rows = [torch.autograd.grad(z[:, k].sum(), data, retain_graph=True)[0] for k in range(z.shape[1])]
    return NOISE * torch.stack([torch.linalg.vector_norm(r, dim=-1) for r in rows], -1)


def main() -> None:
    parser = argparse.ArgumentParser(description="Batched least-squares fits of a damped pendulum (RK4 in torch).")
    parser.add_argument("--solver", choices=["levenberg_marquardt", "gauss_newton"], default="levenberg_marquardt")
    parser.add_argument("--datasets", type=int, default=8, help="data sets fitted as one batch")
    parser.add_argument("--quick", action="store_true", help="3 data sets")
    args = parser.parse_args()
    batch = min(args.datasets, 3) if args.quick else args.datasets
    torch.set_num_threads(1)

    truth, data, guess = make_data(batch)
    data.requires_grad_()
    print(f"{batch} data sets of {data.shape[1]} observations, noise {NOISE}; solver: {args.solver}")
    sol = fit(data, guess, args.solver)
    z, fitted = sol.z, sol.z.detach()
    print(f"fit: {sol.stats.iterations} iterations, largest gradient norm {float(sol.stats.residual.max()):.1e}")

    errors = standard_errors(z, data)
    for b in range(batch):
        line = "  ".join(
            f"{n} {float(fitted[b, k]):.5f} ± {float(errors[b, k]):.5f} (true {float(truth[b, k]):.3f})"
            for k, n in enumerate(PARAMS)
        )
        print(f"data set {b}: {line}")
    within = float(((fitted - truth).abs() <= 3 * errors).to(f64).mean())
    print(f"fitted parameters within 3 standard errors of the truth: {within:.0%}")

    reference = torch.as_tensor(scipy_fit(data.detach(), guess))
    difference = float(((fitted - reference).abs() / reference.abs()).max())
    print(f"parameters vs scipy.optimize.least_squares, largest relative difference: {difference:.2e}")
    print(
        f"d(fit)/d(data) vs central differences, largest relative error: {derivative_check(z, data, args.solver):.2e}"
    )


if __name__ == "__main__":
    main()
