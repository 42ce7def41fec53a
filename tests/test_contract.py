"""The behaviour DESIGN.md fixes: structures, stats, failure policy, errors, memory, registry."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import ADJOINTS, SOLVERS
from problems import f64
from reference import saved_bytes

import implicit


def _linear_map(rate: float, n: int = 4):
    """``z = rate·Q z + c`` with ``Q`` orthogonal-ish: contraction ``rate``, known solution."""
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=f64, generator=g))
    c = torch.randn(n, dtype=f64, generator=g)
    z_star = torch.linalg.solve(torch.eye(n, dtype=f64) - rate * Q, c)
    return (lambda z: rate * (z @ Q.T) + c), z_star


# -- structures and stats ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tensor", "tuple", "list", "dict"])
def test_structure_is_preserved(kind: str) -> None:
    f, z_star = _linear_map(0.5)
    pack = {
        "tensor": lambda a, b: torch.cat([a, b]),
        "tuple": lambda a, b: (a, b),
        "list": lambda a, b: [a, b],
        "dict": lambda a, b: {"a": a, "b": b},
    }[kind]
    unpack = {
        "tensor": lambda s: (s[:1], s[1:]),
        "tuple": lambda s: (s[0], s[1]),
        "list": lambda s: (s[0], s[1]),
        "dict": lambda s: (s["a"], s["b"]),
    }[kind]
    seen = []

    def g(state):
        seen.append(type(state))
        return pack(*unpack_map(f, *unpack(state)))

    def unpack_map(f, a, b):
        out = f(torch.cat([a, b]))
        return out[:1], out[1:]

    z0 = pack(torch.zeros(1, dtype=f64), torch.zeros(3, dtype=f64))
    z = implicit.fixed_point(g, z0, solver="fixed_point", adjoint="exact", tol=1e-12, max_iter=500)
    assert type(z) is type(z0) and all(t is type(z0) for t in seen)
    a, b = unpack(z)
    assert torch.allclose(torch.cat([a, b]), z_star, atol=1e-10)


def test_stats_fields_batched_and_unbatched() -> None:
    f, _ = _linear_map(0.5)
    sol = implicit.solve(
        implicit.ImplicitProblem.fixed_point(f, batched=True), torch.zeros(3, 4, dtype=f64),
        solver="fixed_point", adjoint="exact", tol=1e-10,
    )
    st = sol.stats
    assert st.solver == "fixed_point" and isinstance(st.iterations, int) and isinstance(st.nfe, int)
    assert st.residual.shape == (3,) and st.converged.shape == (3,) and st.converged.dtype == torch.bool
    assert st.history.shape == (st.iterations + 1, 3)
    assert st.nfe == st.iterations + 1
    assert bool((st.residual <= 1e-10 * sol.z.norm(dim=1) + 1e-12).all())
    sol1 = implicit.solve(
        implicit.ImplicitProblem.fixed_point(f), torch.zeros(4, dtype=f64), solver="fixed_point", tol=1e-10,
        adjoint="exact",
    )
    assert sol1.stats.residual.shape == () and sol1.stats.converged.shape == ()
    assert sol1.stats.history.shape == (sol1.stats.iterations + 1,)
    assert sol1.converged is True


def test_zero_solution_converges_with_atol() -> None:
    z = implicit.fixed_point(lambda z: 0.5 * z, torch.ones(3, dtype=f64), solver="fixed_point", max_iter=200,
                             adjoint="exact")
    assert float(z.abs().max()) < 1e-11


def test_z0_receives_no_gradient_and_no_grad_mode() -> None:
    f, _ = _linear_map(0.5)
    c = torch.ones(4, dtype=f64, requires_grad=True)
    z0 = torch.zeros(4, dtype=f64, requires_grad=True)
    z = implicit.fixed_point(lambda z: f(z) + c, z0, solver="fixed_point", adjoint="exact")
    z.sum().backward()
    assert z0.grad is None and c.grad is not None
    with torch.no_grad():
        sol = implicit.solve(implicit.ImplicitProblem.fixed_point(lambda z: f(z) + c), z0, solver="fixed_point",
                             adjoint="exact")
    assert sol.z.grad_fn is None and not sol.z.requires_grad
    assert sol.z.data_ptr() != z0.data_ptr()


def test_repeated_calls_are_identical() -> None:
    f, _ = _linear_map(0.9)
    outs = [
        implicit.fixed_point(f, torch.zeros(2, 4, dtype=f64), batched=True, solver=s, adjoint="exact", tol=1e-10,
                             max_iter=500)
        for s in ["fixed_point", "fixed_point"]
    ]
    assert torch.equal(outs[0], outs[1])


def test_converged_samples_stop_changing() -> None:
    f, z_star = _linear_map(0.5)
    z0 = torch.zeros(3, 4, dtype=f64)
    z0[1] = z_star
    z0[1, 0] += 1e-13  # within tolerance: converged at iteration 0
    sol = implicit.solve(implicit.ImplicitProblem.fixed_point(f, batched=True), z0, solver="fixed_point",
                         adjoint="exact", tol=1e-10)
    assert torch.equal(sol.z[1], z0[1])
    assert sol.stats.iterations > 5


# -- failure policy -----------------------------------------------------------------------


def _slow():
    f, _ = _linear_map(0.99)
    return implicit.ImplicitProblem.fixed_point(f, batched=True), torch.zeros(2, 4, dtype=f64)


def test_on_failure_raise_warn_ignore_forward() -> None:
    problem, z0 = _slow()
    with pytest.raises(implicit.ConvergenceError, match="max_iter=5"):
        implicit.solve(problem, z0, solver="fixed_point", adjoint="exact", max_iter=5, on_failure="raise")
    with pytest.warns(implicit.ConvergenceWarning, match="did not converge"):
        sol = implicit.solve(problem, z0, solver="fixed_point", adjoint="exact", max_iter=5, on_failure="warn")
    assert not sol.converged and not bool(sol.stats.converged.any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = implicit.solve(problem, z0, solver="fixed_point", adjoint="exact", max_iter=5, on_failure="ignore")
    assert not sol.converged


def test_on_failure_applies_to_adjoint() -> None:
    f, _ = _linear_map(0.95)
    c = torch.ones(4, dtype=f64, requires_grad=True)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: f(z) + c)
    z0 = torch.zeros(4, dtype=f64)
    sol = implicit.solve(problem, z0, solver="fixed_point", adjoint="neumann", max_iter=2000, tol=1e-10,
                         on_failure="raise", adjoint_options={"max_iter": 3})
    with pytest.raises(implicit.ConvergenceError, match="adjoint solve"):
        sol.z.sum().backward()
    sol = implicit.solve(problem, z0, solver="fixed_point", adjoint="neumann", max_iter=2000, tol=1e-10,
                         on_failure="warn", adjoint_options={"max_iter": 3})
    with pytest.warns(implicit.ConvergenceWarning, match="adjoint solve"):
        sol.z.sum().backward()
    assert sol.adjoint_stats is not None and not sol.adjoint_stats.all_converged


def test_non_finite_is_named_and_never_converged() -> None:
    calls = {"n": 0}

    def f(z):
        calls["n"] += 1
        y = 0.5 * z["y"]
        if calls["n"] > 3:
            y = y + float("nan")
        return {"x": 0.5 * z["x"], "y": y}

    z0 = {"x": torch.ones(2, dtype=f64), "y": torch.ones(3, dtype=f64)}
    with pytest.raises(implicit.SolverError, match=r"z\['y'\]"):
        implicit.solve(implicit.ImplicitProblem.fixed_point(f), z0, solver="fixed_point", adjoint="exact",
                       on_failure="raise")
    for policy in ["warn", "ignore"]:
        calls["n"] = 0
        with pytest.warns(implicit.ConvergenceWarning, match=r"non-finite value in z\['y'\]"):
            sol = implicit.solve(implicit.ImplicitProblem.fixed_point(f), z0, solver="fixed_point",
                                 adjoint="exact", on_failure=policy)
        assert not sol.converged
    assert issubclass(implicit.ConvergenceError, implicit.SolverError)


# -- bad input ---------------------------------------------------------------------------

Z0 = {"x": torch.zeros(4, 3, dtype=f64), "y": torch.zeros(4, 5, dtype=f64)}


def _ok(z):
    return {"x": 0.5 * z["x"], "y": 0.5 * z["y"]}


BAD_CALLS = [
    ("wrong shape", lambda z: {"x": z["x"], "y": torch.zeros(4, 6, dtype=f64)}, Z0, {}, ValueError,
     r"z\['y'\] with shape \(4, 6\); expected \(4, 5\) as in z0"),
    ("missing key", lambda z: {"x": z["x"]}, Z0, {}, ValueError, r"missing \['y'\]"),
    ("extra key", lambda z: {**z, "w": z["x"]}, Z0, {}, ValueError, r"unexpected \['w'\]"),
    ("wrong dtype", lambda z: {"x": z["x"].float(), "y": z["y"]}, Z0, {}, ValueError,
     r"z\['x'\] with dtype torch.float32; expected torch.float64"),
    ("not a dict", lambda z: z["x"], Z0, {}, ValueError, r"returned Tensor; expected a dict"),
    ("tuple length", lambda z: (z[0],), (torch.zeros(2), torch.zeros(3)), {}, ValueError,
     r"tuple of length 1; expected a tuple of length 2"),
    ("not a tensor", lambda z: {"x": 1.0, "y": z["y"]}, Z0, {}, ValueError, r"z\['x'\] of type float"),
    ("batch mismatch", _ok, {"x": torch.zeros(4, 3), "y": torch.zeros(3, 5)}, {"batched": True}, ValueError,
     r"z\['y'\] has batch size 3; expected 4"),
    ("mixed dtypes", _ok, {"x": torch.zeros(4, 3), "y": torch.zeros(4, 5, dtype=f64)}, {}, ValueError,
     r"z\['y'\] has dtype torch.float64; expected torch.float32"),
    ("integer state", lambda z: z, torch.zeros(3, dtype=torch.long), {}, ValueError, r"expected a floating-point"),
    ("0-dim batched", lambda z: z, torch.zeros(()), {"batched": True}, ValueError, r"0-dim but the problem is batched"),
    ("bad z0 type", lambda z: z, 3.0, {}, TypeError, r"z0 must be a tensor"),
    ("unknown solver", _ok, Z0, {"solver": "andersen"}, ValueError, r"unknown solver 'andersen'.*did you mean"),
    ("unknown adjoint", _ok, Z0, {"adjoint": "neuman"}, ValueError, r"unknown adjoint 'neuman'; did you mean 'neumann'"),
    ("unknown option", _ok, Z0, {"solver": "fixed_point", "solver_options": {"dampin": 0.5}}, ValueError,
     r"unknown option 'dampin' for solver 'fixed_point'; did you mean 'damping'"),
    ("unknown adjoint option", _ok, Z0, {"adjoint": "neumann", "adjoint_options": {"tl": 1}}, ValueError,
     r"unknown option 'tl' for adjoint 'neumann'.*Options: tol, atol, max_iter"),
    ("bad option value", _ok, Z0, {"solver": "fixed_point", "solver_options": {"damping": 2.0}}, ValueError,
     r"damping must lie in \(0, 1\]; got 2.0"),
    ("bad on_failure", _ok, Z0, {"on_failure": "loud"}, ValueError, r"on_failure must be one of"),
    ("negative tol", _ok, Z0, {"tol": -1.0}, ValueError, r"tol must be a finite non-negative number; got -1.0"),
    ("bad max_iter", _ok, Z0, {"max_iter": 2.5}, ValueError, r"max_iter must be a non-negative int; got 2.5"),
    ("bad solver type", _ok, Z0, {"solver": 3}, TypeError, r"solver must be a registered name"),
    ("writes into its input", lambda z: z.mul_(0.5).add_(1.0), torch.zeros(3, dtype=f64), {}, ValueError,
     r"the map f modified its input in place \(z: \(3,\)\); .*\(z.mul\(0.5\) rather than z.mul_\(0.5\)\)"),
]


@pytest.mark.parametrize(("fn", "z0", "kwargs", "error", "message"), [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input(fn, z0, kwargs, error, message) -> None:
    kwargs = dict(kwargs)
    batched = kwargs.pop("batched", False)
    kwargs.setdefault("solver", "fixed_point")
    kwargs.setdefault("adjoint", "exact")
    with pytest.raises(error, match=message), torch.no_grad():  # no_grad: autograd itself refuses some of these
        implicit.solve(implicit.ImplicitProblem.fixed_point(fn, batched=batched), z0, **kwargs)


def test_unknown_names_are_lookup_errors_listing_names() -> None:
    with pytest.raises(LookupError, match="Available: .*fixed_point"):
        implicit.get_solver("nope")
    with pytest.raises(LookupError, match="Available: .*exact.*neumann"):
        implicit.get_adjoint("nope")


# -- memory -------------------------------------------------------------------------------


def _saved_bytes(max_iter: int) -> int:
    torch.manual_seed(0)
    W = 0.98 * torch.eye(64, dtype=torch.float32)
    lin = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    total, _ = saved_bytes(
        lambda: implicit.fixed_point(lambda z: z @ W.T + 0.01 * torch.tanh(lin(z) + x), torch.zeros(8, 64),
                                     batched=True, solver="fixed_point", adjoint="neumann", max_iter=max_iter,
                                     tol=1e-9, on_failure="ignore")
    )
    return total


def test_saved_bytes_do_not_grow_with_iterations() -> None:
    few, many = _saved_bytes(10), _saved_bytes(200)
    assert few > 0
    assert abs(many - few) <= 0.1 * few


# -- registry -----------------------------------------------------------------------------


def test_registry_lists_and_returns_classes() -> None:
    for name in SOLVERS:
        assert issubclass(implicit.get_solver(name), implicit.Solver)
        assert implicit.get_solver(name).name == name
    for name in ADJOINTS:
        assert issubclass(implicit.get_adjoint(name), implicit.AdjointSolver)
    assert {"fixed_point"} <= set(SOLVERS) and {"exact", "jfb", "neumann"} <= set(ADJOINTS)
    assert set(SOLVERS) <= set(ADJOINTS)  # every forward solver serves as an adjoint


def test_instances_classes_and_subclasses_are_accepted() -> None:
    f, z_star = _linear_map(0.5)
    Picard = implicit.get_solver("fixed_point")

    @implicit.register_solver("half_damped_test")
    class HalfDamped(Picard):  # type: ignore[misc, valid-type]
        damping: float = 0.5

    assert "half_damped_test" in implicit.available_solvers()
    assert HalfDamped().damping == 0.5
    for solver in [Picard(damping=0.8), Picard, "half_damped_test", HalfDamped]:
        sol = implicit.solve(implicit.ImplicitProblem.fixed_point(f), torch.zeros(4, dtype=f64), solver=solver,
                             adjoint=implicit.get_adjoint("exact")(), tol=1e-11, max_iter=500)
        assert torch.allclose(sol.z, z_star, atol=1e-9)
    sol = implicit.solve(implicit.ImplicitProblem.fixed_point(f), torch.zeros(4, dtype=f64),
                         solver=Picard(damping=0.8), solver_options={"damping": 0.6}, adjoint="exact")
    assert sol.stats.solver == "fixed_point"
    with pytest.raises(TypeError, match="subclass of implicit.Solver"):
        implicit.register_solver("x")(int)  # type: ignore[arg-type]


def test_forward_solver_as_adjoint_has_both_option_sets() -> None:
    cls = implicit.get_adjoint("fixed_point")
    assert issubclass(cls, implicit.AdjointSolver) and not cls.approximate
    inst = cls(tol=1e-9, damping=0.7, max_iter=50)
    assert re.search("damping", repr(inst))


@pytest.mark.parametrize("host", [True, False], ids=["host check", "tensor check"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_an_empty_batch_is_solved_at_once(solver: str, host: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import implicit._monitor as monitor_module

    if not host:
        monkeypatch.setattr(monitor_module, "HOST_NUMEL", -1)
    w = torch.tensor(0.5, dtype=f64, requires_grad=True)
    z0 = {"a": torch.zeros(0, 3, dtype=f64), "b": torch.zeros(0, 2, 2, dtype=f64)}
    problem = implicit.ImplicitProblem.fixed_point(lambda z: {"a": w * z["a"] + 1, "b": w * z["b"]}, batched=True)
    for adjoint in ADJOINTS:
        sol = implicit.solve(problem, z0, solver=solver, adjoint=adjoint, on_failure="raise")
        assert sol.converged and sol.stats.iterations == 0
        assert sol.stats.converged.shape == (0,) and sol.stats.history.shape == (1, 0)
        assert sol.z["a"].shape == (0, 3) and sol.z["b"].shape == (0, 2, 2)
        (grad,) = torch.autograd.grad(sol.z["a"].sum() + sol.z["b"].sum(), w)
        assert grad.item() == 0.0
