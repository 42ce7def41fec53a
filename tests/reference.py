"""Dense float64 references for implicit derivatives, independent of the library.

Everything here materialises Jacobians with ``torch.autograd.functional`` and
solves with ``torch.linalg.solve``: the implicit function theorem written out
by hand, so the library is checked against it rather than against itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

State = dict[str, torch.Tensor]


def flat(state: State, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1) for k in keys])


def unflat(vec: torch.Tensor, like: State, keys: Sequence[str]) -> State:
    out, i = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vec[i : i + n].reshape(like[k].shape)
        i += n
    return out


def picard(f: Callable[[State], State], z0: State, iters: int = 5000, tol: float = 1e-15) -> State:
    """A fixed point by plain iteration in float64 (for contractions)."""
    z = {k: v.detach().clone() for k, v in z0.items()}
    with torch.no_grad():
        for _ in range(iters):
            new = f(z)
            step = max(float((new[k] - z[k]).abs().max()) for k in z)
            z = {k: new[k].detach() for k in z}
            if step < tol:
                break
    return z


def ift_grads(
    G: Callable[[State, Sequence[torch.Tensor]], State],
    z_star: State,
    params: Sequence[torch.Tensor],
    dloss_dz: State,
) -> list[torch.Tensor]:
    """``dL/dθ = uᵀ ∂G/∂θ`` with ``(I - ∂G/∂z)ᵀ u = dL/dz``, all dense.

    Args:
        G: The fixed-point map as an explicit function of the state and the parameters.
        z_star: The fixed point.
        params: The parameters ``θ`` (tensors, any shape).
        dloss_dz: The loss gradient at ``z_star``.
    """
    keys = list(z_star)
    zf = flat(z_star, keys).detach()
    params = [p.detach() for p in params]

    def g_of_z(v: torch.Tensor) -> torch.Tensor:
        return flat(G(unflat(v, z_star, keys), params), keys)

    J = torch.autograd.functional.jacobian(g_of_z, zf)
    n = zf.numel()
    u = torch.linalg.solve((torch.eye(n, dtype=zf.dtype) - J).T, flat(dloss_dz, keys))
    grads = []
    for i, p in enumerate(params):

        def g_of_p(q: torch.Tensor, i: int = i) -> torch.Tensor:
            ps = list(params)
            ps[i] = q
            return flat(G(unflat(zf, z_star, keys), ps), keys)

        Jp = torch.autograd.functional.jacobian(g_of_p, p).reshape(n, -1)
        grads.append((u @ Jp).reshape(p.shape))
    return grads


def saved_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """The bytes autograd saves for backward while ``fn`` runs (each packed tensor counted), and what it returns."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out
