"""implicit.check: what it finds, against dense float64 references; it reports and never raises."""

from __future__ import annotations

import math

import pytest
import torch

import implicit

F64 = torch.float64


def dense_radius(G, z: torch.Tensor) -> torch.Tensor:
    """``max |λ(∂G/∂z)|`` per sample of a batched map, from its dense Jacobian and ``eigvals``."""
    radii = []
    for b in range(z.shape[0]):
        def row(v, b=b):
            zz = z.clone()
            zz[b] = v
            return G(zz)[b]

        jac = torch.autograd.functional.jacobian(row, z[b].clone())
        radii.append(torch.linalg.eigvals(jac).abs().max())
    return torch.stack(radii)


def two_variable_map(W: torch.Tensor, U: torch.Tensor):
    def f(z):
        h = torch.cat([z["x"], z["y"]], dim=1)
        return {"x": torch.tanh(h @ W.T), "y": 0.5 * torch.sin(h @ U.T)}

    return f


def test_good_problem_radius_matches_dense_eigenvalues():
    gen = torch.Generator().manual_seed(1)
    W = 0.4 * torch.randn(3, 7, dtype=F64, generator=gen)
    U = 0.4 * torch.randn(4, 7, dtype=F64, generator=gen)
    f = two_variable_map(W, U)
    z0 = {"x": torch.randn(5, 3, dtype=F64, generator=gen), "y": torch.randn(5, 4, dtype=F64, generator=gen)}
    report = implicit.check(implicit.ImplicitProblem.fixed_point(f, batched=True), z0)
    assert report.ok, str(report)
    assert all(finding.passed for finding in report.findings), str(report)

    def G(flat):
        out = f({"x": flat[:, :3], "y": flat[:, 3:]})
        return torch.cat([out["x"], out["y"]], dim=1)

    expected = dense_radius(G, torch.cat([z0["x"], z0["y"]], dim=1))
    assert report.spectral_radius.shape == (5,)
    torch.testing.assert_close(report.spectral_radius, expected, rtol=1e-8, atol=1e-10)
    rho = float(expected.max())
    assert report.finding("plain iteration").figures["iterations_per_decade"][int(expected.argmax())] == pytest.approx(
        1 / -math.log10(rho)
    )
    assert "ok" in str(report) and "plain iteration converges" in str(report)


def test_radius_of_a_large_state_from_fewer_products_than_unknowns():
    # 60 unknowns, 24 products: the dominant eigenvalue 0.9 (the rest within 0.4) is found.
    gen = torch.Generator().manual_seed(2)
    n = 60
    S = torch.eye(n, dtype=F64) + 0.1 * torch.randn(n, n, dtype=F64, generator=gen)
    lam = torch.cat([torch.tensor([0.9], dtype=F64), 0.8 * torch.rand(n - 1, dtype=F64, generator=gen) - 0.4])
    A = S @ torch.diag(lam) @ torch.linalg.inv(S)
    c = torch.randn(n, dtype=F64, generator=gen)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: A @ z + c)
    report = implicit.check(problem, torch.zeros(n, dtype=F64), generator=torch.Generator().manual_seed(0))
    expected = torch.linalg.eigvals(A).abs().max()
    assert report.spectral_radius.shape == ()
    assert abs(float(report.spectral_radius) - float(expected)) < 1e-6
    assert report.ok


def test_root_problem_uses_z_minus_F():
    # F(z) = z³ - 8 at z = 1: G(z) = z - F(z) has G' = 1 - 3z² = -2.
    report = implicit.check(implicit.ImplicitProblem(lambda z: z**3 - 8.0), torch.tensor(1.0, dtype=F64))
    assert float(report.spectral_radius) == pytest.approx(2.0)
    plain = report.finding("plain iteration")
    assert not plain.passed and not plain.critical
    assert "will not converge" in plain.message
    assert report.ok  # other solvers may still solve it: advice, not an error


def test_diverging_fixed_point_map_reported():
    A = torch.tensor([[1.5, 0.3], [0.0, 0.2]], dtype=F64)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: z @ A.T + 1.0, batched=True)
    report = implicit.check(problem, torch.zeros(3, 2, dtype=F64))
    torch.testing.assert_close(report.spectral_radius, torch.full((3,), 1.5, dtype=F64))
    plain = report.finding("plain iteration")
    assert not plain.passed
    assert "will not converge" in plain.message and "1.5" in plain.message
    assert "[note] plain iteration" in str(report)


