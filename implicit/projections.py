"""Euclidean projections onto simple convex sets, for constraints handled by projection.

A constrained problem ``min L(z) s.t. z ∈ C`` has its solutions among the
fixed points of projected gradient, ``z = P_C(z − η ∇L(z))`` for any step
``η > 0``; solving that fixed point with :func:`implicit.fixed_point`
differentiates through the constrained solution. Every projection here is
written in differentiable PyTorch operations, so autograd gives its
derivative wherever it is differentiable (everywhere but on a set of measure
zero: the points where a constraint is just becoming active); there the
derivative is the one of the active set, as used by the implicit function
theorem for the projected fixed point.

Every function accepts a tensor, or a dict, tuple or list of tensors, which
it projects variable by variable and returns in the same structure. A
parameter of the set (``lower``, ``upper``, ``total``, ``radius``) may be a
number, a tensor broadcastable to each variable (to ``z.shape[:-1]`` plus a
trailing dim of one for the last-dimension sets), or a dict / tuple holding
one such value per variable, keyed like ``z``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["box", "l2_ball", "nonnegative", "simplex"]

Bound = float | torch.Tensor | None


def _broadcastable(name: str, key: Any, value: torch.Tensor, shape: torch.Size) -> None:
    where = "" if key is None else f"[{key!r}]"
    try:
        out = torch.broadcast_shapes(value.shape, shape)
    except RuntimeError:
        out = None
    if out != shape:
        raise ValueError(
            f"{name}{where} has shape {tuple(value.shape)}, which does not broadcast to the variable's "
            f"shape {tuple(shape)}"
        )


def _per_variable(z: Any, fn: Callable[..., torch.Tensor], **params: Any) -> Any:
    """Apply ``fn(tensor, key, **params_for_that_variable)`` to each variable of ``z``."""
    if isinstance(z, torch.Tensor):
        for name, value in params.items():
            if isinstance(value, (Mapping, tuple, list)):
                raise TypeError(
                    f"{name} is a {type(value).__name__} but z is a single tensor; pass a number or a tensor"
                )
        return fn(z, None, **params)
    if isinstance(z, Mapping):
        keys: list[Any] = list(z.keys())
    elif isinstance(z, (tuple, list)):
        keys = list(range(len(z)))
    else:
        raise TypeError(f"z must be a tensor, a dict of tensors or a tuple/list of tensors; got {type(z).__name__}")
    for name, value in params.items():
        if isinstance(value, Mapping):
            if not isinstance(z, Mapping) or set(value.keys()) != set(keys):
                got = sorted(map(repr, value.keys()))
                raise ValueError(f"{name} is a dict with keys [{', '.join(got)}]; expected the keys of z: {keys!r}")
        elif isinstance(value, (tuple, list)):
            if isinstance(z, Mapping) or len(value) != len(keys):
                raise ValueError(
                    f"{name} is a {type(value).__name__} of {len(value)} values; expected one per variable of z "
                    f"({len(keys)} in a {type(z).__name__})"
                )
    out = []
    for key in keys:
        here = {
            name: value[key] if isinstance(value, (Mapping, tuple, list)) else value for name, value in params.items()
        }
        out.append(fn(z[key], key, **here))
    if isinstance(z, Mapping):
        return dict(zip(keys, out))
    return type(z)(out)


def _check_tensor(z: Any, key: Any) -> None:
    if not isinstance(z, torch.Tensor):
        where = "z" if key is None else f"z[{key!r}]"
        raise TypeError(f"{where} must be a tensor; got {type(z).__name__}")


def _box(z: torch.Tensor, key: Any, lower: Bound, upper: Bound) -> torch.Tensor:
    _check_tensor(z, key)
    if isinstance(lower, numbers.Real) and isinstance(upper, numbers.Real) and float(lower) > float(upper):
        where = "" if key is None else f" for z[{key!r}]"
        raise ValueError(f"lower must not exceed upper{where}; got lower={lower}, upper={upper}")
    for name, bound in (("upper", upper), ("lower", lower)):
        if bound is None:
            continue
        if isinstance(bound, torch.Tensor):
            _broadcastable(name, key, bound, z.shape)
        elif not isinstance(bound, numbers.Real) or isinstance(bound, bool):
            raise TypeError(f"{name} must be a number, a tensor or None; got {type(bound).__name__}")
    if upper is not None:
        z = torch.minimum(z, torch.as_tensor(upper, dtype=z.dtype, device=z.device))
    if lower is not None:
        z = torch.maximum(z, torch.as_tensor(lower, dtype=z.dtype, device=z.device))
    return z


def box(z: Any, lower: Any = None, upper: Any = None) -> Any:
    """Projects ``z`` onto the box ``{x : lower ≤ x ≤ upper}`` (elementwise clipping).

    Args:
        z: A tensor, or a dict / tuple / list of tensors.
        lower: The lower bound: ``None`` (unbounded below), a number, a tensor
            broadcastable to the variable, or a dict / tuple of these keyed
            like ``z``.
        upper: The upper bound, as ``lower``.

    Returns:
        ``min(max(z, lower), upper)`` in the structure of ``z``. Its derivative
        is one where a bound is inactive and zero where it is active (there the
        derivative with respect to the bound is one).

    Raises:
        ValueError: numeric bounds with ``lower > upper``, a bound tensor that
            does not broadcast to its variable, or bound dicts / tuples that do
            not match ``z``'s keys. (Tensor bounds are not compared, which
            would cost a host synchronisation.)

    Examples:
        >>> import torch
        >>> from implicit import projections
        >>> projections.box(torch.tensor([-2.0, 0.5, 3.0]), 0.0, 1.0)
        tensor([0.0000, 0.5000, 1.0000])
        >>> projections.box({"a": torch.tensor([2.0]), "b": torch.tensor([2.0])}, upper={"a": 1.0, "b": 3.0})
        {'a': tensor([1.]), 'b': tensor([2.])}
    """
    return _per_variable(z, _box, lower=lower, upper=upper)


def nonnegative(z: Any) -> Any:
    """Projects ``z`` onto the nonnegative orthant, ``max(z, 0)``.

    Args:
        z: A tensor, or a dict / tuple / list of tensors.

    Returns:
        ``max(z, 0)`` elementwise, in the structure of ``z``.

    Examples:
        >>> import torch
        >>> from implicit import projections
        >>> projections.nonnegative((torch.tensor([-1.0, 2.0]),))
        (tensor([0., 2.]),)
    """
    return _per_variable(z, _box, lower=0.0, upper=None)


def _positive(name: str, key: Any, value: Any, z: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        _broadcastable(name, key, value, z.shape[:-1] + (1,))
        return value.to(dtype=z.dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) > 0:
        where = "" if key is None else f" for z[{key!r}]"
        raise ValueError(f"{name} must be a positive number or a tensor{where}; got {value!r}")
    return torch.as_tensor(float(value), dtype=z.dtype, device=z.device)


def _last_dim(z: Any, key: Any, name: str) -> None:
    _check_tensor(z, key)
    if z.dim() == 0 or z.shape[-1] == 0:
        where = "z" if key is None else f"z[{key!r}]"
        raise ValueError(f"{name} projects over the last dimension; {where} has shape {tuple(z.shape)}")


def _simplex(z: torch.Tensor, key: Any, total: Any) -> torch.Tensor:
    _last_dim(z, key, "simplex")
    s = _positive("total", key, total, z)
    n = z.shape[-1]
    u = torch.sort(z, dim=-1, descending=True).values
    css = torch.cumsum(u, dim=-1) - s
    k = torch.arange(1, n + 1, dtype=z.dtype, device=z.device)
    # u_k - (Σ_{j≤k} u_j - s)/k > 0 holds for k = 1..ρ and fails after (the
    # condition is monotone in k), so ρ is the count of k where it holds.
    rho = (u * k > css).sum(dim=-1, keepdim=True).clamp(min=1)
    tau = torch.gather(css, -1, rho - 1) / rho.to(z.dtype)
    return torch.clamp(z - tau, min=0)


def simplex(z: Any, total: Any = 1.0) -> Any:
    """Projects ``z`` onto the simplex ``{x ≥ 0, Σ x = total}`` over the last dimension.

    The projection is ``x = max(z − τ, 0)`` with the threshold ``τ`` for which
    ``Σ x = total``: the sort-based algorithm sorts ``z`` in decreasing
    order ``u``, takes the largest ``ρ`` with ``u_ρ > (Σ_{j≤ρ} u_j − total)/ρ``
    and sets ``τ = (Σ_{j≤ρ} u_j − total)/ρ`` (``O(n log n)``). Autograd
    through it gives the derivative of the active set: on the support
    ``S = {x > 0}``, ``∂x_S/∂z_S = I − 11ᵀ/|S|``, zero elsewhere.

    Args:
        z: A tensor of shape ``(..., n)``, or a dict / tuple / list of them.
        total: The sum ``> 0`` of each projected vector: a number, a tensor
            broadcastable to ``z.shape[:-1] + (1,)`` (not checked for
            positivity, which would cost a host synchronisation), or a dict /
            tuple of these keyed like ``z``.

    Returns:
        The projection, in the structure and shapes of ``z``.

    Raises:
        ValueError: ``total`` is not a positive number or a broadcastable
            tensor, or a variable has no last dimension.

    Examples:
        >>> import torch
        >>> from implicit import projections
        >>> projections.simplex(torch.tensor([0.5, 1.0, -1.0]))
        tensor([0.2500, 0.7500, 0.0000])
        >>> projections.simplex(torch.tensor([[3.0, 1.0], [1.0, 1.0]]), total=2.0)
        tensor([[2., 0.],
                [1., 1.]])

    References:
        M. Held, P. Wolfe and H. P. Crowder, "Validation of subgradient
        optimization", Math. Programming 6, 1974. J. Duchi, S. Shalev-Shwartz,
        Y. Singer and T. Chandra, "Efficient projections onto the l1-ball for
        learning in high dimensions", ICML 2008.
    """
    return _per_variable(z, _simplex, total=total)


def _l2_ball(z: torch.Tensor, key: Any, radius: Any) -> torch.Tensor:
    _last_dim(z, key, "l2_ball")
    r = _positive("radius", key, radius, z)
    norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    # Inside the ball the clamp makes the scale exactly one, with zero derivative
    # (also at z = 0, where the norm itself has none).
    return z * (r / torch.maximum(norm, r))


def l2_ball(z: Any, radius: Any = 1.0) -> Any:
    """Projects ``z`` onto the Euclidean ball ``{x : ‖x‖ ≤ radius}`` over the last dimension.

    ``x = z · radius / max(‖z‖, radius)``: unchanged inside the ball, scaled
    onto the sphere outside.

    Args:
        z: A tensor of shape ``(..., n)``, or a dict / tuple / list of them.
        radius: The radius ``> 0``: a number, a tensor broadcastable to
            ``z.shape[:-1] + (1,)`` (not checked for positivity), or a dict /
            tuple of these keyed like ``z``.

    Returns:
        The projection, in the structure and shapes of ``z``.

    Raises:
        ValueError: ``radius`` is not a positive number or a broadcastable
            tensor, or a variable has no last dimension.

    Examples:
        >>> import torch
        >>> from implicit import projections
        >>> projections.l2_ball(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
        tensor([[0.6000, 0.8000],
                [0.3000, 0.4000]])
    """
    return _per_variable(z, _l2_ball, radius=radius)
