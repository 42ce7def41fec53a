"""Jacobian stabilisers of equilibrium maps against dense float64 references and closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import implicit
from implicit.nn import jacobian_regularization, spectral_radius

f64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=f64, generator=_gen(seed)))
    return q


def _split(v: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"u": v[:, :2], "w": v[:, 2:].reshape(-1, 1, 3)}


def _join(z: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([z["u"], z["w"].reshape(len(z["u"]), 3)], dim=1)


def _dense_blocks(f, z: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Per-sample Jacobians ``(B, N, N)`` of a batched map on ``(B, N)``, from the full dense Jacobian."""
    full = torch.autograd.functional.jacobian(f, z.detach())  # (B, N, B, N)
    idx = torch.arange(len(z))
    return full[idx, :, idx, :]


# --------------------------------------------------------------------------- Jacobian regularisation


def test_rademacher_estimate_is_exact_when_jjt_is_diagonal() -> None:
    # J = diag(s ⊙ sech²(Qz + b)) Q has J Jᵀ diagonal, so every Rademacher
    # probe gives ‖Jᵀv‖² = tr(J Jᵀ) exactly: a closed form with no sampling error.
    batch, n = 3, 5
    Q = _orthogonal(n, 0)
    s = torch.tensor([0.9, -0.5, 0.3, 1.2, 0.7], dtype=f64, requires_grad=True)
    b = (0.3 * torch.randn(batch, n, dtype=f64, generator=_gen(1))).requires_grad_()
    z = {k: v.clone() for k, v in _split(torch.randn(batch, n, dtype=f64, generator=_gen(2))).items()}
    calls = []

    def f(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        calls.append(1)
        return _split(s * torch.tanh(_join(state) @ Q.T + b))

    est = jacobian_regularization(f, z, num_samples=3, generator=_gen(3))
    assert len(calls) == 1  # one evaluation of f, then one vector-Jacobian product per probe
    a = _join(z) @ Q.T + b
    closed = (s**2 * torch.cosh(a) ** -4).sum(dim=1)
    dense = _dense_blocks(lambda v: s * torch.tanh(v @ Q.T + b), _join(z)).pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(closed, dense, rtol=1e-12, atol=0)
    assert est.shape == (batch,)
    torch.testing.assert_close(est, closed, rtol=1e-12, atol=0)
    # Differentiable with respect to what f reads, as the closed form is.
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=f64)
    got = torch.autograd.grad((est * weights).sum(), [s, b])
    want = torch.autograd.grad((closed * weights).sum(), [s, b])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_unbatched_estimate_covers_the_whole_state() -> None:
    n = 6
    Q = _orthogonal(n, 4)
    s = torch.linspace(0.2, 1.0, n, dtype=f64)
    z = (torch.randn(n, dtype=f64, generator=_gen(5)),)

    def f(state: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        return (s * torch.sin(Q @ state[0]),)

    est = jacobian_regularization(f, z, batched=False, generator=_gen(6))
    assert est.shape == ()
    dense = torch.autograd.functional.jacobian(lambda v: s * torch.sin(Q @ v), z[0])
    torch.testing.assert_close(est, dense.pow(2).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_estimate_is_unbiased_for_a_general_jacobian(probe: str) -> None:
    # A general J: the mean over K probes lies within 5 standard errors of
    # ‖J‖_F², the variance being 2(‖A‖_F² - Σ Aᵢᵢ²) (Rademacher) or
    # 2‖A‖_F² (Gaussian) with A = J Jᵀ.
    batch, n, K = 3, 4, 4000
    W = 0.6 * torch.randn(n, n, dtype=f64, generator=_gen(7))
    b = torch.randn(batch, n, dtype=f64, generator=_gen(8))
    z = torch.randn(batch, n, dtype=f64, generator=_gen(9))

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(v @ W.T + b)

    est = jacobian_regularization(f, z, num_samples=K, probe=probe, create_graph=False, generator=_gen(10))
    assert not est.requires_grad
    J = _dense_blocks(f, z)
    A = J @ J.mT
    exact = A.diagonal(dim1=1, dim2=2).sum(dim=1)
    var = 2 * A.pow(2).sum(dim=(1, 2))
    if probe == "rademacher":
        var = var - 2 * A.diagonal(dim1=1, dim2=2).pow(2).sum(dim=1)
    assert bool(((est - exact).abs() <= 5 * (var / K).sqrt()).all())
    # The sampling error is not zero: this is an estimate, not the dense value.
    assert bool(((est - exact).abs() > 0).all())


def test_state_is_a_constant_of_the_penalty() -> None:
    w = torch.tensor(0.7, dtype=f64, requires_grad=True)
    theta = torch.tensor(0.4, dtype=f64, requires_grad=True)
    z = w * torch.ones(2, 3, dtype=f64)
    est = jacobian_regularization(lambda v: theta * torch.sin(v), z, generator=_gen(11))
    gw, gt = torch.autograd.grad(est.sum(), [w, theta], allow_unused=True)
    assert gw is None
    # ‖J‖_F² = θ² Σ cos²(z) per sample, exact for Rademacher probes since J is diagonal.
    torch.testing.assert_close(gt, (2 * theta * torch.cos(z.detach()) ** 2).sum().detach(), rtol=1e-12, atol=0)


def test_map_that_ignores_the_state_has_zero_jacobian() -> None:
    theta = torch.ones(2, 3, dtype=f64, requires_grad=True)
    est = jacobian_regularization(lambda v: theta * 2.0, torch.zeros(2, 3, dtype=f64), generator=_gen(12))
    torch.testing.assert_close(est, torch.zeros(2, dtype=f64), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_samples": 0}, "num_samples"), ({"num_samples": 1.5}, "num_samples"), ({"probe": "normal"}, "probe")],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        jacobian_regularization(torch.sin, torch.zeros(2, 3), **kwargs)


def test_map_returning_another_structure_is_named() -> None:
    with pytest.raises(ValueError, match=r"z\['a'\] with shape \(2, 2\); expected \(2, 3\)"):
        jacobian_regularization(lambda z: {"a": z["a"][:, :2]}, {"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"z\['a'\] with shape \(2, 2\); expected \(2, 3\)"):
        spectral_radius(lambda z: {"a": z["a"][:, :2]}, {"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="max_iter"):
        spectral_radius(torch.sin, torch.zeros(2, 3), max_iter=0)


# --------------------------------------------------------------------------- spectral radius


def test_spectral_radius_of_a_linear_map_per_sample() -> None:
    # M_b = P_b diag(λ_b) P_b⁻¹: known eigenvalues, non-normal (P_b not orthogonal),
    # dominant eigenvalue positive in one sample and negative in another.
    eig = torch.tensor([[0.9, 0.5, -0.3, 0.1], [-0.7, 0.3, 0.2, 0.05], [1.3, -0.4, 0.2, 0.0]], dtype=f64)
    P = torch.eye(4, dtype=f64) + 0.3 * torch.randn(3, 4, 4, dtype=f64, generator=_gen(13))
    M = P @ torch.diag_embed(eig) @ torch.linalg.inv(P)
    rho_ref = torch.linalg.eigvals(M).abs().max(dim=1).values
    torch.testing.assert_close(rho_ref, eig.abs().max(dim=1).values, rtol=1e-12, atol=0)
    c = torch.randn(3, 4, dtype=f64, generator=_gen(14))

    def f(z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bij,bj->bi", M, z) + c

    rho = spectral_radius(f, torch.zeros(3, 4, dtype=f64), max_iter=500, tol=1e-15, generator=_gen(15))
    assert rho.shape == (3,) and not rho.requires_grad
    torch.testing.assert_close(rho, rho_ref, rtol=1e-10, atol=0)


def test_spectral_radius_of_a_nonlinear_dict_map() -> None:
    # J = diag(θ sech²(Wz + b)) W with W symmetric: real eigenvalues.
    n = 5
    R = torch.randn(n, n, dtype=f64, generator=_gen(16))
    W = 0.5 * (R + R.T)
    b = torch.randn(2, n, dtype=f64, generator=_gen(17))
    theta = torch.tensor(0.8, dtype=f64, requires_grad=True)
    z = _split(torch.randn(2, n, dtype=f64, generator=_gen(18)))

    def g(v: torch.Tensor) -> torch.Tensor:
        return theta * torch.tanh(v @ W.T + b)

    J = _dense_blocks(g, _join(z)).detach()
    mods = torch.linalg.eigvals(J).abs().sort(dim=1, descending=True).values
    assert bool((mods[:, 1] < 0.9 * mods[:, 0]).all())  # a gap, so that power iteration converges
    rho = spectral_radius(lambda s: _split(g(_join(s))), z, max_iter=2000, tol=1e-15, generator=_gen(19))
    torch.testing.assert_close(rho, mods[:, 0], rtol=1e-9, atol=0)
    unbatched = spectral_radius(
        lambda s: _split(g(_join(s))), z, batched=False, max_iter=2000, tol=1e-15, generator=_gen(19)
    )
    assert unbatched.shape == ()
    torch.testing.assert_close(unbatched, mods[:, 0].max(), rtol=1e-9, atol=0)


# --------------------------------------------------------------------------- on a layer


class _Cell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        R = torch.randn(4, 4, dtype=f64, generator=_gen(25))
        # Symmetric, so that ∂cell/∂z = diag(sech²) W has real eigenvalues.
        self.W = nn.Parameter(0.2 * (R + R.T))  # ‖W‖₂ = 0.85: a contraction

    def forward(self, z: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": torch.tanh(z["h"] @ self.W.T + x)}

    def init_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": torch.zeros_like(x)}


def test_layer_methods_bind_the_input() -> None:
    cell = _Cell()
    layer = implicit.nn.DEQ(cell, solver="fixed_point", adjoint="exact", tol=1e-12, max_iter=500)
    x = torch.randn(3, 4, dtype=f64, generator=_gen(21))
    z = layer(x)
    J = _dense_blocks(lambda v: torch.tanh(v @ cell.W.detach().T + x), z["h"].detach())
    # Differentiable in the cell's parameters; matches the functional form with the same probes.
    est = layer.jacobian_regularization(x, z, num_samples=2, generator=_gen(22))
    same = jacobian_regularization(lambda s: cell(s, x), z, num_samples=2, generator=_gen(22))
    torch.testing.assert_close(est, same, rtol=0, atol=0)
    (gw,) = torch.autograd.grad(est.sum(), [cell.W])
    assert gw.shape == cell.W.shape and bool(gw.abs().sum() > 0)
    mods = torch.linalg.eigvals(J).abs().sort(dim=1, descending=True).values
    assert bool((mods[:, 1] < 0.9 * mods[:, 0]).all())
    rho = layer.spectral_radius(x, z, max_iter=2000, tol=1e-15, generator=_gen(23))
    torch.testing.assert_close(rho, mods[:, 0], rtol=1e-9, atol=0)
