"""Built-in forward solvers; importing this package registers them."""

from . import (
    anderson,
    broyden,
    chord,
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
    "chord",
    "gauss_newton",
    "lbfgs",
    "levenberg_marquardt",
    "newton",
    "newton_cg",
    "newton_krylov",
    "picard",
    "scipy_root",
]
