"""The two-variable problems of the higher-order and forward-mode tests, in root and fixed-point form.

``x`` (size 3) and ``y`` (size 5) are coupled both ways through the
parameters ``A, Bm, C, D, bx, by`` and an input ``u`` that the map closes
over. Each form pairs an explicit map ``G(z, θ)`` for the dense references
with the ``implicit`` problem built from a closure over ``θ``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from problems import f64, two_variable_map, two_variable_params

import implicit

State = dict[str, torch.Tensor]


def root_residual(z: State, p: Sequence[torch.Tensor]) -> State:
    """``F(x, y) = 0``, not in fixed-point form."""
    A, Bm, C, D, bx, by, u = p
    x, y = z["x"], z["y"]
    return {
        "x": x + 0.1 * x**3 - torch.tanh(x @ A.T + y @ Bm.T + bx + u),
        "y": y + 0.1 * torch.sin(y) - torch.tanh(x @ C.T + y @ D.T + by),
    }


def root_as_map(z: State, p: Sequence[torch.Tensor]) -> State:
    """The reference's view of the root problem: ``z = z - F(z)``."""
    r = root_residual(z, p)
    return {k: z[k] - r[k] for k in z}


FORMS = {
    # name: (reference map G(z, θ), problem built from the closure over θ)
    "fixed_point": (
        two_variable_map,
        lambda p, batched: implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, p), batched=batched),
    ),
    "root": (
        root_as_map,
        lambda p, batched: implicit.ImplicitProblem(lambda z: root_residual(z, p), batched=batched),
    ),
}


def loss(z: State) -> torch.Tensor:
    """A loss with curvature in both variables and a cross term between them."""
    w = torch.arange(1.0, 6.0, dtype=f64)
    return (z["x"] ** 2).sum() + (torch.sin(z["y"]) * w).sum() + z["x"].sum() * z["y"].sum()


def setup(batched: bool) -> tuple[list[torch.Tensor], State]:
    """The parameters ``A, Bm, C, D, bx, by`` and the input ``u``, and ``z0`` (4 samples when batched)."""
    params = two_variable_params(batch=4)
    if not batched:
        params[-1] = params[-1][0]  # one sample: u of shape (3,)
        return params, {"x": torch.zeros(3, dtype=f64), "y": torch.zeros(5, dtype=f64)}
    return params, {"x": torch.zeros(4, 3, dtype=f64), "y": torch.zeros(4, 5, dtype=f64)}


def split(theta: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``theta`` cut into tensors shaped like ``like`` (the inverse of concatenating them flat)."""
    out, i = [], 0
    for p in like:
        out.append(theta[i : i + p.numel()].reshape(p.shape))
        i += p.numel()
    return out
