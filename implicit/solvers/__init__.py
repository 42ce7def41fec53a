"""Built-in forward solvers; importing this package registers them."""

from . import (
    anderson,
    broyden,
    gauss_newton,
    lbfgs,
    levenberg_marquardt,
    newton,
    newton_cg,
    newton_krylov,
    picard,
    scipy_root,
)

__all__ = [
    "anderson",
    "broyden",
    "gauss_newton",
    "lbfgs",
    "levenberg_marquardt",
    "newton",
    "newton_cg",
    "newton_krylov",
    "picard",
    "scipy_root",
]
