"""What a first-order backward does beyond the adjoint solve: the recomputed inner evaluation, and no second solve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from problems import two_variable_map, two_variable_params, two_variable_z0
from reference import ift_grads, picard, saved_bytes

import implicit
from implicit import _compat
from implicit._saved import evaluate_without_saving

f64 = torch.float64


def _mlp(w: torch.Tensor, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: torch.tanh(torch.tanh(z @ w.T + x) @ w.T)


def test_keeps_nothing_and_matches_the_plain_gradient_and_hessian() -> None:
    g = torch.Generator().manual_seed(0)
    w = (0.3 * torch.randn(6, 6, dtype=f64, generator=g)).requires_grad_()
    x = torch.randn(3, 6, dtype=f64, generator=g)
    z = torch.randn(3, 6, dtype=f64, generator=g)
    f = _mlp(w, x)
    saved, out = saved_bytes(lambda: evaluate_without_saving(f, z))
    assert saved == 0
    ref = f(z)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    c = torch.randn(3, 6, dtype=f64, generator=g)
    (gw,) = torch.autograd.grad((out * c).sum(), w, create_graph=True)
    (gw_ref,) = torch.autograd.grad((ref * c).sum(), w, create_graph=True)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-14, atol=1e-14)
    # A second-order product through the recomputed values.
    (hw,) = torch.autograd.grad((gw * w).sum(), w)
    (hw_ref,) = torch.autograd.grad((gw_ref * w).sum(), w)
    torch.testing.assert_close(hw, hw_ref, rtol=1e-13, atol=1e-13)


def test_a_retained_graph_recomputes_for_every_backward() -> None:
    g = torch.Generator().manual_seed(1)
    w = (0.3 * torch.randn(5, 5, dtype=f64, generator=g)).requires_grad_()
    x = torch.randn(2, 5, dtype=f64, generator=g)
    calls = 0
    inner = _mlp(w, x)

    def f(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return inner(z)

    out = evaluate_without_saving(f, torch.randn(2, 5, dtype=f64, generator=g))
    first = torch.autograd.grad(out.sum(), w, retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), w)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert calls == 3  # the evaluation, then one recomputation per backward pass


def test_a_map_that_changes_between_calls_is_refused() -> None:
    w = torch.randn(4, 4, dtype=f64, requires_grad=True)
    calls = 0

    def f(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        y = torch.tanh(z @ w)
        return torch.tanh(y @ w) if calls > 1 else y  # one more saving op when recomputed

    out = evaluate_without_saving(f, torch.randn(2, 4, dtype=f64))
    with pytest.raises(RuntimeError, match="must run the same operations"):
        out.sum().backward()


def test_solve_under_cpu_autocast_differentiates() -> None:
    params = [p.requires_grad_() for p in two_variable_params()]
    z0 = two_variable_z0()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=True):
        # float64 is outside autocast's casts: the values are the float64 ones.
        z = implicit.fixed_point(
            lambda z: two_variable_map(z, params), z0, batched=True, solver="anderson", adjoint="gmres", tol=1e-12
        )
    loss = (z["x"] ** 2).sum() + z["y"].sum()
    grads = torch.autograd.grad(loss, params)
    z_ref = picard(lambda z: two_variable_map(z, params), z0)
    dl = {"x": 2 * z_ref["x"], "y": torch.ones_like(z_ref["y"])}
    ref = ift_grads(two_variable_map, z_ref, params, dl)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("adjoint", ["neumann", "gmres"])
@pytest.mark.parametrize("seed", [1, 2])
def test_first_order_backward_solves_once(seed: int, adjoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner step's cotangent is the adjoint's residual recomputed: rounding must not start a second solve.

    A slowly contracting float32 map whose Neumann residual sits on the
    tolerance (seeds where the residual, computed again through the graph,
    came out a few ulps above the bound the solver had met).
    """
    from implicit import _ad

    solves = 0
    solve = _ad.Linearisation.solve

    def counting(self: _ad.Linearisation, b: torch.Tensor, transpose: bool) -> torch.Tensor:
        nonlocal solves
        solves += int(transpose)
        return solve(self, b, transpose)

    monkeypatch.setattr(_ad.Linearisation, "solve", counting)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(512, 512, generator=g)
    w = (w + w.T) / 2
    w = (w * (0.95 / torch.linalg.matrix_norm(w, 2))).requires_grad_()
    x = torch.randn(64, 512, generator=g)
    c = torch.randn(64, 512, generator=g)
    z = implicit.fixed_point(
        lambda z: torch.tanh(z @ w + x),
        torch.zeros(64, 512),
        batched=True,
        solver="fixed_point",
        adjoint=adjoint,
        tol=1e-5,
        max_iter=500,
    )
    torch.autograd.grad((z * c).sum(), w)
    assert solves == 1


