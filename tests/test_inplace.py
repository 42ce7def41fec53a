"""A tensor the backward needs, modified in place between the solve and ``backward()``, raises.

As in plain autograd: a parameter or input of the map changed in place after
the solve (``W.mul_()`` under ``no_grad``, ``optimizer.step()`` before
``backward()``) would otherwise give a gradient that matches neither the old
values nor the new ones.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ADJOINTS
from problems import contraction, f64
from reference import ift_grads

import implicit
from implicit import _compat
from implicit._saved import evaluate_without_saving

MODIFIED = "modified in place after the solve"
# PyTorch 2.2 cannot tell whether the caller has saved-tensor hooks, so the second evaluation
# at the solution saves as plain autograd does, and a change is caught by autograd's own check.
NAMED = _compat.top_saved_tensors_hooks is not None
AUTOGRAD = "modified by an inplace operation"


# These maps' Jacobians are is not symmetric: the symmetric adjoints (cg, minres) do not apply.
GENERAL_ADJOINTS = [a for a in ADJOINTS if not implicit.get_adjoint(a).symmetric]


def _named(pattern: str) -> str:
    """The library's message naming the tensor, or (where it cannot name it) autograd's own."""
    return pattern if NAMED else f"{pattern}|{AUTOGRAD}"


def _setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = contraction(5, 5, 0.5, g).requires_grad_()
    x = torch.randn(3, 5, dtype=f64, generator=g)
    return W, x


def _map(W: torch.Tensor, x: torch.Tensor):
    # x * (0.2 z): x is saved for backward (the derivative in z needs it).
    return lambda z: {
        "h": torch.tanh(z["h"] @ W.T + x * (0.2 * z["h"]) + x),
        "s": 0.5 * z["s"] + z["h"].sum(1, keepdim=True),
    }


def _z0() -> dict[str, torch.Tensor]:
    return {"h": torch.zeros(3, 5, dtype=f64), "s": torch.zeros(3, 1, dtype=f64)}


def _solve(f, adjoint: str) -> implicit.Solution:
    problem = implicit.ImplicitProblem.fixed_point(f, batched=True)
    return implicit.solve(problem, _z0(), solver="anderson", adjoint=adjoint, tol=1e-11, max_iter=300)


def _loss(z: dict[str, torch.Tensor]) -> torch.Tensor:
    return (z["h"] ** 2).sum() + z["s"].sum()


@pytest.mark.parametrize("adjoint", GENERAL_ADJOINTS)
def test_a_parameter_modified_in_place_raises_and_names_it(adjoint: str) -> None:
    W, x = _setup()
    sol = _solve(_map(W, x), adjoint)
    with torch.no_grad():
        W.mul_(1.5)
    with pytest.raises(
        RuntimeError, match=_named(f"tensor 'W' \\(shape \\(5, 5\\), dtype torch.float64\\) was {MODIFIED}")
    ):
        _loss(sol.z).backward()
    assert W.grad is None


@pytest.mark.parametrize("adjoint", GENERAL_ADJOINTS)
def test_a_closed_over_input_modified_in_place_raises(adjoint: str) -> None:
    W, x = _setup(1)
    x.requires_grad_()
    sol = _solve(_map(W, x), adjoint)
    with torch.no_grad():
        x.add_(0.1)
    with pytest.raises(RuntimeError, match=_named(f"tensor 'x' .* was {MODIFIED}")):
        _loss(sol.z).backward()


@pytest.mark.parametrize("adjoint", GENERAL_ADJOINTS)
def test_a_non_leaf_input_modified_in_place_raises(adjoint: str) -> None:
    W, x0 = _setup(2)
    encoder = torch.nn.Linear(5, 5, dtype=f64)
    x = encoder(x0)  # requires grad, not a leaf
    sol = _solve(_map(W, x), adjoint)
    x.mul_(2.0)  # recorded by autograd, as a non-leaf may be
    with pytest.raises(RuntimeError, match=_named(f"tensor 'x' .* was {MODIFIED}")):
        _loss(sol.z).backward()


class _Cell(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4, dtype=f64)
        with torch.no_grad():
            self.lin.weight.mul_(0.4)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)




@pytest.mark.parametrize("adjoint", GENERAL_ADJOINTS)
def test_optimizer_step_before_backward_raises_and_names_the_parameter(adjoint: str) -> None:
    torch.manual_seed(0)
    layer = implicit.nn.DEQ(_Cell(), solver="anderson", adjoint=adjoint, tol=1e-10)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(3, 4, dtype=f64)
    layer(x).pow(2).sum().backward()  # a correct step first, so that the parameters have gradients
    opt.step()
    z = layer(x)
    opt.step()  # the classic mistake: the step between forward and backward
    with pytest.raises(RuntimeError, match=_named(f"parameter 'cell.lin.weight' .* was {MODIFIED}.*optimizer.step")):
        z.pow(2).sum().backward()


@pytest.mark.parametrize("adjoint", GENERAL_ADJOINTS)
def test_nothing_fires_when_nothing_changed(adjoint: str) -> None:
    W, x = _setup(3)
    x.requires_grad_()
    unrelated = torch.zeros(3)
    sol = _solve(_map(W, x), adjoint)
    with torch.no_grad():
        unrelated.add_(1.0)  # read by nothing the backward needs
    z = sol.z
    gW, gx = torch.autograd.grad(_loss(z), (W, x))
    # reference: the IFT with dense float64 matrices, or for an approximate adjoint
    # (Jacobian-free backprop) its own definition, the loss gradient sent through one evaluation
    G = lambda state, p: _map(*p)(state)  # noqa: E731
    z_star = {k: v.detach() for k, v in z.items()}
    dloss = {"h": 2 * z_star["h"], "s": torch.ones_like(z_star["s"])}
    if implicit.get_adjoint(adjoint).approximate:
        Wd, xd = W.detach().requires_grad_(), x.detach().requires_grad_()
        out = G(z_star, [Wd, xd])
        ref = torch.autograd.grad(sum((out[k] * dloss[k]).sum() for k in out), (Wd, xd))
        tol = 1e-12
    else:
        ref = ift_grads(G, z_star, [W, x], dloss)
        tol = 1e-7
    torch.testing.assert_close(gW, ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(gx, ref[1], rtol=tol, atol=tol)


@pytest.mark.parametrize("adjoint", ["gmres", "exact"])
def test_a_second_backward_after_a_change_raises(adjoint: str) -> None:
    W, x = _setup(4)
    sol = _solve(_map(W, x), adjoint)
    loss = _loss(sol.z)
    (first,) = torch.autograd.grad(loss, W, retain_graph=True)
    with torch.no_grad():
        W.sub_(0.01 * first)
    with pytest.raises(RuntimeError, match=_named(MODIFIED)):
        torch.autograd.grad(loss, W)


def test_double_backward_after_a_change_raises() -> None:
    W, x = _setup(5)
    sol = _solve(_map(W, x), "gmres")
    (gW,) = torch.autograd.grad(_loss(sol.z), W, create_graph=True)
    with torch.no_grad():
        W.mul_(0.9)
    # the graph of the first backward checks first, by autograd's own message
    with pytest.raises(RuntimeError, match=f"{MODIFIED}|modified by an inplace operation"):
        torch.autograd.grad((gW**2).sum(), W)


def test_under_the_callers_saved_tensor_hooks_the_recomputed_evaluation_checks_too() -> None:
    W, x = _setup(6)
    f = _map(W, x)
    z = {k: v.requires_grad_() for k, v in _z0().items()}

    def g(flat: torch.Tensor) -> torch.Tensor:
        out = f({"h": flat[:, :5], "s": flat[:, 5:]})
        return torch.cat([out["h"], out["s"]], 1)

    flat = torch.cat([z["h"], z["s"]], 1).detach().requires_grad_()
    out = evaluate_without_saving(g, flat, f)
    with torch.no_grad():
        W.mul_(1.5)
    with pytest.raises(RuntimeError, match=f"tensor 'W' .* was {MODIFIED}"):
        out.sum().backward()


def test_the_variables_of_a_returned_dict_are_views_edited_through_a_clone() -> None:
    # Documented in docs/concepts.md: the variables of a differentiable solution are
    # views of one tensor, which autograd does not let be edited in place; a clone can be.
    W, x = _setup(7)
    sol = _solve(_map(W, x), "exact")
    with pytest.raises(RuntimeError, match="is a view and is being modified inplace.*out-of-place one"):
        sol.z["h"].add_(1.0)
    h = sol.z["h"].clone()
    h.add_(1.0)
    (g,) = torch.autograd.grad((h**2).sum(), W)
    z_star = {k: v.detach() for k, v in sol.z.items()}
    G = lambda state, p: _map(p[0], x)(state)  # noqa: E731
    (ref,) = ift_grads(G, z_star, [W], {"h": 2 * (z_star["h"] + 1.0), "s": torch.zeros_like(z_star["s"])})
    torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-7)


def test_a_returned_tensor_state_may_be_edited_in_place() -> None:
    W, x = _setup(8)
    z = implicit.fixed_point(lambda z: torch.tanh(z @ W.T + x), torch.zeros(3, 5, dtype=f64), tol=1e-11)
    z_star = z.detach().clone()
    z.mul_(2.0)  # the solution's own memory: nothing the backward reads
    (g,) = torch.autograd.grad(z.sum(), W)
    G = lambda state, p: {"h": torch.tanh(state["h"] @ p[0].T + x)}  # noqa: E731
    (ref,) = ift_grads(G, {"h": z_star}, [W], {"h": torch.full_like(z_star, 2.0)})
    torch.testing.assert_close(g, ref, rtol=1e-7, atol=1e-7)
