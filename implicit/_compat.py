"""The PyTorch internals implicit relies on, each behind one name, from PyTorch 2.2 to the newest.

PyTorch has no public way to ask which ``torch.func`` transforms are active,
to look beneath a transform's wrapper, or whether forward-mode AD is on; a
solve needs all three (see ``_transforms`` and ``_ad``). Every use of a
private name goes through this module, with the fallback for the versions
that lack it, and ``tests/test_compat.py`` checks each against the public
behaviour it stands for, so a PyTorch release that changes one fails there,
loudly, rather than somewhere in a solve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch._functorch.autograd_function import custom_function_call
from torch._functorch.utils import unwrap_dead_wrappers

__all__ = [
    "any_autocast_enabled",
    "custom_function_call",
    "engine_run_backward",
    "forward_ad_active",
    "forward_grad_disabled",
    "functorch_disabled",
    "is_batched",
    "is_dead_wrapper",
    "is_wrapped",
    "jvp_transform_active",
    "saved_tensors_hooks_enabled",
    "tolist",
    "top_saved_tensors_hooks",
    "transform_level",
    "transforms_active",
    "unwrap_dead_wrappers",
    "unwrap_if_dead",
    "unwrapped",
    "wrapped_level",
]

_functorch = torch._C._functorch

try:  # the engine entry of torch.autograd.grad (PyTorch >= 2.3); None before
    from torch.autograd.graph import _engine_run_backward as engine_run_backward
except ImportError:  # pragma: no cover - PyTorch 2.2
    engine_run_backward = None  # type: ignore[assignment]

# The innermost saved-tensor hooks installed by the caller (PyTorch >= 2.3); None before.
top_saved_tensors_hooks: Callable[[bool], Any] | None = getattr(
    torch._C._autograd, "_top_saved_tensors_default_hooks", None
)


def transforms_active() -> bool:
    """Whether any ``torch.func`` transform (grad, vjp, jvp, vmap, ...) is active here."""
    return bool(torch._C._are_functorch_transforms_active())


def transform_level() -> int | None:
    """The level of the innermost active ``torch.func`` transform, or ``None`` outside them."""
    top = _functorch.peek_interpreter_stack()
    return None if top is None else int(top.level())


def _interpreter_keys() -> list[Any]:
    """The transform types of the active ``torch.func`` transforms, innermost last."""
    stack = getattr(_functorch, "get_interpreter_stack", None)
    if stack is not None:
        return [interpreter.key() for interpreter in stack() or []]
    # PyTorch 2.2: no accessor for the whole stack; peek at the top and set it aside in turn.
    from torch._functorch.pyfunctorch import temporarily_pop_interpreter_stack

    keys = []
    with contextlib.ExitStack() as popped:
        while (top := _functorch.peek_interpreter_stack()) is not None:
            keys.append(top.key())
            popped.enter_context(temporarily_pop_interpreter_stack())
    return keys[::-1]


def jvp_transform_active() -> bool:
    """Whether a ``torch.func.jvp`` (or ``jacfwd``) transform is active at any level."""
    return transforms_active() and _functorch.TransformType.Jvp in _interpreter_keys()


def forward_ad_active() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open."""
    return int(fwAD._current_level) >= 0


def forward_grad_disabled() -> contextlib.AbstractContextManager[object]:
    """Forward-mode AD off: new operations propagate no tangents."""
    return fwAD._set_fwd_grad_enabled(False)  # type: ignore[no-any-return]


def functorch_disabled() -> contextlib.AbstractContextManager[object]:
    """All ``torch.func`` transforms off, to read the plain values beneath their wrappers."""
    return torch._C._DisableFuncTorch()  # type: ignore[no-any-return]


def is_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapper (gradient tracking, a dual, a vmap batch)."""
    return bool(_functorch.is_functorch_wrapped_tensor(t))


def is_batched(t: torch.Tensor) -> bool:
    """Whether the wrapper ``t`` carries a ``vmap`` batch dimension."""
    return bool(_functorch.is_batchedtensor(t))


def wrapped_level(t: torch.Tensor) -> int:
    """The transform level of the wrapper ``t`` (``-2`` once that transform has exited)."""
    return int(_functorch.maybe_get_level(t))


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The tensor beneath the wrapper ``t``, one level down."""
    return _functorch.get_unwrapped(t)  # type: ignore[no-any-return]


def is_dead_wrapper(t: torch.Tensor) -> bool:
    """Whether ``t`` wraps at a transform level that has exited."""
    return bool(_functorch.is_dead_tensor_wrapper(t))  # type: ignore[attr-defined]


def unwrap_if_dead(t: torch.Tensor) -> torch.Tensor:
    """``t`` less one wrapper of an exited level."""
    return _functorch.unwrap_if_dead(t)  # type: ignore[no-any-return]


def saved_tensors_hooks_enabled() -> bool:
    """Whether saved-tensor hooks may be installed here (``torch.func.grad`` and ``vjp`` forbid them)."""
    return bool(torch._C._autograd._saved_tensors_hooks_is_enabled())  # type: ignore[attr-defined]


def any_autocast_enabled() -> bool:
    """Whether autocast is on for any device type (``True`` where that cannot be read)."""
    is_any = getattr(torch._C, "_is_any_autocast_enabled", None)
    return True if is_any is None else bool(is_any())


def tolist(t: torch.Tensor) -> Any:
    """``t.tolist()``, also of a ``torch.func`` wrapper (PyTorch 2.2 reads no values through one)."""
    if not transforms_active():
        return t.tolist()
    while is_wrapped(t) and not is_batched(t):
        t = unwrapped(t)
    with functorch_disabled():
        return t.tolist()