def test_map_mixing_samples_is_found():
    gen = torch.Generator().manual_seed(3)
    W = 0.3 * torch.randn(6, 6, dtype=F64, generator=gen)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * torch.tanh(z @ W.T + z.mean(0)), batched=True)
    report = implicit.check(problem, torch.randn(4, 6, dtype=F64, generator=gen))
    assert not report.ok
    found = report.finding("batch independence")
    assert not found.passed and found.critical
    assert "mixes samples" in found.message
    # the same map per sample is independent
    fine = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * torch.tanh(z @ W.T), batched=True)
    assert implicit.check(fine, torch.randn(4, 6, dtype=F64, generator=gen)).ok


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (lambda z: {"x": z["x"]}, "keys"),
        (lambda z: {"x": z["x"], "y": z["y"][:, :2]}, "z['y'] with shape (4, 2); expected (4, 3)"),
        (lambda z: {"x": z["x"], "y": z["y"].float()}, "z['y'] with dtype torch.float32; expected torch.float64"),
        (lambda z: [z["x"], z["y"]], "returned list; expected a dict"),
    ],
)
def test_wrong_outputs_reported_not_raised(fn, expected):
    z0 = {"x": torch.zeros(4, 2, dtype=F64), "y": torch.zeros(4, 3, dtype=F64)}
    report = implicit.check(implicit.ImplicitProblem.fixed_point(fn, batched=True), z0)
    assert not report.ok
    output = report.finding("output")
    assert not output.passed and expected in output.message, output.message
    assert report.spectral_radius is None


def test_bad_states_reported_not_raised():
    problem = implicit.ImplicitProblem.fixed_point(lambda z: z, batched=True)
    for z0, expected in [
        ({"x": torch.zeros(4, 2, dtype=F64), "y": torch.zeros(3, 2, dtype=F64)}, "batch size 3; expected 4"),
        ({"x": torch.zeros(4, 2, dtype=F64), "y": torch.zeros(4, 2)}, "dtype torch.float32; expected torch.float64"),
        ("not a state", "z0 must be a tensor"),
        (torch.zeros(3, 2, device="meta"), "meta device"),
    ]:
        report = implicit.check(problem, z0)
        assert not report.ok
        assert expected in report.finding("state").message


def test_non_finite_values_named():
    def f(z):
        return {"x": 0.5 * z["x"], "y": torch.log(z["y"] - 1.0)}  # NaN where y < 1

    z0 = {"x": torch.ones(3, dtype=F64), "y": torch.tensor([2.0, 0.0], dtype=F64)}
    report = implicit.check(implicit.ImplicitProblem.fixed_point(f), z0)
    assert not report.ok
    found = report.finding("values of f(z0)")
    assert not found.passed and "z['y']" in found.message and "z['x']" not in found.message
    assert report.finding("values of z0").passed
    bad_start = {"x": torch.tensor([1.0, math.nan, 0.0], dtype=F64), "y": torch.full((2,), 3.0, dtype=F64)}
    found = implicit.check(implicit.ImplicitProblem.fixed_point(f), bad_start).finding("values of z0")
    assert not found.passed and "z['x']" in found.message


def test_a_function_that_raises_is_reported():
    def f(z):
        raise RuntimeError("boom")

    report = implicit.check(implicit.ImplicitProblem.fixed_point(f), torch.zeros(2))
    assert not report.ok and "boom" in report.finding("output").message


def test_not_a_problem_is_a_type_error():
    with pytest.raises(TypeError, match="ImplicitProblem"):
        implicit.check(lambda z: z, torch.zeros(2))  # type: ignore[arg-type]


def test_check_under_inference_mode_and_no_grad():
    A = torch.tensor([[0.5, 0.2], [0.0, 0.25]], dtype=F64)
    problem = implicit.ImplicitProblem.fixed_point(lambda z: A @ z + 1.0)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            report = implicit.check(problem, torch.zeros(2, dtype=F64))
        assert report.ok, str(report)
        assert float(report.spectral_radius) == pytest.approx(0.5, abs=1e-12)
