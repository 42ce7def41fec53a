"""A deep equilibrium model with two state variables of different sizes.

The question this answers: extending the one-variable DEQ of the implicit-layers
tutorial, ``z* = f(z*, u)`` with a backward hook solving ``g = Jᵀ g + grad``, to
two variables ``(x*, y*) = f(x*, y*, u)`` with ``x`` and ``y`` of different
sizes. The backward pass must solve ONE adjoint system over ``(x, y)`` jointly,
because ``∂f/∂(x, y)`` couples them; a hook per variable solving its own system
drops the off-diagonal blocks and returns a wrong gradient. With ``implicit``
the state is a dict and the joint adjoint is what ``implicit.solve`` does.

The script trains the model for a few steps on a toy regression task and, at
the start, checks the gradient against a dense float64 reference (Jacobian
materialised, ``torch.linalg.solve``) and against the per-variable-hook
approach. Run: ``python examples/two_variable_deq.py``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import implicit


class TwoVariableDEQ(nn.Module):
    """``(x*, y*) = f(x*, y*, u)``: ``x`` of size ``nx``, ``y`` of size ``ny``, then a linear readout."""

    def __init__(self, n_in: int = 4, nx: int = 3, ny: int = 5, n_out: int = 2) -> None:
        super().__init__()
        self.xx = nn.Linear(nx, nx, bias=False)
        self.xy = nn.Linear(ny, nx, bias=False)
        self.yx = nn.Linear(nx, ny, bias=False)
        self.yy = nn.Linear(ny, ny, bias=False)
        self.inp = nn.Linear(n_in, nx)
        self.out = nn.Linear(nx + ny, n_out)
        with torch.no_grad():  # start as a contraction so every solver converges
            for lin in (self.xx, self.xy, self.yx, self.yy):
                lin.weight.mul_(0.3 / torch.linalg.matrix_norm(lin.weight, ord=2))
        self.nx, self.ny = nx, ny
        self.last: implicit.Solution | None = None

    def f(self, z: dict[str, torch.Tensor], u: torch.Tensor) -> dict[str, torch.Tensor]:
        x, y = z["x"], z["y"]
        return {
            "x": torch.tanh(self.xx(x) + self.xy(y) + self.inp(u)),
            "y": torch.tanh(self.yx(x) + self.yy(y)),
        }

    def equilibrium(self, u: torch.Tensor, **kwargs: object) -> dict[str, torch.Tensor]:
        z0 = {"x": u.new_zeros(len(u), self.nx), "y": u.new_zeros(len(u), self.ny)}
        problem = implicit.ImplicitProblem.fixed_point(lambda z: self.f(z, u), batched=True)
        self.last = implicit.solve(problem, z0, **kwargs)  # type: ignore[arg-type]
        return self.last.z

    def forward(self, u: torch.Tensor, **kwargs: object) -> torch.Tensor:
        z = self.equilibrium(u, **kwargs)
        return self.out(torch.cat([z["x"], z["y"]], dim=1))


def dense_reference(model: TwoVariableDEQ, u: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """The IFT gradient of the loss written out densely in float64 (independent of ``implicit``)."""
    params = [p for p in model.parameters()]
    with torch.no_grad():  # the fixed point by plain iteration to machine precision
        z = {"x": u.new_zeros(len(u), model.nx), "y": u.new_zeros(len(u), model.ny)}
        for _ in range(2000):
            z = model.f(z, u)
    flat = torch.cat([z["x"], z["y"]], dim=1).reshape(-1)
    B, nx = len(u), model.nx

    def G(v: torch.Tensor) -> torch.Tensor:
        v = v.reshape(B, -1)
        out = model.f({"x": v[:, :nx], "y": v[:, nx:]}, u)
        return torch.cat([out["x"], out["y"]], dim=1).reshape(-1)

    J = torch.autograd.functional.jacobian(G, flat)
    zs = flat.clone().requires_grad_()
    loss = nn.functional.mse_loss(model.out(zs.reshape(B, -1)), target)
    (g,) = torch.autograd.grad(loss, zs, retain_graph=True)
    v = torch.linalg.solve((torch.eye(len(flat), dtype=flat.dtype) - J).T, g)
    out = G(flat)  # parameters see the state as a constant here
    direct = torch.autograd.grad(loss, [model.out.weight, model.out.bias], retain_graph=True)
    implicit_part = torch.autograd.grad(out, params, v, allow_unused=True)
    grads = [torch.zeros_like(p) if gp is None else gp for p, gp in zip(params, implicit_part)]
    grads[-2] = grads[-2] + direct[0]
    grads[-1] = grads[-1] + direct[1]
    return grads


def per_variable_hooks(model: TwoVariableDEQ, u: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
    """The approach of one backward hook per variable, each solving only its own block: wrong."""
    with torch.no_grad():
        z = {"x": u.new_zeros(len(u), model.nx), "y": u.new_zeros(len(u), model.ny)}
        for _ in range(2000):
            z = model.f(z, u)
    x0, y0 = z["x"].clone().requires_grad_(), z["y"].clone().requires_grad_()
    f0 = model.f({"x": x0, "y": y0}, u)
    out = model.f(z, u)

    def hook(fz: torch.Tensor, z0: torch.Tensor):
        def solve(grad: torch.Tensor) -> torch.Tensor:
            g = grad
            for _ in range(200):
                g = torch.autograd.grad(fz, z0, g, retain_graph=True)[0] + grad
            return g

        return solve

    out["x"].register_hook(hook(f0["x"], x0))
    out["y"].register_hook(hook(f0["y"], y0))
    loss = nn.functional.mse_loss(model.out(torch.cat([out["x"], out["y"]], dim=1)), target)
    return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((g - w).norm() ** 2) for g, w in zip(got, want) if g is not None)
    return (num / sum(float(w.norm() ** 2) for w in want)) ** 0.5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--solver", default="anderson" if "anderson" in implicit.available_solvers() else "fixed_point")
    parser.add_argument("--adjoint", default="gmres" if "gmres" in implicit.available_adjoints() else "neumann")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = TwoVariableDEQ().double()
    u = torch.randn(16, 4, dtype=torch.float64)
    target = torch.randn(16, 2, dtype=torch.float64)
    settings = dict(solver=args.solver, adjoint=args.adjoint, tol=1e-10, max_iter=500,
                    adjoint_options={"tol": 1e-10})

    loss = nn.functional.mse_loss(model(u, **settings), target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    reference = dense_reference(model, u, target)
    hooks = per_variable_hooks(model, u, target)
    assert model.last is not None
    print(f"solver={args.solver} adjoint={args.adjoint}: forward {model.last.stats.iterations} iterations, "
          f"adjoint {model.last.adjoint_stats.iterations if model.last.adjoint_stats else '-'} iterations")
    print(f"gradient error vs dense float64 reference, joint adjoint (implicit): {relative_error(grads, reference):.2e}")
    print(f"gradient error vs dense float64 reference, one hook per variable:    {relative_error(hooks, reference):.2e}")

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(u, **settings), target)
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.5f}  forward iterations {model.last.stats.iterations}")


if __name__ == "__main__":
    main()
