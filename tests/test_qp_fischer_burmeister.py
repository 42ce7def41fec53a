"""A batched QP layer solved through its Fischer–Burmeister KKT residual, with default settings.

``min ½ xᵀQx + qᵀx  s.t.  A x = b,  G x ≤ h`` per sample (20 variables, 5
equalities, 20 inequalities; 45 unknowns ``x, ν, λ``). Complementarity
``λ ≥ 0, s = h - G x ≥ 0, λ s = 0`` is the root of
``φ(λ, s) = λ + s - √(λ² + s²)``. Newton–Krylov with its defaults must
converge on every sample, and the implicit gradient with respect to ``q``
must match the dense active-set reference: the KKT system of the active
constraints, solved with ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch

import implicit

f64 = torch.float64
B, N, P, M = 32, 20, 5, 20


def _qp(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, N, N, dtype=f64, generator=g)
    Q = L @ L.mT / N + 0.1 * torch.eye(N, dtype=f64)
    A = torch.randn(B, P, N, dtype=f64, generator=g)
    G = torch.randn(B, M, N, dtype=f64, generator=g)
    x_feasible = torch.randn(B, N, dtype=f64, generator=g)
    b = (A @ x_feasible.unsqueeze(-1)).squeeze(-1)
    h = (G @ x_feasible.unsqueeze(-1)).squeeze(-1) + torch.rand(B, M, dtype=f64, generator=g)
    q = 2 * torch.randn(B, N, dtype=f64, generator=g)
    return {"Q": Q, "A": A, "G": G, "b": b, "h": h, "q": q}


def _residual(d: dict[str, torch.Tensor], q: torch.Tensor):  # noqa: ANN202
    Q, A, G, b, h = d["Q"], d["A"], d["G"], d["b"], d["h"]

    def F(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, nu, lam = z["x"], z["nu"], z["lam"]
        mv = lambda m, v: (m @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
        s = h - mv(G, x)
        return {
            "x": mv(Q, x) + q + mv(A.mT, nu) + mv(G.mT, lam),
            "nu": mv(A, x) - b,
            "lam": lam + s - torch.sqrt(lam**2 + s**2),
        }

    return F


def _active_set_gradient(
    d: dict[str, torch.Tensor], x: torch.Tensor, lam: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``∂(cᵀx*)/∂q`` per sample from the KKT system of the constraints active at the solution."""
    grads = []
    for i in range(B):
        slack = d["h"][i] - d["G"][i] @ x[i]
        active = lam[i] > slack  # at a solution one of the two is zero (strict complementarity)
        Ga = d["G"][i][active]
        A = torch.cat([d["A"][i], Ga])
        k = A.shape[0]
        K = torch.cat(
            [torch.cat([d["Q"][i], A.T], 1), torch.cat([A, torch.zeros(k, k, dtype=f64)], 1)],
        )
        rhs = torch.cat([c[i], torch.zeros(k, dtype=f64)])
        # dx/dq = -[K⁻¹]_xx, symmetric: the gradient is -[K⁻¹ (c, 0)]_x
        grads.append(-torch.linalg.solve(K, rhs)[:N])
    return torch.stack(grads)


@pytest.mark.parametrize("solver", ["newton_krylov", "newton"])
def test_qp_layer_with_default_settings(solver: str) -> None:
    d = _qp()
    q = d["q"].clone().requires_grad_()
    z0 = {"x": torch.zeros(B, N, dtype=f64), "nu": torch.zeros(B, P, dtype=f64), "lam": torch.zeros(B, M, dtype=f64)}
    sol = implicit.solve(implicit.ImplicitProblem(_residual(d, q), batched=True), z0, solver=solver)
    assert bool(sol.stats.converged.all()), sol.stats.message
    x, lam = sol.z["x"], sol.z["lam"]
    # A QP solution to the tolerance: |min(λ, s)| ≤ |φ(λ, s)| / (2 - √2) < 2 ‖F‖ bounds the
    # infeasibility of each sample.
    slack = d["h"] - (d["G"] @ x.detach().unsqueeze(-1)).squeeze(-1)
    bound = -2 * sol.stats.residual[:, None]
    assert bool((slack > bound).all()) and bool((lam.detach() > bound).all())
    c = torch.randn(B, N, dtype=f64, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((c * x).sum(), q)
    assert sol.adjoint_stats is not None and bool(sol.adjoint_stats.converged.all())
    want = _active_set_gradient(d, x.detach(), lam.detach(), c)
    error = torch.linalg.vector_norm(grad - want, dim=1) / torch.linalg.vector_norm(want, dim=1)
    assert float(error.max()) < 1e-6, f"relative gradient error per sample: {error}"
