"""Built-in adjoint solvers; importing this package registers them."""

from . import exact, from_solver, gmres, jfb, neumann

__all__ = ["exact", "from_solver", "gmres", "jfb", "neumann"]
