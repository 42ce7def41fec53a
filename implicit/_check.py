"""Checking a problem before solving it: :func:`check` and the :class:`CheckReport` it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ._problem import ImplicitProblem, System
from ._structure import Structure
from ._transforms import no_tangents

__all__ = ["CheckReport", "Finding", "check"]


@dataclass
class Finding:
    """One thing :func:`check` looked at.

    Attributes:
        name: What was checked (``"state"``, ``"output"``, ``"values of z0"``,
            ``"values of F(z0)"``, ``"derivatives"``, ``"plain iteration"``,
            ``"batch independence"``).
        passed: Whether it is as a solve needs it.
        message: One line saying what was found, naming the variables concerned.
        figures: The numbers behind the message (spectral radii, sample indices...).
        critical: Whether a failure makes a solve or a gradient wrong (``False``
            for advice, such as plain iteration diverging where other solvers may not).
    """

    name: str
    passed: bool
    message: str
    figures: dict[str, Any] = field(default_factory=dict)
    critical: bool = True

    def __str__(self) -> str:
        tag = "ok" if self.passed else ("FAIL" if self.critical else "note")
        return f"[{tag}] {self.name}: {self.message}"


@dataclass
class CheckReport:
    """What :func:`check` found.

    Attributes:
        problem: The problem's ``repr``.
        ok: ``True`` when nothing was found that would make a solve or a
            gradient wrong (every critical finding passed).
        findings: Every :class:`Finding`, in the order checked.
        spectral_radius: The estimated spectral radius of ``∂G/∂z`` at ``z0``
            (``G`` the fixed-point map): shape ``(B,)`` when batched, 0-dim
            otherwise; ``None`` where it could not be estimated.
    """

    problem: str
    ok: bool
    findings: list[Finding]
    spectral_radius: torch.Tensor | None = None

    def finding(self, name: str) -> Finding | None:
        """The finding called ``name``, or ``None`` if it was not reached."""
        return next((f for f in self.findings if f.name == name), None)

    @property
    def failures(self) -> list[Finding]:
        """The findings that did not pass (critical ones and advice)."""
        return [f for f in self.findings if not f.passed]

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "problems found"
        lines = [f"implicit.check of {self.problem}: {verdict}"]
        lines += [f"  {f}" for f in self.findings]
        return "\n".join(lines)


def check(
    problem: ImplicitProblem,
    z0: Any,
    *,
    krylov_steps: int = 24,
    probes: int = 2,
    generator: torch.Generator | None = None,
) -> CheckReport:
    """Check a problem at ``z0`` without solving it: what would make a solve or a gradient wrong.

    Evaluates the map once with its graph and takes a few dozen
    vector-Jacobian products through it; nothing is solved. It checks, in order:

    * the state ``z0`` (a tensor, dict or tuple/list of floating-point
      tensors of one dtype and device, one batch size when batched), as
      :func:`solve` would; a meta tensor has no values to solve for;
    * that ``z0`` holds finite values (naming the variables that do not);
    * that ``F(z0)`` has the keys, shapes, dtype and device of ``z0``;
    * that ``F(z0)`` is finite (naming the variables);
    * that ``F`` can be differentiated in ``z`` (the backward pass needs it);
    * the spectral radius ``ρ`` of ``∂G/∂z`` at ``z0``, with ``G = f`` for a
      fixed-point problem and ``G(z) = z - F(z)`` for a root problem, per
      sample when batched: below 1, plain iteration (``solver="fixed_point"``)
      converges near ``z0``, one decade of residual in about
      ``1 / -log10(ρ)`` iterations; at or above 1 it does not (Anderson,
      Broyden or Newton–Krylov may);
    * for ``batched=True``, that sample ``i`` of ``F(z)`` does not depend on
      sample ``j ≠ i`` of ``z``: ``probes`` vector-Jacobian products with a
      random cotangent on one sample must vanish on every other one.

    ``ρ`` is read from the Ritz values of ``krylov_steps`` steps of Arnoldi's
    method on ``(∂G/∂z)ᵀ`` (power iteration keeping the whole Krylov space of
    its iterates, so that a complex pair of dominant eigenvalues is found
    too); it is exact, to rounding, when a sample has at most
    ``krylov_steps`` unknowns, and otherwise an estimate from below, accurate
    when the dominant eigenvalue stands apart from the rest. ``ρ`` at ``z0``
    need not be ``ρ`` at the solution; check at a solution to judge the
    ``neumann`` adjoint, which needs ``ρ < 1`` there.

    Args:
        problem: The problem to check.
        z0: The initial state, as for :func:`solve`.
        krylov_steps: Vector-Jacobian products for the spectral radius.
        probes: Samples probed for independence when batched.
        generator: The random generator of the starting vector and the probes.

    Returns:
        A :class:`CheckReport`; ``print(report)`` shows every finding.

    Raises:
        TypeError: ``problem`` is not an :class:`ImplicitProblem`. A bad
            problem or state never raises: it is reported.

    Examples:
        >>> import torch, implicit
        >>> W = torch.tensor([[0.5, 0.0], [0.0, 0.25]], dtype=torch.float64)
        >>> problem = implicit.ImplicitProblem.fixed_point(lambda z: z @ W.T + 1.0, batched=True)
        >>> report = implicit.check(problem, torch.zeros(3, 2, dtype=torch.float64))
        >>> report.ok, [round(r, 6) for r in report.spectral_radius.tolist()]
        (True, [0.5, 0.5, 0.5])
        >>> bad = implicit.ImplicitProblem.fixed_point(lambda z: 0.5 * z + z.mean(0), batched=True)
        >>> report = implicit.check(bad, torch.zeros(3, 2, dtype=torch.float64))
        >>> report.ok, report.finding("batch independence").passed
        (False, False)
    """
    if not isinstance(problem, ImplicitProblem):
        raise TypeError(f"problem must be an implicit.ImplicitProblem; got {type(problem).__name__}")
    findings: list[Finding] = []
    radius: torch.Tensor | None = None

    def report() -> CheckReport:
        ok = all(f.passed or not f.critical for f in findings)
        return CheckReport(problem=repr(problem), ok=ok, findings=findings, spectral_radius=radius)

    # The state, as solve() binds it.
    try:
        structure = Structure(z0, problem.batched)
    except (TypeError, ValueError, NotImplementedError) as exc:
        findings.append(Finding("state", False, f"z0 cannot be solved for: {exc}"))
        return report()
    samples = (
        f"{structure.batch} samples of {structure.size} numbers"
        if problem.batched
        else f"{structure.size} number{'s' if structure.size != 1 else ''}"
    )
    if structure.device.type == "meta":
        findings.append(
            Finding(
                "state",
                False,
                f"z0 is on the meta device ({structure.describe()}): it has shapes but no values to solve for",
            )
        )
        return report()
    system = System(problem, structure)
    findings.append(
        Finding("state", True, f"{structure.describe()}; {samples}, {structure.dtype} on {structure.device}")
    )
    # Out of inference mode, if it is on: the products need a graph (and z0 a normal copy).
    with torch.inference_mode(False), torch.no_grad():
        flat = structure.flatten(z0).detach().clone()
    findings.append(_finite("values of z0", structure, flat, "z0"))

    # One evaluation with its graph: the output's structure and values, and the products.
    what = "f" if problem.is_fixed_point else "F"
    with no_tangents(), torch.inference_mode(False):
        try:
            with torch.enable_grad():
                z = flat.clone().requires_grad_()
                out = system.call(z)
        except Exception as exc:  # noqa: BLE001 - whatever the user's function raises is reported
            findings.append(Finding("output", False, f"{type(exc).__name__}: {exc}"))
            return report()
        findings.append(Finding("output", True, f"{what}(z0) has the keys, shapes, dtype and device of z0"))
        residual = (out - z if problem.is_fixed_point else out).detach()
        findings.append(_finite(f"values of {what}(z0)", structure, out.detach(), f"{what}(z0)"))
        if not findings[-1].passed:
            return report()
        g = out if problem.is_fixed_point else z - out
        figures = {"residual": torch.linalg.vector_norm(residual, dim=1).tolist()}
        try:
            radius = _spectral_radius(system, z, g, min(krylov_steps, structure.size), generator)
        except Exception as exc:  # noqa: BLE001 - an operation without a derivative, say
            findings.append(
                Finding("derivatives", False, f"{what} cannot be differentiated in z: {type(exc).__name__}: {exc}")
            )
            return report()
        findings.append(Finding("derivatives", True, f"{what} is differentiable in z", figures))
        findings.append(_plain_iteration(radius, problem.batched))
        if problem.batched:
            findings.append(_independence(z, g, probes, generator))
    if not problem.batched:
        radius = radius[0]
    return report()


def _finite(name: str, structure: Any, flat: torch.Tensor, where: str) -> Finding:
    bad = structure.nonfinite(flat)
    if not bad:
        return Finding(name, True, f"every value of {where} is finite")
    rows = (~torch.isfinite(flat)).any(dim=1).nonzero().flatten().tolist()
    samples = f" (samples {rows[:8]}{'...' if len(rows) > 8 else ''})" if structure.batched else ""
    return Finding(
        name, False, f"{where} holds NaN or infinity in {', '.join(bad)}{samples}", {"variables": bad, "samples": rows}
    )


def _vjp(z: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(∂g/∂z)ᵀ v`` through the recorded graph (zero where ``g`` does not depend on ``z``)."""
    if not g.requires_grad:
        return torch.zeros_like(z)
    (w,) = torch.autograd.grad(g, z, v, retain_graph=True, allow_unused=True)
    return torch.zeros_like(z) if w is None else w.detach()


