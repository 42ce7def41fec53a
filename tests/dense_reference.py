"""Dense float64 references for derivatives of order one and two, independent of the library.

A problem is given as an explicit function of the state and a list of
parameters. The solution comes from Newton's method with a Jacobian
materialised by ``torch.autograd.functional.jacobian``; the implicit function
theorem is written out with dense matrices and ``torch.linalg.solve``; second
derivatives are central differences (fourth order) of the reference gradient.
Nothing here calls ``implicit``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from reference import flat, unflat

State = dict[str, torch.Tensor]
Map = Callable[[State, Sequence[torch.Tensor]], State]


def newton(G: Map, params: Sequence[torch.Tensor], z0: State, iters: int = 60) -> State:
    """The fixed point ``z = G(z, θ)`` by dense Newton steps on ``z - G(z, θ)``, to rounding."""
    keys = list(z0)
    params = [p.detach() for p in params]
    z = flat(z0, keys).detach().clone()

    def residual(v: torch.Tensor) -> torch.Tensor:
        return v - flat(G(unflat(v, z0, keys), params), keys)

    for _ in range(iters):
        r = residual(z)
        if float(r.abs().max()) < 1e-15 * max(1.0, float(z.abs().max())):
            break
        jac = torch.autograd.functional.jacobian(residual, z)
        z = z - torch.linalg.solve(jac, r)
    return unflat(z, z0, keys)


def solution_jacobian(G: Map, params: Sequence[torch.Tensor], z_star: State) -> torch.Tensor:
    """``dz*/dθ`` as one dense ``(N, P)`` matrix, ``P`` all parameter entries in order."""
    keys = list(z_star)
    zf = flat(z_star, keys).detach()
    params = [p.detach() for p in params]
    n = zf.numel()

    def g_of_z(v: torch.Tensor) -> torch.Tensor:
        return flat(G(unflat(v, z_star, keys), params), keys)

    def g_of_theta(theta: torch.Tensor) -> torch.Tensor:
        ps, i = [], 0
        for p in params:
            ps.append(theta[i : i + p.numel()].reshape(p.shape))
            i += p.numel()
        return flat(G(unflat(zf, z_star, keys), ps), keys)

    theta = torch.cat([p.reshape(-1) for p in params])
    j_z = torch.autograd.functional.jacobian(g_of_z, zf)
    j_theta = torch.autograd.functional.jacobian(g_of_theta, theta)
    return torch.linalg.solve(torch.eye(n, dtype=zf.dtype) - j_z, j_theta)


def loss_gradient(
    G: Map, loss: Callable[[State], torch.Tensor], params: Sequence[torch.Tensor], z0: State
) -> torch.Tensor:
    """``d loss(z*(θ)) / dθ`` flattened over all parameters, by the dense IFT."""
    z_star = newton(G, params, z0)
    zs = {k: v.clone().requires_grad_() for k, v in z_star.items()}
    dz = torch.autograd.grad(loss(zs), list(zs.values()))
    dzf = torch.cat([d.reshape(-1) for d in dz])
    return dzf @ solution_jacobian(G, params, z_star)


def hessian_vector(
    G: Map,
    loss: Callable[[State], torch.Tensor],
    params: Sequence[torch.Tensor],
    z0: State,
    v: torch.Tensor,
    h: float = 1e-3,
) -> torch.Tensor:
    """``∇²_θ loss(z*(θ)) v`` by the fourth-order central difference of :func:`loss_gradient`.

    Truncation is ``O(h⁴)`` and rounding ``O(ε/h)``: about ``1e-12`` relative at
    the default step in float64.
    """
    params = [p.detach() for p in params]

    def shifted(t: float) -> list[torch.Tensor]:
        out, i = [], 0
        for p in params:
            out.append(p + t * v[i : i + p.numel()].reshape(p.shape))
            i += p.numel()
        return out

    def grad_at(t: float) -> torch.Tensor:
        return loss_gradient(G, loss, shifted(t), z0)

    return (-grad_at(2 * h) + 8 * grad_at(h) - 8 * grad_at(-h) + grad_at(-2 * h)) / (12 * h)


def relerr(got: torch.Tensor, want: torch.Tensor) -> float:
    """``‖got - want‖ / ‖want‖``."""
    return float((got - want).norm() / want.norm())
