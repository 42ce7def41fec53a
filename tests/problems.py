"""Test problems with their parameters as explicit arguments, for the dense references."""

from __future__ import annotations

from collections.abc import Sequence

import torch

State = dict[str, torch.Tensor]
f64 = torch.float64


def contraction(n: int, m: int, scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random ``n x m`` matrix with spectral norm ``scale``."""
    w = torch.randn(n, m, dtype=f64, generator=generator)
    return w * (scale / torch.linalg.matrix_norm(w, ord=2))


def two_variable_params(batch: int = 4, nx: int = 3, ny: int = 5, scale: float = 0.3) -> list[torch.Tensor]:
    """``A, Bm, C, D, bx, by, u``: the couplings of x (size 3) and y (size 5), and an input ``u``."""
    g = torch.Generator().manual_seed(1)
    return [
        contraction(nx, nx, scale, g),
        contraction(nx, ny, scale, g),
        contraction(ny, nx, scale, g),
        contraction(ny, ny, scale, g),
        torch.randn(nx, dtype=f64, generator=g),
        torch.randn(ny, dtype=f64, generator=g),
        torch.randn(batch, nx, dtype=f64, generator=g),
    ]


def two_variable_map(z: State, p: Sequence[torch.Tensor]) -> State:
    """``(x, y) = f(x, y)``: x and y of different sizes, coupled both ways."""
    A, Bm, C, D, bx, by, u = p
    x, y = z["x"], z["y"]
    return {
        "x": torch.tanh(x @ A.T + y @ Bm.T + bx + u),
        "y": torch.tanh(x @ C.T + y @ D.T + by),
    }


def two_variable_z0(batch: int = 4, nx: int = 3, ny: int = 5) -> State:
    return {"x": torch.zeros(batch, nx, dtype=f64), "y": torch.zeros(batch, ny, dtype=f64)}
