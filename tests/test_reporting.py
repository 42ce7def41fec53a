"""Failures reported once per kind and call site, with their figures as attributes; a layer's counters."""

from __future__ import annotations

import math
import warnings

import torch

import implicit

F64 = torch.float64


def slow_problem(theta: torch.Tensor) -> implicit.ImplicitProblem:
    A = 0.97 * torch.eye(3, dtype=F64)
    return implicit.ImplicitProblem.fixed_point(lambda z: z @ A.T + theta, batched=True)


def test_repeated_forward_failure_warns_once_with_figures():
    theta = torch.ones(3, dtype=F64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        sols = []
        for _ in range(20):
            sols.append(implicit.solve(slow_problem(theta), torch.zeros(2, 3, dtype=F64), solver="fixed_point", max_iter=4))
    assert len(caught) == 1, [str(w.message) for w in caught]
    w = caught[0]
    assert w.category is implicit.ConvergenceWarning
    assert w.filename == __file__  # the caller's line, not the library's
    assert not any(ch.isdigit() for ch in str(w.message))
    figures = w.message
    assert figures.kind == "unconverged" and figures.what == "forward solve" and figures.solver == "fixed_point"
    assert figures.iterations == 4 and figures.max_iter == 4 and figures.tol == 1e-6
    assert figures.unconverged == 2 and figures.samples == 2
    # the residual of the returned iterate: ‖(A - I) z + θ‖ at z = θ(1 + 0.97 + 0.97² + 0.97³)
    z = sols[0].z
    expected = torch.linalg.vector_norm(z @ (0.97 * torch.eye(3, dtype=F64)).T + theta - z, dim=1)
    torch.testing.assert_close(figures.residual, expected)
    torch.testing.assert_close(sols[0].stats.residual, expected)
    assert "max_iter=4" in figures.reason


def test_adjoint_failure_is_another_kind_and_also_once():
    theta = torch.ones(3, dtype=F64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(20):
            sol = implicit.solve(
                slow_problem(theta), torch.zeros(2, 3, dtype=F64), solver="fixed_point", max_iter=3,
                adjoint="neumann", adjoint_options={"max_iter": 2},
            )
            sol.z.sum().backward()
    messages = [str(w.message) for w in caught]
    assert len(caught) == 2, messages
    forward, adjoint = (w.message for w in caught)
    assert forward.what == "forward solve" and adjoint.what == "adjoint solve" and adjoint.solver == "neumann"
    assert caught[1].filename == __file__  # the backward() line
    assert adjoint.iterations == 2 and adjoint.unconverged == 2
    assert not sol.adjoint_stats.all_converged
    # Neumann's residual after 2 products is the next term Mᵏ⁺¹ b = 0.97³ · 1 per entry.
    torch.testing.assert_close(adjoint.residual, torch.full((2,), 0.97**3 * math.sqrt(3), dtype=F64))


def test_repeated_non_finite_warns_once_naming_the_variable():
    def f(z):
        return {"x": 0.5 * z["x"], "y": torch.log(z["y"] - 3.0)}

    z0 = {"x": torch.ones(2, dtype=F64), "y": torch.ones(2, dtype=F64)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(20):
            implicit.fixed_point(f, z0, solver="anderson")
        implicit.fixed_point(slow_problem(torch.ones(3, dtype=F64)).fn, torch.zeros(3, dtype=F64), solver="fixed_point", max_iter=2)
    assert len(caught) == 2, [str(w.message) for w in caught]
    nonfinite = caught[0].message
    assert nonfinite.kind == "nonfinite" and nonfinite.variables == ["z['y']"]
    assert "z['y']" in str(nonfinite) and "z['x']" not in str(nonfinite)
    assert caught[1].message.kind == "unconverged"


def test_raise_carries_the_same_figures():
    try:
        implicit.solve(slow_problem(torch.ones(3, dtype=F64)), torch.zeros(2, 3, dtype=F64), solver="fixed_point",
                       max_iter=4, on_failure="raise")
    except implicit.ConvergenceError as err:
        assert err.iterations == 4 and err.unconverged == 2 and err.residual.shape == (2,)
        assert "max_iter=4" in str(err)  # an error is raised once: its message keeps the figures
    else:
        raise AssertionError("no ConvergenceError")


class Cell(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        with torch.no_grad():
            self.lin.weight.copy_(scale * torch.eye(3, dtype=F64))
            self.lin.bias.fill_(1.0)

    def forward(self, z, x):
        return {"h": self.lin(z["h"]) + x}

    def init_state(self, x):
        return {"h": torch.zeros_like(x)}


SEEN: list[float] = []


class RecordingNeumann(implicit.get_adjoint("neumann")):
    """The Neumann adjoint, recording the largest final residual of each of its solves."""

    def solve(self, op, b, monitor):
        x = super().solve(op, b, monitor)
        SEEN.append(float(monitor.residual.max()))
        return x


def test_layer_counters_count_and_reset():
    SEEN.clear()
    layer = implicit.nn.DEQ(Cell(0.9), solver="fixed_point", adjoint=RecordingNeumann, tol=1e-8, max_iter=5,
                            on_failure="ignore", adjoint_options={"max_iter": 3})
    assert layer.counters == {
        "forward_solves": 0, "forward_unconverged": 0, "adjoint_solves": 0, "adjoint_unconverged": 0,
        "worst_forward_residual": None, "worst_adjoint_residual": None,
    }
    worst_fwd = 0.0
    for step in range(4):
        x = torch.full((2, 3), 0.1 * (step + 1), dtype=F64)
        z = layer(x)
        z["h"].sum().backward()
        worst_fwd = max(worst_fwd, float(layer.last_stats.residual.max()))
    with torch.no_grad():
        layer(torch.zeros(2, 3, dtype=F64))  # a forward solve without backward; z = 0 is not the solution
    counts = layer.counters
    # One adjoint solve per backward: an unconverged one is reported, not solved a second time.
    assert counts["forward_solves"] == 5 and counts["adjoint_solves"] == len(SEEN) == 4
    assert counts["forward_unconverged"] == 5 and counts["adjoint_unconverged"] == 4
    worst_fwd = max(worst_fwd, float(layer.last_stats.residual.max()))
    assert counts["worst_forward_residual"] == worst_fwd
    assert counts["worst_adjoint_residual"] == max(SEEN)
    layer.reset_counters()
    assert layer.counters["forward_solves"] == 0 and layer.counters["worst_forward_residual"] is None
    # a converging layer counts no failures
    good = implicit.nn.DEQ(Cell(0.5), solver="fixed_point", adjoint="gmres", tol=1e-10, max_iter=200)
    good(torch.ones(2, 3, dtype=F64))["h"].sum().backward()
    counts = good.counters
    assert counts["forward_unconverged"] == 0 and counts["adjoint_unconverged"] == 0
    assert counts["worst_forward_residual"] == float(good.last_stats.residual.max())


def test_counters_include_backward_of_an_earlier_call():
    # Two calls, then one backward through both: both adjoint solves are counted.
    layer = implicit.nn.DEQ(Cell(0.5), solver="fixed_point", adjoint="gmres", tol=1e-10, max_iter=200)
    z1 = layer(torch.ones(2, 3, dtype=F64))
    z2 = layer(2 * torch.ones(2, 3, dtype=F64))
    (z1["h"].sum() + z2["h"].sum()).backward()
    assert layer.counters["adjoint_solves"] == 2


def test_counters_skip_the_residual_of_an_approximate_adjoint():
    layer = implicit.nn.DEQ(Cell(0.5), solver="fixed_point", adjoint="jfb", tol=1e-10, max_iter=200)
    layer(torch.ones(2, 3, dtype=F64))["h"].sum().backward()
    counts = layer.counters
    assert counts["adjoint_solves"] == 1 and counts["adjoint_unconverged"] == 0
    assert counts["worst_adjoint_residual"] is None
