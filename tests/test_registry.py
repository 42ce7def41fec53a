"""One Registry serves solvers and adjoints; a forward solver used as an adjoint is a plain, picklable object."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import implicit
from implicit._registry import ADJOINTS, SOLVERS, Registry, RegistryError, make_adjoint


def test_both_kinds_are_registries_and_adjoints_fall_back_to_solvers() -> None:
    assert isinstance(SOLVERS, Registry) and isinstance(ADJOINTS, Registry)
    assert set(SOLVERS.available()) <= set(ADJOINTS.available())
    assert ADJOINTS.get("gmres") is implicit.get_adjoint("gmres")
    cls = ADJOINTS.get("anderson")
    assert issubclass(cls, implicit.AdjointSolver) and cls.solver_class is SOLVERS.get("anderson")
    assert ADJOINTS.get("anderson") is cls  # made once per solver class
    with pytest.raises(RegistryError, match="unknown adjoint 'andersen'; did you mean 'anderson'"):
        ADJOINTS.get("andersen")


@pytest.mark.parametrize("name", ["anderson", "broyden", "fixed_point"])
def test_a_solver_as_adjoint_pickles_and_copies_with_its_options(name: str) -> None:
    options = {"tol": 1e-9, "max_iter": 77}
    adjoint = make_adjoint(name, options)
    for clone in (pickle.loads(pickle.dumps(adjoint)), copy.deepcopy(adjoint)):
        assert type(clone) is type(adjoint) and clone == adjoint
        assert clone.tol == 1e-9 and clone.max_iter == 77


def test_a_pickled_solver_as_adjoint_gives_the_same_gradient() -> None:
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * torch.tanh(z) + theta)
    adjoint = pickle.loads(pickle.dumps(make_adjoint("anderson", {"tol": 1e-12})))
    sol = implicit.solve(problem, torch.zeros(2, dtype=torch.float64), solver="anderson", adjoint=adjoint, tol=1e-13)
    (grad,) = torch.autograd.grad(sol.z.sum(), theta)
    z = sol.z.detach()
    J = torch.diag(0.5 / torch.cosh(z) ** 2)  # ∂f/∂z; ∂f/∂θ = I
    want = torch.linalg.solve((torch.eye(2, dtype=torch.float64) - J).T, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_solve_attach_and_the_layer_share_one_settings_object() -> None:
    from implicit._settings import DEFAULT_TOL, SolveSettings

    assert SolveSettings.build() == SolveSettings()
    assert SolveSettings.build(tol=1, max_iter=5) == SolveSettings(tol=1.0, max_iter=5)
    with pytest.raises(ValueError, match="on_failure must be one of 'warn', 'raise', 'ignore'; got 'rise'"):
        SolveSettings.build(on_failure="rise")
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z)
    z0 = torch.ones(2, dtype=torch.float64)
    for call in (
        lambda: implicit.solve(problem, z0, tol=-1.0),
        lambda: implicit.attach(problem, z0, tol=-1.0),
        lambda: implicit.nn.DEQ(_Cell(), tol=-1.0),
    ):
        with pytest.raises(ValueError, match="tol must be a finite non-negative number; got -1.0"):
            call()
    assert implicit.nn.DEQ(_Cell()).tol == DEFAULT_TOL


class _Cell(torch.nn.Module):
    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + x

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)
