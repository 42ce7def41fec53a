"""Stabilisers of equilibrium models: the Jacobian of the map at its fixed point.

A fixed-point map ``f`` whose Jacobian ``J = ∂f/∂z`` at ``z*`` has a small
spectral radius is cheap to solve (forward and adjoint iterations converge at
about that rate) and stays solvable as training moves its parameters.
:func:`jacobian_regularization` gives a differentiable penalty that keeps
``‖J‖_F`` (an upper bound on the spectral radius) small;
:func:`spectral_radius` measures the radius itself, as a diagnostic.

Both see ``f`` only through vector-Jacobian products of one evaluation of
``f``, and both take the state in the user's structure (dict, tuple/list or
tensor). When ``batched``, ``J`` is block-diagonal over samples and every
quantity is per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._problem import ImplicitProblem
from .._settings import integer
from .._structure import Structure

__all__ = ["jacobian_regularization", "spectral_radius"]

_PROBES = ("rademacher", "gaussian")


def _linearise(f: Callable[[Any], Any], z: Any, batched: bool) -> tuple[Structure, torch.Tensor, torch.Tensor]:
    """``(structure, z_flat, f(z)_flat)`` with ``z_flat`` a fresh leaf requiring grad.

    ``f`` is evaluated as a solve evaluates it (:meth:`System.call`: validated,
    under the caller's autocast with its output back in the state's dtype).
    """
    system = ImplicitProblem.fixed_point(f, batched=batched).bind(z)
    z_flat = system.structure.flatten(z).detach().requires_grad_()
    with torch.enable_grad():
        g = system.call(z_flat)
    return system.structure, z_flat, g


def _vjp(g: torch.Tensor, z: torch.Tensor, v: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``Jᵀ v``; zero when ``f`` does not read ``z``."""
    if not g.requires_grad:
        return torch.zeros_like(z)
    with torch.enable_grad():
        (out,) = torch.autograd.grad(g, z, v, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(z) if out is None else out


def jacobian_regularization(
    f: Callable[[Any], Any],
    z: Any,
    *,
    batched: bool = True,
    num_samples: int = 1,
    probe: str = "rademacher",
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A Hutchinson estimate of ``‖∂f/∂z‖_F²`` at ``z`` (the fixed point ``z* = f(z*)``).

    With ``J = ∂f/∂z`` at ``z`` and probes ``v`` of zero mean and identity
    covariance, ``E‖Jᵀv‖² = tr(J Jᵀ) = ‖J‖_F²``; the estimate is the mean of
    ``‖Jᵀvₖ‖²`` over ``num_samples`` probes. Adding it (times a weight) to a
    training loss keeps the equilibrium map contractive, which bounds the
    number of forward and adjoint iterations.

    The state is taken as a constant (``z`` is detached): the estimate is
    differentiable with respect to the parameters and inputs ``f`` reads, as
    in Bai et al.; the dependence of ``z*`` itself on them is not followed.

    Cost: one evaluation of ``f`` with its graph, then one vector-Jacobian
    product per probe (``num_samples`` backward passes through ``f``), each
    recorded with ``create_graph=True`` so that the penalty's own backward
    costs about as much again. Memory: the activations of one evaluation of ``f``.

    Args:
        f: The fixed-point map; receives and returns the structure of ``z``.
            Bind the layer's input first, e.g. ``lambda z: cell(z, x)``, or use
            :meth:`implicit.nn.DEQ.jacobian_regularization`.
        z: The state at which to evaluate ``J``, usually the solution.
        batched: Whether dim 0 of every variable indexes samples; then ``J``
            is block-diagonal and the estimate is per sample.
        num_samples: The number of probe vectors (at least 1).
        probe: ``"rademacher"`` (entries ±1: Hutchinson's choice, the lower
            variance) or ``"gaussian"`` (standard normal entries).
        create_graph: Record the products for differentiation (``False``
            gives a cheaper, non-differentiable monitor).
        generator: The random generator for the probes (``None``: the global one).

    Returns:
        The estimate, shape ``(B,)`` when batched and 0-dim otherwise. Divide by
        the number of unknowns per sample for the per-entry mean used by Bai et al.

    Raises:
        ValueError: ``num_samples`` or ``probe`` is invalid, or ``f`` returned
            another structure than ``z``.

    Examples:
        For a diagonal Jacobian ``J = diag(w)`` every Rademacher probe gives
        ``‖Jᵀv‖² = Σ wᵢ²`` exactly, so the estimate is exact here:

        >>> import torch, implicit
        >>> w = torch.tensor([0.5, 0.2, 0.1], dtype=torch.float64, requires_grad=True)
        >>> z = torch.zeros(2, 3, dtype=torch.float64)  # a batch of two states
        >>> penalty = implicit.nn.jacobian_regularization(lambda z: w * z + 1.0, z)
        >>> [round(p, 8) for p in penalty.tolist()]
        [0.3, 0.3]
        >>> penalty.sum().backward()  # d/dw of 2 Σ wᵢ² is 4 w
        >>> [round(g, 8) for g in w.grad.tolist()]
        [2.0, 0.8, 0.4]

    Reference:
        Hutchinson, "A stochastic estimator of the trace of the influence
        matrix for Laplacian smoothing splines", 1990; Bai, Koltun & Kolter,
        "Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021.
    """
    num_samples = integer("num_samples", num_samples)
    if probe not in _PROBES:
        raise ValueError(f"probe must be one of {', '.join(map(repr, _PROBES))}; got {probe!r}")
    structure, z_flat, g = _linearise(f, z, batched)
    total = z_flat.new_zeros(structure.batch)
    for _ in range(num_samples):
        if probe == "gaussian":
            v = torch.randn(g.shape, generator=generator, dtype=g.dtype, device=g.device)
        else:
            v = torch.randint(0, 2, g.shape, generator=generator, device=g.device).to(g.dtype).mul_(2).sub_(1)
        jtv = _vjp(g, z_flat, v, create_graph)
        total = total + jtv.pow(2).sum(dim=1)
    estimate = total / num_samples
    if not create_graph:
        estimate = estimate.detach()
    return estimate if batched else estimate[0]


def spectral_radius(
    f: Callable[[Any], Any],
    z: Any,
    *,
    batched: bool = True,
    max_iter: int = 50,
    tol: float = 1e-4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The spectral radius of ``∂f/∂z`` at ``z``, estimated by power iteration.

    Iterates ``v ← Jᵀv / ‖Jᵀv‖`` from a random unit vector (``Jᵀ`` has the
    eigenvalues of ``J``, and its products are vector-Jacobian products of one
    evaluation of ``f``) and returns ``‖Jᵀv‖``, stopping when it changes by
    less than ``tol`` (relative) for every sample or after ``max_iter``
    products. Below 1 the fixed point is attracting and plain iteration
    converges at about this rate.

    Power iteration converges at the rate ``|λ₂/λ₁|`` of the two largest
    eigenvalue moduli. When the dominant eigenvalues are a complex pair, or
    ``J`` is far from normal, ``‖Jᵀv‖`` oscillates around the radius instead
    of settling, and the value returned is that of the last iterate; treat it
    as a diagnostic rather than a bound. The result carries no gradient.

    Args:
        f: The fixed-point map; receives and returns the structure of ``z``.
        z: The state at which to evaluate ``J``, usually the solution.
        batched: Whether dim 0 of every variable indexes samples (one radius per sample).
        max_iter: The most vector-Jacobian products (at least 1).
        tol: Relative change of the estimate at which to stop.
        generator: The random generator of the starting vector.

    Returns:
        The estimate, shape ``(B,)`` when batched and 0-dim otherwise.

    Raises:
        ValueError: ``max_iter`` or ``tol`` is invalid, or ``f`` returned
            another structure than ``z``.

    Examples:
        The map ``z ↦ w ⊙ z + 1`` has ``J = diag(w)``, whose spectral radius
        is ``max |wᵢ|``:

        >>> import torch, implicit
        >>> w = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
        >>> z = torch.zeros(2, 3, dtype=torch.float64)  # a batch of two states
        >>> rho = implicit.nn.spectral_radius(lambda z: w * z + 1.0, z, tol=1e-12, max_iter=100, generator=torch.Generator().manual_seed(0))
        >>> [round(r, 6) for r in rho.tolist()]
        [0.5, 0.5]

    Reference:
        von Mises & Pollaczek-Geiringer, "Praktische Verfahren der
        Gleichungsauflösung", 1929 (the power method).
    """
    max_iter = integer("max_iter", max_iter)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a non-negative number; got {tol!r}")
    _, z_flat, g = _linearise(f, z, batched)
    v = torch.randn(g.shape, generator=generator, dtype=g.dtype, device=g.device)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    rho = None
    for _ in range(max_iter):
        w = _vjp(g, z_flat, v, create_graph=False).detach()
        new = torch.linalg.vector_norm(w, dim=1)
        # A sample whose product vanished has radius 0 (to this iteration);
        # keep its vector rather than divide by zero.
        v = torch.where(new[:, None] > 0, w / new.clamp_min(torch.finfo(new.dtype).tiny)[:, None], v)
        done = rho is not None and bool((torch.abs(new - rho) <= tol * new).all())
        rho = new
        if done:
            break
    assert rho is not None
    return rho if batched else rho[0]
