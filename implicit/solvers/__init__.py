"""Built-in forward solvers; importing this package registers them."""

from . import anderson, broyden, newton, newton_krylov, picard, scipy_root

__all__ = ["anderson", "broyden", "newton", "newton_krylov", "picard", "scipy_root"]
