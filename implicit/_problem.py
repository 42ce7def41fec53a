"""Implicit problems: a residual ``F(z) = 0``, a fixed point ``z = f(z)``, or a minimum (``_optimisation``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from ._optimisation import (
    LeastSquaresObjective,
    ObjectiveGradient,
    check_value,
    flatten_residuals,
    leaf,
    plain_autograd,
    recording,
)
from ._structure import Structure

__all__ = ["FORMS", "ImplicitProblem", "System"]

FORMS = ("root", "fixed_point", "argmin", "least_squares")
"""The forms of :attr:`ImplicitProblem.form`."""

# The solver and adjoint used when none is named, per form (None: solve()'s own defaults).
_DEFAULTS: dict[str, tuple[str | None, str | None]] = {
    "root": (None, None),
    "fixed_point": (None, None),
    "argmin": ("lbfgs", "cg"),
    "least_squares": ("levenberg_marquardt", "cg"),
}


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of the caller's ``torch.autocast`` for ``device_type``, or ``None`` where it is off."""
    try:
        on = torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # PyTorch < 2.4: one function per device type
        if device_type == "cpu":
            on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        elif device_type == "cuda":
            on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
        else:
            return None
    return dtype if on else None


class ImplicitProblem:
    """The equation ``F(z*) = 0`` over a state ``z`` (dict, tuple/list or tensor).

    ``F`` receives a state with the structure of ``z0`` and returns one with the
    same keys, shapes, dtype and device. It may close over parameters and
    inputs; gradients of the solution reach all of them.

    Args:
        fn: The residual ``F`` (root form).
        batched: If ``True``, dim 0 of every variable indexes independent
            systems: sample ``i`` of ``F(z)`` depends on sample ``i`` of ``z``
            only. Convergence is then tracked per sample.

    Examples:
        >>> import torch, implicit
        >>> problem = implicit.ImplicitProblem(lambda z: z**3 - 8.0)
        >>> implicit.solve(problem, torch.tensor(1.0), solver="newton_krylov").z
        tensor(2.)
    """

    def __init__(self, fn: Callable[[Any], Any], *, batched: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"the residual must be callable; got {type(fn).__name__}")
        self.fn = fn
        self.batched = bool(batched)
        self.is_fixed_point = False
        self.form = "root"
        self.objective: Callable[[Any], torch.Tensor] | None = None
        self.residuals: Callable[[Any], Any] | None = None

    @classmethod
    def fixed_point(cls, f: Callable[[Any], Any], *, batched: bool = False) -> ImplicitProblem:
        """The fixed-point problem ``z* = f(z*)``; its residual is ``f(z) - z``.

        Args:
            f: The map; it receives and returns states with the structure of ``z0``.
            batched: As for :class:`ImplicitProblem`.

        Returns:
            A problem whose solvers use ``f`` directly when they iterate a map
            (Picard, Anderson) and ``f(z) - z`` when they want a residual.
        """
        problem = cls(f, batched=batched)
        problem.is_fixed_point = True
        problem.form = "fixed_point"
        return problem

    @classmethod
    def argmin(cls, objective: Callable[[Any], torch.Tensor], *, batched: bool = False) -> ImplicitProblem:
        """The minimisation problem ``z* = argmin_z objective(z)``, as the root of its gradient.

        The residual :attr:`fn` is ``∇objective(z)`` (computed by autograd, in
        the structure of ``z``), so every root solver runs the problem, the
        tolerance applies to the gradient's norm, and the Jacobian of the
        implicit derivative is the (symmetric) Hessian. The gradient is
        differentiable with respect to ``z`` and to every tensor the
        objective reads, so the solution's gradients reach all of them.

        Args:
            objective: ``z ↦`` a 0-dim tensor; with ``batched=True`` a tensor
                of shape ``(B,)``, value ``i`` depending on sample ``i`` only.
            batched: As for :class:`ImplicitProblem`.

        Returns:
            A problem with ``form == "argmin"``; its default solver is
            ``"lbfgs"`` and its default adjoint ``"cg"``.

        Raises:
            TypeError: ``objective`` is not callable.

        Examples:
            The minimum of ``(z - a)²`` is ``z* = a``, so ``dz*/da = 1``:

            >>> import torch, implicit
            >>> a = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
            >>> problem = implicit.ImplicitProblem.argmin(lambda z: ((z - a) ** 2).sum())
            >>> problem.form, problem.default_adjoint
            ('argmin', 'cg')
            >>> sol = implicit.solve(problem, torch.zeros(2, dtype=torch.float64), solver="newton_krylov", adjoint="gmres", tol=1e-10)
            >>> sol.z.tolist()
            [3.0, 3.0]
            >>> sol.z.sum().backward()
            >>> round(a.grad.item(), 8)
            2.0
        """
        if not callable(objective):
            raise TypeError(f"the objective must be callable; got {type(objective).__name__}")
        problem = cls(ObjectiveGradient(objective, batched=bool(batched), what="the objective"), batched=batched)
        problem.form = "argmin"
        problem.objective = objective
        return problem

    @classmethod
    def least_squares(cls, residuals: Callable[[Any], Any], *, batched: bool = False) -> ImplicitProblem:
        """The least-squares problem ``z* = argmin_z ½ Σ residuals(z)²``, as the root of its gradient ``Jᵀr``.

        Args:
            residuals: ``z ↦`` a tensor, or a dict, tuple or list of tensors,
                of any shapes (each with dim 0 of size ``B`` when batched);
                the squares of all their entries are summed (per sample when
                batched).
            batched: As for :class:`ImplicitProblem`.

        Returns:
            A problem with ``form == "least_squares"``, its :attr:`objective`
            ``½ Σ r²`` and its residual :attr:`fn` the gradient ``Jᵀr``; the
            default solver is ``"levenberg_marquardt"`` and the default adjoint ``"cg"``.

        Raises:
            TypeError: ``residuals`` is not callable.

        Examples:
            The line through three points, fitted by least squares:

            >>> import torch, implicit
            >>> t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
            >>> y = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
            >>> problem = implicit.ImplicitProblem.least_squares(lambda z: z["a"] * t + z["b"] - y)
            >>> z0 = {"a": torch.zeros((), dtype=torch.float64), "b": torch.zeros((), dtype=torch.float64)}
            >>> z = implicit.solve(problem, z0, solver="newton_krylov", adjoint="gmres", tol=1e-10).z
            >>> round(z["a"].item(), 8), round(z["b"].item(), 8)
            (2.0, 1.0)
        """
        if not callable(residuals):
            raise TypeError(f"the residuals function must be callable; got {type(residuals).__name__}")
        objective = LeastSquaresObjective(residuals, batched=bool(batched))
        gradient = ObjectiveGradient(objective, batched=bool(batched), what="the least-squares objective")
        problem = cls(gradient, batched=batched)
        problem.form = "least_squares"
        problem.objective = objective
        problem.residuals = residuals
        return problem

    @property
    def default_solver(self) -> str | None:
        """The solver used when none is named: ``"lbfgs"`` (argmin), ``"levenberg_marquardt"`` (least squares), else ``None``."""
        return _DEFAULTS[self.form][0]

    @property
    def default_adjoint(self) -> str | None:
        """The adjoint used when none is named: ``"cg"`` for argmin and least squares, else ``None``."""
        return _DEFAULTS[self.form][1]

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", type(self.fn).__name__)
        return f"ImplicitProblem({name}, form={self.form!r}, batched={self.batched})"

    def bind(self, z0: Any) -> System:
        """The flat view of this problem at the structure of ``z0``."""
        return System(self, Structure(z0, self.batched))