def _mlp_problem(seed: int = 3) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = (0.4 * torch.randn(6, 6, dtype=f64, generator=g) / 6**0.5).requires_grad_()
    x = torch.randn(5, 6, dtype=f64, generator=g).requires_grad_()
    c = torch.randn(5, 6, dtype=f64, generator=g)
    return [w, x], torch.zeros(5, 6, dtype=f64), c


def _dense_grads(
    f: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor], params: list[torch.Tensor], c: torch.Tensor
) -> list[torch.Tensor]:
    """The IFT gradient of ``Σ c ⊙ z*`` for ``z* = f(z*, params)``, dense, in float64."""
    z_ref = picard(lambda s: {"z": f(s["z"], params)}, {"z": torch.zeros_like(c)})
    return ift_grads(lambda s, p: {"z": f(s["z"], list(p))}, z_ref, params, {"z": c})


def _two_layer(z: torch.Tensor, p: list[torch.Tensor]) -> torch.Tensor:
    w, x = p
    return torch.tanh(torch.tanh(z @ w.T + x) @ w.T)


def _one_layer(z: torch.Tensor, p: list[torch.Tensor]) -> torch.Tensor:
    w, x = p
    return torch.tanh(z @ w.T + x)


def test_the_two_evaluations_share_saved_tensors_and_backward_evaluates_nothing() -> None:
    (w, x), z0, c = _mlp_problem()
    calls = 0

    def f(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.tanh(torch.tanh(z @ w.T + x) @ w.T)

    def solve() -> torch.Tensor:
        return implicit.fixed_point(f, z0, batched=True, solver="anderson", adjoint="neumann", tol=1e-12)

    ref = _dense_grads(_two_layer, [w, x], c)
    z = solve()
    calls = 0
    grads = torch.autograd.grad((z * c).sum(), [w, x])
    # Nothing evaluated again; on PyTorch 2.2, which cannot tell whether the caller has
    # saved-tensor hooks, the first evaluation keeps nothing and is evaluated once again.
    assert calls == (0 if _compat.top_saved_tensors_hooks is not None else 1)
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    # Under hooks of the caller's own, the first evaluation keeps nothing (it is evaluated
    # again in the backward pass) and the hooks see one evaluation's tensors.
    one, _ = saved_bytes(lambda: f(z0.clone().requires_grad_()))
    saved, z = saved_bytes(solve)
    assert saved == one
    calls = 0
    grads = torch.autograd.grad((z * c).sum(), [w, x])
    assert calls == 1
    for got, want in zip(grads, ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_solve_inside_torch_utils_checkpoint(reentrant: bool) -> None:
    (w, x), z0, c = _mlp_problem(9)

    def block(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = implicit.fixed_point(lambda z: torch.tanh(z @ w.T + x), z0, batched=True, tol=1e-12)
        return (z * c).sum()

    loss = torch.utils.checkpoint.checkpoint(block, w, x, use_reentrant=reentrant)
    loss.backward()  # reentrant checkpointing supports backward(), not autograd.grad
    for got, want in zip([w.grad, x.grad], _dense_grads(_one_layer, [w, x], c)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_offloading_hooks_and_a_map_that_changes_between_calls() -> None:
    (w, x), z0, c = _mlp_problem(4)
    calls = 0

    def f(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        h = z @ w.T + x
        # the same values by other operations on every other call: nothing to share
        return torch.tanh(h) if calls % 2 else 2 * torch.sigmoid(2 * h) - 1

    ref = _dense_grads(_one_layer, [w, x], c)
    with torch.autograd.graph.save_on_cpu():
        z = implicit.fixed_point(f, z0, batched=True, solver="fixed_point", adjoint="gmres", tol=1e-12, max_iter=500)
    for got, want in zip(torch.autograd.grad((z * c).sum(), [w, x]), ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_the_attached_graph_is_freed_with_the_solution() -> None:
    import gc
    import weakref

    (w, x), z0, _ = _mlp_problem(5)
    z = implicit.fixed_point(lambda z: torch.tanh(z @ w.T + x), z0, batched=True, tol=1e-10)
    node = z.grad_fn
    while not hasattr(node, "lin"):  # down the views of the solution to the attaching Function
        node = node.next_functions[0][0]
    g1 = weakref.ref(node.lin.g)  # the evaluation whose saved tensors are shared
    del node
    del z
    gc.collect()
    assert g1() is None


def test_a_map_reading_nothing_that_requires_grad_returns_a_plain_solution() -> None:
    w = 0.3 * torch.eye(3, dtype=f64)
    z = implicit.fixed_point(lambda z: torch.tanh(z @ w + 1.0), torch.zeros(3, dtype=f64), tol=1e-12)
    assert not z.requires_grad


def test_gradient_reaches_an_encoder_through_an_input_that_is_not_a_leaf() -> None:
    (w, _), z0, c = _mlp_problem(6)
    w = w.detach()  # the map's only tensor requiring grad is the encoded input
    g = torch.Generator().manual_seed(7)
    enc = torch.randn(6, 3, dtype=f64, generator=g).requires_grad_()
    inp = torch.randn(5, 3, dtype=f64, generator=g)
    x = inp @ enc.T
    z = implicit.fixed_point(lambda z: torch.tanh(z @ w.T + x), z0, batched=True, tol=1e-12)
    (got,) = torch.autograd.grad((z * c).sum(), enc)
    (dx,) = _dense_grads(lambda z, p: torch.tanh(z @ w.T + p[0]), [x.detach()], c)
    torch.testing.assert_close(got, dx.T @ inp, rtol=1e-9, atol=1e-11)


def test_a_map_that_differentiates_inside_itself() -> None:
    """``f(z) = z - α ∇E(z)``, whose own inner graph is saved and read back while the attach records."""
    (w, x), z0, c = _mlp_problem(8)

    def grad_step(z: torch.Tensor, p: list[torch.Tensor]) -> torch.Tensor:
        w, x = p
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_()
            energy = torch.nn.functional.softplus(zz @ w.T + x).sum() + 0.5 * (zz**2).sum()
            (g,) = torch.autograd.grad(energy, zz, create_graph=True)
        return z - 0.5 * g

    z = implicit.fixed_point(lambda z: grad_step(z, [w, x]), z0, batched=True, tol=1e-12)
    grads = torch.autograd.grad((z * c).sum(), [w, x])
    for got, want in zip(grads, _dense_grads(grad_step, [w, x], c)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_an_adjoint_that_stops_short_is_corrected_by_the_inner_step() -> None:
    """The inner Newton step receives the adjoint's true residual: a solve that claimed convergence too early
    (an Arnoldi residual, say, that the basis no longer backs) is followed by a correcting solve."""
    calls: list[int] = []

    @dataclass(frozen=True, kw_only=True)
    class StopsShortOnce(implicit.AdjointSolver):
        def solve(self, op: implicit.LinearOperator, b: torch.Tensor, monitor: Any) -> torch.Tensor:
            calls.append(b.shape[0])
            if len(calls) == 1:
                x = b.clone()  # the first Neumann term alone, reported as converged
            else:
                m = op.dense()
                eye = torch.eye(m.shape[-1], dtype=m.dtype)
                x = torch.linalg.solve(eye - m, b.unsqueeze(-1)).squeeze(-1)
            monitor.check(x, torch.zeros_like(x))
            return x

    params, z0, c = _mlp_problem()
    z = implicit.fixed_point(
        lambda z: _one_layer(z, params),
        z0,
        batched=True,
        solver="fixed_point",
        adjoint=StopsShortOnce,
        tol=1e-12,
        max_iter=500,
    )
    grads = torch.autograd.grad((z * c).sum(), params)
    assert len(calls) == 2
    for got, want in zip(grads, _dense_grads(_one_layer, params, c)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
