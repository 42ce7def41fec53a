"""The convergence monitor: its host path (tiny CPU states) decides exactly as its tensor path."""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator
from types import MappingProxyType

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import implicit
import implicit._monitor as monitor_module
from implicit._monitor import Monitor
from implicit._structure import Structure

f64 = torch.float64


@contextlib.contextmanager
def host_numel(n: int) -> Iterator[None]:
    """Monitors made inside check states of at most ``n`` numbers on the host (0: none)."""
    old = monitor_module.HOST_NUMEL
    monitor_module.HOST_NUMEL = n
    try:
        yield
    finally:
        monitor_module.HOST_NUMEL = old


@pytest.fixture
def tensor_path() -> Iterator[None]:
    """Every state checked by tensor operations, as on a GPU or for large states."""
    with host_numel(0):
        yield


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    size=st.integers(1, 6),
    steps=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    with_reference=st.booleans(),
)
def test_host_and_tensor_paths_decide_alike(batch: int, size: int, steps: int, seed: int, with_reference: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, size, generator=g, dtype=f64)
    reference = z.norm(dim=1) if with_reference else None
    monitors = {}
    for host in (True, False):
        with host_numel(monitor_module.HOST_NUMEL if host else 0):
            monitors[host] = Monitor(Structure(z, True), tol=1e-3, atol=1e-9, max_iter=steps, reference=reference)
        assert monitors[host]._host is host
    # residuals shrinking at random per-sample rates, so samples converge at different checks
    rates = torch.rand(batch, 1, generator=g, dtype=f64)
    r = torch.randn(batch, size, generator=g, dtype=f64)
    for k in range(steps + 1):
        rk = r * rates**k * 10.0 ** (-k)
        g_value = z + rk
        stop = {host: m.check(z, g_value - z) if k % 2 else m.check(z, rk) for host, m in monitors.items()}
        assert stop[True] == stop[False]
        host, dev = monitors[True], monitors[False]
        assert torch.equal(host.active, dev.active) and torch.equal(host.converged, dev.converged)
        torch.testing.assert_close(host.residual, dev.residual, rtol=1e-13, atol=0)
        if stop[True]:
            break
        torch.testing.assert_close(host.freeze(z + 1, z), dev.freeze(z + 1, z), rtol=0, atol=0)
    assert host.iterations == dev.iterations and host.message == dev.message
    a, b = host.stats("s", 1, batched=True), dev.stats("s", 1, batched=True)
    assert a.history.dtype == b.history.dtype == f64
    torch.testing.assert_close(a.history, b.history, rtol=1e-13, atol=0)
    torch.testing.assert_close(a.residual, b.residual, rtol=1e-13, atol=0)
    assert torch.equal(a.converged, b.converged)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("path", ["host", "tensor"])
def test_non_finite_residual_is_named_on_both_paths(bad: float, path: str, request: pytest.FixtureRequest) -> None:
    if path == "tensor":
        request.getfixturevalue("tensor_path")
    z0 = {"x": torch.ones(2, 1, dtype=f64), "y": torch.ones(2, 2, dtype=f64)}
    mon = Monitor(Structure(z0, True), tol=1e-6, atol=0.0, max_iter=10)
    assert mon._host is (path == "host")
    z = torch.ones(2, 3, dtype=f64)
    g = z.clone()
    g[1, 2] = bad  # sample 1, variable y
    assert mon.check(z, g - z)
    assert mon.nonfinite == ["z['y']"] and "non-finite value in z['y']" in mon.message
    assert mon.converged.tolist() == [True, False]  # sample 0 has g = z


def test_a_tiny_solve_takes_the_same_path_either_way() -> None:
    def f(z):
        return {"x": torch.tanh(0.4 * z["x"] - 0.4 * z["y"] + 0.1), "y": torch.tanh(0.4 * z["x"] + 0.4 * z["y"] - 0.2)}

    z0 = {"x": torch.zeros(1, dtype=f64), "y": torch.zeros(1, dtype=f64)}
    problem = implicit.ImplicitProblem.fixed_point(f)
    on_host = implicit.solve(problem, z0, solver="fixed_point", tol=1e-10, max_iter=200)
    with host_numel(0):
        on_tensors = implicit.solve(problem, z0, solver="fixed_point", tol=1e-10, max_iter=200)
    assert on_host.stats.iterations == on_tensors.stats.iterations and on_host.converged
    torch.testing.assert_close(on_host.stats.history, on_tensors.stats.history, rtol=1e-12, atol=0)
    for k in z0:
        torch.testing.assert_close(on_host.z[k], on_tensors.z[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [dict, OrderedDict, MappingProxyType, lambda d: {k: d[k] for k in reversed(list(d))}],
    ids=["dict", "OrderedDict", "MappingProxyType", "keys reordered"],
)
def test_any_mapping_with_the_same_keys_is_accepted(make) -> None:
    z0 = {"x": torch.zeros(3, dtype=f64), "y": torch.zeros(2, dtype=f64)}
    structure = Structure(z0, False)
    out = make({"x": torch.arange(3, dtype=f64), "y": torch.tensor([7.0, 8.0], dtype=f64)})
    flat = structure.flatten_output(out, "the map f")
    assert flat.tolist() == [[0.0, 1.0, 2.0, 7.0, 8.0]]


def test_a_list_where_a_dict_is_expected_is_refused() -> None:
    # int keys would index a list: the container's type is checked first
    structure = Structure({0: torch.zeros(2, dtype=f64), 1: torch.zeros(2, dtype=f64)}, False)
    with pytest.raises(ValueError, match="returned list; expected a dict"):
        structure.flatten_output([torch.zeros(2, dtype=f64), torch.zeros(2, dtype=f64)], "the map f")
    structure = Structure([torch.zeros(2, dtype=f64)], False)
    assert isinstance(structure.unflatten(torch.zeros(1, 2, dtype=f64)), list)
