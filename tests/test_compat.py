"""Each PyTorch internal behind implicit._compat does, on the installed PyTorch, what its name says."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from implicit import _compat
from implicit._transforms import plain


def test_transform_predicates_outside_and_inside_each_transform() -> None:
    assert not _compat.transforms_active()
    assert _compat.transform_level() is None
    assert not _compat.jvp_transform_active()
    seen: dict[str, object] = {}

    def probe(name: str):
        def fn(x: torch.Tensor) -> torch.Tensor:
            seen[name] = (
                _compat.transforms_active(),
                _compat.transform_level(),
                _compat.jvp_transform_active(),
                _compat.is_wrapped(x),
                _compat.is_batched(x),
            )
            return x.sin().sum() if name != "vmap" else x.sin()

        return fn

    x = torch.ones(3)
    torch.func.grad(probe("grad"))(x)
    torch.func.jvp(probe("jvp"), (x,), (x,))
    torch.func.vmap(probe("vmap"))(x)
    assert seen["grad"] == (True, 1, False, True, False)
    assert seen["jvp"] == (True, 1, True, True, False)
    assert seen["vmap"] == (True, 1, False, True, True)


def test_jvp_is_found_below_another_transform() -> None:
    found: list[bool] = []

    def inner(x: torch.Tensor) -> torch.Tensor:
        found.append(_compat.jvp_transform_active())
        assert _compat.transform_level() == 2
        return x.sin().sum()

    x = torch.ones(2)
    torch.func.jvp(torch.func.grad(inner), (x,), (x,))  # jvp at level 1, grad at level 2
    torch.func.grad(torch.func.grad(inner))(torch.tensor(1.0))
    assert found == [True, False]
    assert not _compat.transforms_active()  # the stack is whole again after the walk


def test_wrappers_unwrap_to_the_plain_tensor_and_die_with_their_level() -> None:
    kept: list[torch.Tensor] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        assert _compat.wrapped_level(x) == 1
        plain = _compat.unwrapped(x)
        assert not _compat.is_wrapped(plain) and torch.equal(plain, torch.ones(2))
        assert not _compat.is_dead_wrapper(x)
        kept.append(x)
        return x.sum()

    torch.func.grad(fn)(torch.ones(2))
    (escaped,) = kept
    assert _compat.is_dead_wrapper(escaped) and _compat.wrapped_level(escaped) == -2
    assert not _compat.is_wrapped(_compat.unwrap_if_dead(escaped))
    (unwrapped,) = _compat.unwrap_dead_wrappers((escaped,))
    assert not _compat.is_wrapped(unwrapped)


def test_functorch_disabled_reads_the_values_beneath() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        with _compat.functorch_disabled():
            values = plain(x.detach()).to(dtype=torch.float64, copy=True).numpy()
        assert values.tolist() == [1.0, 2.0]
        return x.sum()

    torch.func.grad(fn)(torch.tensor([1.0, 2.0]))


def test_forward_ad_predicates() -> None:
    assert not _compat.forward_ad_active()
    x = torch.tensor([1.0, 2.0])
    with fwAD.dual_level():
        assert _compat.forward_ad_active()
        dual = fwAD.make_dual(x, torch.ones(2))
        with _compat.forward_grad_disabled():
            assert fwAD.unpack_dual(dual * 2).tangent is None
        assert torch.equal(fwAD.unpack_dual(dual * 2).tangent, 2 * torch.ones(2))
    assert not _compat.forward_ad_active()


def test_saved_tensor_hook_probes() -> None:
    assert _compat.saved_tensors_hooks_enabled()
    if _compat.top_saved_tensors_hooks is not None:
        assert _compat.top_saved_tensors_hooks(False) is None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            assert _compat.top_saved_tensors_hooks(False) is not None
    inside: list[bool] = []
    torch.func.grad(lambda x: (inside.append(_compat.saved_tensors_hooks_enabled()), x.sum())[1])(torch.ones(2))
    assert inside == [False]


def test_engine_run_backward_matches_autograd_grad() -> None:
    z = torch.tensor([0.5, -1.0], requires_grad=True)
    g = z.sin() * z
    v = torch.tensor([1.0, 2.0])
    (expected,) = torch.autograd.grad(g, z, v, retain_graph=True)
    if _compat.engine_run_backward is not None:
        (got,) = _compat.engine_run_backward((g,), (v,), True, False, (z,), False, accumulate_grad=False)
        assert torch.allclose(got, expected)


def test_custom_function_call_runs_a_function_under_a_transform() -> None:
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return 2 * x

        @staticmethod
        def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def]
            pass

        @staticmethod
        def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
            return 2 * g

    grad = torch.func.grad(lambda x: _compat.custom_function_call(Double, x).sum())(torch.ones(3))
    assert torch.equal(grad, 2 * torch.ones(3))


def test_any_autocast_enabled() -> None:
    assert not _compat.any_autocast_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _compat.any_autocast_enabled()
