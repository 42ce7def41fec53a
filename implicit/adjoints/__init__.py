"""Built-in adjoint solvers; importing this package registers them."""

from . import cg, exact, from_solver, gmres, jfb, minres, neumann

__all__ = ["cg", "exact", "from_solver", "gmres", "jfb", "minres", "neumann"]