def _spectral_radius(
    system: System, z: torch.Tensor, g: torch.Tensor, steps: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``max |λ(∂G/∂z)|`` per sample from the Ritz values of ``steps`` Arnoldi steps on ``(∂G/∂z)ᵀ``."""
    batch, size = z.shape
    if batch == 0 or size == 0:
        return z.new_zeros(batch).detach()
    v = torch.randn(z.shape, generator=generator, dtype=z.dtype, device="cpu").to(z.device)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    basis = [v]
    hess = torch.zeros(batch, steps + 1, steps, dtype=torch.float64, device=z.device)
    tiny = 1e3 * torch.finfo(z.dtype).eps
    for j in range(steps):
        w = _vjp(z, g, basis[j])
        scale = torch.linalg.vector_norm(w, dim=1)
        q = torch.stack(basis, dim=1)  # (B, j + 1, N)
        for _ in range(2):  # classical Gram–Schmidt, twice
            c = (q @ w.unsqueeze(-1)).squeeze(-1)
            w = w - (c.unsqueeze(1) @ q).squeeze(1)
            hess[:, : j + 1, j] += c.double()
        h = torch.linalg.vector_norm(w, dim=1)
        # A vanishing remainder means an invariant subspace: the Ritz values are exact, and a
        # zero vector keeps the sample's later columns zero (adding Ritz values 0).
        keep = h > tiny * scale.clamp_min(torch.finfo(z.dtype).tiny)
        hess[:, j + 1, j] = torch.where(keep, h, torch.zeros_like(h)).double()
        basis.append(
            torch.where(keep[:, None], w / h.clamp_min(torch.finfo(z.dtype).tiny)[:, None], torch.zeros_like(w))
        )
    ritz = torch.linalg.eigvals(hess[:, :steps, :steps])
    return ritz.abs().amax(dim=1).to(z.dtype)


def _plain_iteration(radius: torch.Tensor, batched: bool) -> Finding:
    values = radius.tolist()
    rho = max(values, default=0.0)
    worst = values.index(rho) if values else 0
    where = f" (sample {worst}; smallest {min(values):.3g})" if batched and len(values) > 1 else ""
    per_decade = [math.inf if r >= 1 else (0.0 if r == 0 else 1.0 / -math.log10(r)) for r in values]
    figures = {"spectral_radius": values, "iterations_per_decade": per_decade}
    if not math.isfinite(rho):
        return Finding("plain iteration", False, f"the spectral radius of ∂G/∂z at z0 is {rho}", figures)
    if rho >= 1:
        diverging = sum(r >= 1 for r in values)
        count = f" for {diverging} of {len(values)} samples" if batched else ""
        return Finding(
            "plain iteration",
            False,
            f"spectral radius of ∂G/∂z at z0 is {rho:.4g} ≥ 1{count}{where}: plain iteration "
            "(solver='fixed_point') will not converge from here; anderson, broyden or newton_krylov may, "
            "and the neumann adjoint needs ρ < 1 at the solution",
            figures,
            critical=False,
        )
    speed = "at once" if rho == 0 else f"one decade of residual per about {1.0 / -math.log10(rho):.3g} iterations"
    return Finding(
        "plain iteration",
        True,
        f"spectral radius of ∂G/∂z at z0 is {rho:.4g}{where}: plain iteration converges near z0, {speed}",
        figures,
        critical=False,
    )


def _independence(z: torch.Tensor, g: torch.Tensor, probes: int, generator: torch.Generator | None) -> Finding:
    batch = z.shape[0]
    if batch < 2:
        return Finding("batch independence", True, "one sample: nothing to mix")
    picks = torch.randperm(batch, generator=generator)[: max(1, probes)].tolist()
    eps = torch.finfo(z.dtype).eps
    leaks: dict[int, list[int]] = {}
    worst = 0.0
    for j in picks:
        cot = torch.zeros_like(g)
        cot[j] = torch.randn(g.shape[1], generator=generator, dtype=g.dtype, device="cpu").to(g.device)
        w = _vjp(z, g, cot)
        norms = torch.linalg.vector_norm(w, dim=1)
        own = float(norms[j]) + float(torch.linalg.vector_norm(cot[j]))
        others = norms.clone()
        others[j] = 0
        bound = 1e3 * eps * own
        bad = (others > bound).nonzero().flatten().tolist()
        if bad:
            leaks[j] = bad
            worst = max(worst, float(others.max()) / own)
    figures = {"probed": picks, "dependent": leaks, "largest_relative_leak": worst}
    if not leaks:
        return Finding(
            "batch independence",
            True,
            f"the outputs of samples {picks} depend on their own input only",
            figures,
        )
    j, bad = next(iter(leaks.items()))
    return Finding(
        "batch independence",
        False,
        f"the output of sample {j} depends on the input of samples {bad[:8]}{'...' if len(bad) > 8 else ''} "
        f"(relative size {worst:.2e}): the map mixes samples, so per-sample convergence and the "
        "block-diagonal adjoints are wrong; build the problem with batched=False",
        figures,
    )