class System:
    """An :class:`ImplicitProblem` seen by solvers: functions of one ``(B, N)`` tensor.

    ``map(z)`` is the fixed-point map ``G`` (``f`` for a fixed-point problem,
    ``z - F(z)`` for a root problem) and ``residual(z)`` is ``F`` (``f(z) - z``
    for a fixed-point problem), so every solver can run every problem and
    ``G(z) = z - F(z)`` holds throughout. Each call validates what the user's
    function returned and counts one evaluation in :attr:`nfe`.

    :attr:`records_graph` tells a Newton-type solver that ``residual`` can be
    evaluated with its graph to linearise it (a system without it, such as an
    adjoint's linear system, supplies its products through ``residual_jvp``).
    """

    records_graph = True

    def __init__(self, problem: ImplicitProblem, structure: Structure) -> None:
        self.problem = problem
        self.structure = structure
        self.batch = structure.batch
        self.size = structure.size
        self.dtype = structure.work_dtype  # of the flat state; the variables f sees keep structure.dtype
        self.device = structure.device
        self.nfe = 0
        self._what = {
            "fixed_point": "the map f",
            "argmin": "the gradient of the objective",
            "least_squares": "the gradient of the least-squares objective",
        }.get(problem.form, "the residual F")
        # The caller's autocast, if any, when the problem was bound (at the start of a
        # solve): the user's function runs under it wherever it is evaluated, and the
        # solvers' own arithmetic never does (see precision()).
        self.autocast = autocast_dtype(structure.device.type)

    def precision(self) -> Any:
        """A context for the solvers' own arithmetic: autocast off, where the caller had it on.

        Under ``torch.autocast`` a solver's products (``bmm``, ``matmul``) would
        run in half precision and turn the state's dtype on the way; the
        user's function is still evaluated under the caller's autocast.
        """
        if self.autocast is None and autocast_dtype(self.device.type) is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, enabled=False)

    def call(self, z: torch.Tensor) -> torch.Tensor:
        """The user's function at flat ``z``, flattened (``f`` or ``F``).

        Raises:
            ValueError: the function returned the wrong structure, or wrote
                into its input (which is the solver's iterate: a map that
                does ``z.mul_(0.5)`` would look converged at once).
        """
        out = self._evaluate(self.problem.fn, z, self._what)
        if self.autocast is not None:
            # what autocast left in its lower precision returns to the state's dtype
            out = self.structure.recast(out, self.autocast)
        return self.structure.flatten_output(out, self._what)

    def _evaluate(self, fn: Callable[[Any], Any], z: torch.Tensor, what: str) -> Any:
        """``fn`` at flat ``z`` (unflattened), under the caller's autocast; counts one evaluation.

        Raises:
            ValueError: ``fn`` wrote into its input.
        """
        self.nfe += 1
        # Inference tensors keep no version counter (nor can they be written
        # outside inference mode): the guard is for every other tensor.
        version = None if z.is_inference() else z._version
        if self.autocast is None:
            out = fn(self.structure.unflatten(z))
        else:
            with torch.autocast(self.device.type, dtype=self.autocast):
                out = fn(self.structure.unflatten(z))
        if version is not None and z._version != version:
            raise ValueError(
                f"{what} modified its input in place ({self.structure.describe()}); the input is the "
                "solver's current iterate, so return new tensors instead (z.mul(0.5) rather than z.mul_(0.5))"
            )
        return out

    def _to_work(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor the user's function returned, in the flat state's dtype (back from autocast's)."""
        if t.dtype != self.dtype and (t.dtype == self.structure.dtype or t.dtype == self.autocast):
            return t.to(self.dtype)
        return t

    @property
    def form(self) -> str:
        """The problem's form: ``"root"``, ``"fixed_point"``, ``"argmin"`` or ``"least_squares"``."""
        return self.problem.form

    def _optimisation(self, method: str, forms: tuple[str, ...] = ("argmin", "least_squares")) -> None:
        if self.problem.form not in forms:
            kinds = " and ".join(f"{f} problems" for f in forms)
            raise ValueError(
                f"System.{method} is defined for {kinds} only; this problem's form is {self.problem.form!r} "
                "(build it with ImplicitProblem.argmin or ImplicitProblem.least_squares)"
            )

    def _value(self, z: torch.Tensor) -> torch.Tensor:
        """The objective at flat ``z`` as a ``(B,)`` tensor; one evaluation."""
        assert self.problem.objective is not None
        what = "the objective" if self.problem.form == "argmin" else "the residuals function"
        value = self._evaluate(self.problem.objective, z, what)
        value = check_value(value, self.problem.batched, self.batch, what)
        if value.device != self.device:
            raise ValueError(f"{what} returned a value on {value.device}; expected {self.device} as z0")
        return self._to_work(value).reshape(self.batch)

    def objective(self, z: torch.Tensor) -> torch.Tensor:
        """The objective per sample, ``(B,)`` (``½ Σ r²`` for least squares); one evaluation.

        Raises:
            ValueError: the problem is not an argmin or least-squares problem,
                or the objective returned the wrong shape.
        """
        self._optimisation("objective")
        return self._value(z)

    def value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective ``(B,)`` and its gradient ``(B, N)`` at flat ``z``, from one evaluation.

        Values only: no graph is kept.
        """
        self._optimisation("value_and_grad")
        if plain_autograd():
            with recording():
                z_leaf = leaf(z)
                value = self._value(z_leaf)
                grad = _grad(value.sum(), z_leaf)
            return value.detach(), grad.detach()

        def total(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            v = self._value(x)
            return v.sum(), v

        grad, (_, value) = torch.func.grad_and_value(total, has_aux=True)(z)
        return value, grad

    def value_grad_hvp(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The objective ``(B,)``, its gradient ``(B, N)`` and ``v ↦ H v`` at flat ``z``.

        One evaluation of the objective; each Hessian-vector product is one
        more backward pass through the graph kept (under ``torch.func``
        transforms, one forward-over-reverse evaluation each). For inner
        Krylov solves at one point (Newton-CG, the ``cg`` adjoint).
        """
        self._optimisation("value_grad_hvp")
        if plain_autograd():
            with recording():
                z_leaf = leaf(z)
                value = self._value(z_leaf)
                grad = _grad(value.sum(), z_leaf, create_graph=True)

            def hvp(v: torch.Tensor) -> torch.Tensor:
                if not grad.requires_grad:  # an objective linear in z
                    return torch.zeros_like(v)
                with recording():
                    return _grad(grad, z_leaf, v, retain_graph=True).detach()

            return value.detach(), grad.detach(), hvp

        value, grad = self.value_and_grad(z)
        return value, grad, lambda v: self._hvp_func(z, v)

    def _hvp_func(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        def total(x: torch.Tensor) -> torch.Tensor:
            return self._value(x).sum()

        return torch.func.jvp(torch.func.grad(total), (z,), (v,))[1]

    def hvp(self, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The Hessian-vector product ``H(z) v`` per sample, ``(B, N)``; one evaluation of the objective."""
        self._optimisation("hvp")
        if plain_autograd():
            return self.value_grad_hvp(z)[2](v)
        return self._hvp_func(z, v)

    def _lsq_flat(self, z: torch.Tensor) -> torch.Tensor:
        assert self.problem.residuals is not None
        what = "the residuals function"
        out = self._evaluate(self.problem.residuals, z, what)
        r = flatten_residuals(out, self.problem.batched, self.batch, what)
        if r.device != self.device:
            raise ValueError(f"{what} returned residuals on {r.device}; expected {self.device} as z0")
        return self._to_work(r)

    def lsq_residuals(self, z: torch.Tensor) -> torch.Tensor:
        """The residuals at flat ``z``, flattened per sample: ``(B, M)``; one evaluation.

        Raises:
            ValueError: the problem is not a least-squares problem, or the
                residuals have an inconsistent batch size.
        """
        self._optimisation("lsq_residuals", ("least_squares",))
        return self._lsq_flat(z)

    def lsq_linearize(
        self, z: torch.Tensor
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """The residuals ``r (B, M)`` at flat ``z`` and products with their Jacobian ``J`` there.

        Returns ``(r, jvp, vjp)`` with ``jvp(v) = J v`` (``(B, N) → (B, M)``)
        and ``vjp(u) = Jᵀ u`` (``(B, M) → (B, N)``), both per sample, from
        one evaluation of the residuals: ``vjp`` is a backward pass through
        the graph kept, ``jvp`` the derivative of ``vjp`` in ``u`` (a second
        backward pass). Under ``torch.func`` transforms each product
        evaluates the residuals again.
        """
        self._optimisation("lsq_linearize", ("least_squares",))
        if not plain_autograd():
            found = torch.func.vjp(self._lsq_flat, z)
            r, pullback = found[0], found[1]

            def jvp_func(v: torch.Tensor) -> torch.Tensor:
                return torch.func.jvp(self._lsq_flat, (z,), (v,))[1]

            return r, jvp_func, lambda u: pullback(u)[0]
        with recording():
            z_leaf = leaf(z)
            r = self._lsq_flat(z_leaf)
        dummy: list[torch.Tensor] = []  # Jᵀu as a function of u, built at the first jvp

        def vjp(u: torch.Tensor) -> torch.Tensor:
            if not r.requires_grad:
                return torch.zeros_like(z)
            with recording():
                return _grad(r, z_leaf, u, retain_graph=True).detach()

        def jvp(v: torch.Tensor) -> torch.Tensor:
            if not r.requires_grad:
                return torch.zeros_like(r)
            with recording():
                if not dummy:
                    u = torch.zeros_like(r, requires_grad=True)
                    dummy.extend([u, _grad(r, z_leaf, u, create_graph=True)])
                u, w = dummy
                return _grad(w, u, v, retain_graph=True).detach()

        return r.detach(), jvp, vjp

    def map(self, z: torch.Tensor) -> torch.Tensor:
        """The fixed-point map ``G(z)``."""
        out = self.call(z)
        return out if self.problem.is_fixed_point else z - out

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """The residual ``F(z)``, zero at the solution."""
        out = self.call(z)
        return out - z if self.problem.is_fixed_point else out

    def residual_jvp(self, z: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F(z)`` and the Jacobian-vector product ``(∂F/∂z) v``, by forward-mode AD.

        For argmin and least-squares problems, the gradient and a
        Hessian-vector product from one evaluation (reverse over reverse).
        """
        if self.problem.form in ("argmin", "least_squares") and plain_autograd():
            _, grad, hvp = self.value_grad_hvp(z)
            return grad, hvp(v)
        if torch.is_inference_mode_enabled():
            # Outside inference mode (with no graph: it would save inference tensors), where
            # PyTorch 2.2's forward mode gives zero tangents.
            with torch.inference_mode(False), torch.no_grad():
                out, tangent = torch.func.jvp(self.residual, (z,), (v,))[:2]
            return out, tangent
        out, tangent = torch.func.jvp(self.residual, (z,), (v,))[:2]
        return out, tangent


def _grad(
    out: torch.Tensor,
    wrt: torch.Tensor,
    grad_outputs: torch.Tensor | None = None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> torch.Tensor:
    """``∂out/∂wrt`` contracted with ``grad_outputs``; zeros where ``out`` does not depend on ``wrt``."""
    if not out.requires_grad:
        return torch.zeros_like(wrt)
    (g,) = torch.autograd.grad(
        out,
        wrt,
        grad_outputs,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
        materialize_grads=True,
    )
    return g
