"""What second derivatives and forward mode cost next to a first-order backward.

On a moderate two-variable equilibrium (dict state ``x: (B, nx)``, ``y: (B, ny)``,
coupled both ways, joint norm 0.8) the script times, for each adjoint:

* ``backward``: ``torch.autograd.grad(loss, params)``, the first-order gradient;
* ``backward (graph)``: the same with ``create_graph=True``;
* ``HVP``: ``backward (graph)`` followed by the gradient of ``⟨∇loss, v⟩``,
  i.e. one Hessian-vector product, the whole cost of double backward;
* ``jvp``: the forward-mode tangent of the solution along ``v`` (``torch.autograd.forward_ad``).

and counts what each did: evaluations of the user's map ``f`` (calls of the
Python function), linear solves with ``I - J`` or its transpose, and their
matrix-vector products (vector-Jacobian or Jacobian-vector products, or the
products that built a dense Jacobian). The forward solve is excluded from
every figure. Run: ``python benchmarks/higher_order_cost.py [--batch 32 --nx 128 --ny 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD

import implicit
from implicit import _ad, _adjoint


class Counters:
    """Counts of map evaluations, linear solves and their products, by patching the library's seams."""

    def __init__(self) -> None:
        self.f = 0
        self.solves = 0
        self.products = 0
        lin_solve = _ad.Linearisation.solve
        op_call = _adjoint.LinearOperator.__call__
        jacobian = _ad.Linearisation.jacobian

        def solve(lin: Any, b: torch.Tensor, transpose: bool) -> torch.Tensor:
            self.solves += 1
            return lin_solve(lin, b, transpose)

        def call(op: Any, v: torch.Tensor) -> torch.Tensor:
            self.products += 1
            return op_call(op, v)

        def jac(lin: Any) -> torch.Tensor:
            if lin._jacobian is None:
                self.products += lin.z_star.shape[1]  # one product per row or column
            return jacobian(lin)

        _ad.Linearisation.solve = solve  # type: ignore[method-assign]
        _adjoint.LinearOperator.__call__ = call  # type: ignore[method-assign]
        _ad.Linearisation.jacobian = jac  # type: ignore[method-assign]

    def reset(self) -> None:
        self.f = self.solves = self.products = 0

    def snapshot(self) -> tuple[int, int, int]:
        return self.f, self.solves, self.products


def make_problem(batch: int, nx: int, ny: int) -> tuple[list[torch.Tensor], Callable, dict]:
    g = torch.Generator().manual_seed(0)
    f64 = torch.float64
    n = nx + ny
    W = torch.randn(n, n, dtype=f64, generator=g)
    W *= 0.8 / torch.linalg.matrix_norm(W, ord=2)
    u = torch.randn(batch, nx, dtype=f64, generator=g)
    b = 0.1 * torch.randn(n, dtype=f64, generator=g)
    params = [W.requires_grad_(), u.requires_grad_(), b.requires_grad_()]

    def f(z: dict, W: torch.Tensor, u: torch.Tensor, b: torch.Tensor) -> dict:
        h = torch.tanh(torch.cat([z["x"], z["y"]], dim=1) @ W.T + b + torch.nn.functional.pad(u, (0, ny)))
        return {"x": h[:, :nx], "y": h[:, nx:]}

    z0 = {"x": torch.zeros(batch, nx, dtype=f64), "y": torch.zeros(batch, ny, dtype=f64)}
    return params, f, z0


def loss(z: dict) -> torch.Tensor:
    return (z["x"] ** 2).sum() + torch.sin(z["y"]).sum() + z["x"].sum() * z["y"].mean()


def median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--nx", type=int, default=128)
    parser.add_argument("--ny", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--adjoints", default="exact,neumann,gmres")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counters = Counters()
    params, f, z0 = make_problem(args.batch, args.nx, args.ny)
    v = [torch.randn_like(p) for p in params]
    print(f"two-variable equilibrium: batch {args.batch}, x {args.nx}, y {args.ny} (float64, {args.threads} thread)")
    header = (
        f"{'adjoint':<9} {'what':<17} {'time ms':>9} {'x backward':>10} {'f evals':>8} {'solves':>7} {'products':>9}"
    )
    print(header)
    print("-" * len(header))
    names = [a for a in args.adjoints.split(",") if a in implicit.available_adjoints()]
    solver = "anderson" if "anderson" in implicit.available_solvers() else "fixed_point"
    for name in names:
        rows = measure(name, solver, params, f, z0, v, counters, args.reps)
        base = rows["backward"][0]
        for what, (t, (nf, ns, npd)) in rows.items():
            print(f"{name:<9} {what:<17} {1e3 * t:9.2f} {t / base:10.2f} {nf:8d} {ns:7d} {npd:9d}")


def measure(
    name: str,
    solver: str,
    params: list[torch.Tensor],
    f: Callable,
    z0: dict,
    v: list[torch.Tensor],
    counters: Counters,
    reps: int,
) -> dict[str, tuple[float, tuple[int, int, int]]]:
    """Median time and counts of each derivative with adjoint ``name``."""
    options = {} if name == "exact" else {"tol": 1e-10, "max_iter": 500}

    def solve_with(fn: Callable) -> dict:
        problem = implicit.ImplicitProblem.fixed_point(fn, batched=True)
        sol = implicit.solve(problem, z0, solver=solver, adjoint=name, adjoint_options=options, tol=1e-10, max_iter=500)
        return sol.z

    def counted(z: dict) -> dict:
        counters.f += 1
        return f(z, *params)

    def solve() -> dict:
        return solve_with(counted)

    def first_order(z: dict) -> None:
        torch.autograd.grad(loss(z), params)

    def with_graph(z: dict) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(loss(z), params, create_graph=True)

    def hvp(z: dict) -> None:
        g = with_graph(z)
        torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, v)), params)

    def jvp() -> None:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(p.detach(), t) for p, t in zip(params, v)]

            def fd(z: dict) -> dict:
                counters.f += 1
                return f(z, *duals)

            fwAD.unpack_dual(solve_with(fd)["x"]).tangent  # noqa: B018 - the tangent is what is paid for

    rows = {}
    for what, fn in (("backward", first_order), ("backward (graph)", with_graph), ("HVP", hvp)):
        # Counts and time exclude the forward solve: a fresh solution per repetition.
        sols = [solve() for _ in range(reps + 1)]
        counters.reset()
        fn(sols[0])
        counts = counters.snapshot()
        it = iter(sols[1:])
        rows[what] = (median_time(lambda fn=fn, it=it: fn(next(it)), reps), counts)
    # Forward mode includes its forward solve; subtract a plain solve's time and evaluations.
    counters.reset()
    solve()
    solve_f = counters.f
    t_solve = median_time(solve, reps)
    counters.reset()
    jvp()
    f_jvp, s_jvp, p_jvp = counters.snapshot()
    rows["jvp (tangent)"] = (median_time(jvp, reps) - t_solve, (f_jvp - solve_f, s_jvp, p_jvp))
    return rows


if __name__ == "__main__":
    main()
