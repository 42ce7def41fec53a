"""A batched constrained least-squares layer, trained end to end through its solution.

The layer maps ``b`` (one row per sample) to

    z*(b) = argmin_{z ∈ C} ½ ‖A z − b‖²,        C = the simplex {z ≥ 0, Σz = 1}   (or a box)

and is solved as the fixed point of projected gradient,

    z = P_C(z − η Aᵀ(A z − b)),        η = 1 / ‖A‖²,

with ``implicit.projections`` for ``P_C``. The backward pass solves one
adjoint system of that fixed point (the implicit function theorem); the
projection's derivative is the one of the active set, so the gradient is that
of the QP restricted to its active constraints. The script checks it against
that reference, by a dense solve of the differentiated KKT system of the
active set, in float64.

The model: a linear map ``x ↦ b = W x`` in front of the layer (``A`` is
learned too), trained with Adam so that ``z*(W x)`` matches the layer's output
under a hidden teacher ``(W_true, A_true)``. Its loss falls by orders of
magnitude in a few hundred steps.

Run: ``python examples/qp_layer.py [--constraint simplex|box] [--steps N] [--quick]``.
"""

from __future__ import annotations

import argparse

import torch

import implicit
from implicit import projections

f64 = torch.float64


def project(z: torch.Tensor, constraint: str) -> torch.Tensor:
    if constraint == "simplex":
        return projections.simplex(z)
    return projections.box(z, 0.0, 0.4)


def qp_layer(A: torch.Tensor, b: torch.Tensor, constraint: str, tol: float = 1e-12) -> tuple[torch.Tensor, implicit.Solution]:
    """``z*(A, b)`` for every row of ``b``, differentiable in ``A`` and ``b``."""
    eta = 1.0 / float(torch.linalg.matrix_norm(A.detach(), ord=2) ** 2)

    def step(z: torch.Tensor) -> torch.Tensor:
        return project(z - eta * (z @ A.T - b) @ A, constraint)

    n = A.shape[1]
    z0 = torch.full((b.shape[0], n), 1.0 / n, dtype=b.dtype)
    problem = implicit.ImplicitProblem.fixed_point(step, batched=True)
    sol = implicit.solve(
        problem, z0, solver="anderson", adjoint="gmres", tol=tol, max_iter=2000,
        adjoint_options={"tol": tol, "max_iter": 500}, on_failure="raise",
    )
    return sol.z, sol


def active_set_jacobian(A: torch.Tensor, b: torch.Tensor, z: torch.Tensor, constraint: str) -> torch.Tensor:
    """``dz*/db`` of one sample from the differentiated KKT conditions of its active set, ``(n, m)``.

    Simplex: on the support ``S``, ``[[A_SᵀA_S, 1], [1ᵀ, 0]] [dz_S; dν] = [A_Sᵀ db; 0]``.
    Box: on the free set ``F``, ``A_FᵀA_F dz_F = A_Fᵀ db``. Every other ``dz_i`` is zero.
    """
    n, m = A.shape[1], A.shape[0]
    if constraint == "simplex":
        free = z > 1e-9
    else:
        free = (z > 1e-9) & (z < 0.4 - 1e-9)
    idx = torch.nonzero(free).flatten()
    As = A[:, idx]
    k = len(idx)
    jac = torch.zeros(n, m, dtype=A.dtype)
    if constraint == "simplex":
        kkt = torch.zeros(k + 1, k + 1, dtype=A.dtype)
        kkt[:k, :k] = As.T @ As
        kkt[:k, k] = 1
        kkt[k, :k] = 1
        rhs = torch.cat([As.T, torch.zeros(1, m, dtype=A.dtype)])
        jac[idx] = torch.linalg.solve(kkt, rhs)[:k]
    elif k:
        jac[idx] = torch.linalg.solve(As.T @ As, As.T)
    return jac


def gradient_check(constraint: str, batch: int = 6, n: int = 5, m: int = 8, seed: int = 0) -> float:
    """Largest error of ``dL/db`` through the layer against the active-set reference, relative to its size."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, dtype=f64, generator=g)
    b = torch.randn(batch, m, dtype=f64, generator=g).requires_grad_()
    w = torch.randn(batch, n, dtype=f64, generator=g)  # the loss L = Σ w ⊙ z*
    z, _ = qp_layer(A, b, constraint)
    (grad,) = torch.autograd.grad((w * z).sum(), b)
    ref = torch.stack([w[i] @ active_set_jacobian(A, b[i].detach(), z[i].detach(), constraint) for i in range(batch)])
    return float((grad - ref).abs().max() / ref.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description="A constrained least-squares layer trained end to end.")
    parser.add_argument("--constraint", choices=["simplex", "box"], default="simplex")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--quick", action="store_true", help="200 steps")
    args = parser.parse_args()
    steps = min(args.steps, 200) if args.quick else args.steps
    torch.set_num_threads(1)
    torch.manual_seed(0)

    err = gradient_check(args.constraint)
    print(f"constraint: {args.constraint}")
    print(f"gradient vs active-set KKT reference, relative error: {err:.2e}")

    d, m, n, batch = 4, 8, 5, 64
    g = torch.Generator().manual_seed(1)
    A_true = torch.randn(m, n, dtype=f64, generator=g)
    W_true = 2 * torch.randn(m, d, dtype=f64, generator=g)
    x_train = torch.randn(batch, d, dtype=f64, generator=g)
    with torch.no_grad():
        target, _ = qp_layer(A_true, x_train @ W_true.T, args.constraint, tol=1e-10)

    W = torch.nn.Parameter(torch.randn(m, d, dtype=f64, generator=g))
    A = torch.nn.Parameter(A_true + 0.3 * torch.randn(m, n, dtype=f64, generator=g))
    opt = torch.optim.Adam([W, A], lr=0.05)
    first = last = None
    for step in range(steps):
        z, sol = qp_layer(A, x_train @ W.T, args.constraint, tol=1e-8)
        loss = ((z - target) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3e}  forward iterations {sol.stats.iterations}")
    assert first is not None and last is not None
    print(f"training loss: first {first:.3e}  last {last:.3e}  ratio {last / first:.2e}")


if __name__ == "__main__":
    main()
