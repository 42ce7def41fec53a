"""Benchmark problems and their dense float64 reference gradients.

Each problem is a batched fixed point ``z* = f(z*; θ)`` whose map is written
as an explicit function of the state, the parameters ``θ`` and a fixed input,
so the same problem can be rebuilt in float64 for the reference. The loss is
``L = Σ c ⊙ z*`` for a fixed random cotangent ``c``; the reported gradient
error is ``‖∇θ L − ∇θ L_ref‖ / ‖∇θ L_ref‖`` over all parameters together.

The reference is the implicit function theorem written out by hand,
independently of the libraries under test: ``z*`` by float64 Picard iteration
to 1e-13, the Jacobian ``∂f/∂z`` materialised per sample (batched
vector-Jacobian products with unit vectors), one dense solve
``(I − J_b)ᵀ u_b = c_b`` per sample, and ``∇θ L = uᵀ ∂f/∂θ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

f64 = torch.float64

State = Any  # a tensor, or a dict of tensors with dim 0 the batch


def symmetric_contraction(n: int, rho: float, g: torch.Generator) -> torch.Tensor:
    """A random symmetric ``n x n`` matrix with eigenvalues evenly spread on ``[-rho, rho]``.

    Its spectral norm and spectral radius are both ``rho``, so plain iteration
    of ``tanh(W z + ·)`` contracts at a rate close to ``rho``.
    """
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    lam = rho * torch.linspace(-1.0, 1.0, n, dtype=f64)
    return (q * lam) @ q.T


def conv_operator_norm(k: torch.Tensor, channels: int, hw: int, iters: int = 200) -> float:
    """The spectral norm of ``z ↦ conv2d(z, k, padding=1)`` on ``hw x hw`` images (power iteration)."""
    v = torch.randn(1, channels, hw, hw, dtype=f64, generator=torch.Generator().manual_seed(5))
    v = v / v.norm()
    sq = 0.0
    for _ in range(iters):  # power iteration on AᵀA: ‖AᵀA v‖ → σ_max(A)²
        w = F.conv_transpose2d(F.conv2d(v, k, padding=1), k, padding=1)
        sq = float(w.norm())
        v = w / sq
    return sq**0.5


@dataclass
class Spec:
    """A problem as data: its map, parameters (float64 masters), input and cotangent."""

    name: str
    description: str
    fmap: Callable[[State, list[torch.Tensor], Any], State]
    params: list[torch.Tensor]
    inputs: Any
    cotangent: State
    z0: State
    keys: list[str] | None = None  # dict state keys, None for a tensor state
    fast: bool = True  # a fast-contracting problem (for the "never slower than Picard" target)
    mlp: bool = False  # an MLP problem (for the scipy comparison)


def _to(x: Any, dtype: torch.dtype, device: torch.device | str) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(dtype=dtype, device=device)
    if isinstance(x, dict):
        return {k: _to(v, dtype, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, dtype, device) for v in x)
    return x


def tensors(x: Any) -> list[torch.Tensor]:
    """The tensors inside ``x`` (a tensor, dict, list or tuple)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in tensors(v)]
    return []


# --- the maps ---------------------------------------------------------------------------


def mlp_map(z: torch.Tensor, p: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    W, U, b = p
    return torch.tanh(z @ W.T + x @ U.T + b)


def two_variable_map(z: dict[str, torch.Tensor], p: list[torch.Tensor], u: torch.Tensor) -> dict[str, torch.Tensor]:
    A, Bm, C, D, U, by = p
    x, y = z["x"], z["y"]
    return {
        "x": torch.tanh(x @ A.T + y @ Bm.T + u @ U.T),
        "y": torch.tanh(x @ C.T + y @ D.T + by),
    }


def conv_map(z: torch.Tensor, p: list[torch.Tensor], img: torch.Tensor) -> torch.Tensor:
    K, V, bias = p
    return torch.tanh(F.conv2d(z, K, padding=1) + F.conv2d(img, V, padding=1) + bias[:, None, None])


# --- the problems -----------------------------------------------------------------------


def mlp(rho: float, batch: int = 64, dim: int = 512, d_in: int = 64, seed: int = 0) -> Spec:
    g = torch.Generator().manual_seed(seed)
    W = symmetric_contraction(dim, rho, g)
    U = torch.randn(dim, d_in, generator=g, dtype=f64) / d_in**0.5 * 0.1
    b = torch.randn(dim, generator=g, dtype=f64) * 0.01
    x = torch.randn(batch, d_in, generator=g, dtype=f64)
    c = torch.randn(batch, dim, generator=g, dtype=f64)
    speed = "fast" if rho <= 0.6 else "slow"
    return Spec(
        name=f"mlp_{speed}",
        description=f"MLP DEQ z = tanh(W z + U x + b), batch {batch}, dim {dim}, ‖W‖ = {rho} (symmetric W)",
        fmap=mlp_map,
        params=[W, U, b],
        inputs=x,
        cotangent=c,
        z0=torch.zeros(batch, dim, dtype=f64),
        fast=rho <= 0.6,
        mlp=True,
    )


def two_variable(
    batch: int = 64, nx: int = 256, ny: int = 128, rho: float = 0.8, d_in: int = 32, seed: int = 1
) -> Spec:
    g = torch.Generator().manual_seed(seed)
    M = symmetric_contraction(nx + ny, rho, g)
    A, Bm, C, D = M[:nx, :nx], M[:nx, nx:], M[nx:, :nx], M[nx:, nx:]
    U = torch.randn(nx, d_in, generator=g, dtype=f64) / d_in**0.5 * 0.3
    by = torch.randn(ny, generator=g, dtype=f64) * 0.3
    u = torch.randn(batch, d_in, generator=g, dtype=f64)
    c = {"x": torch.randn(batch, nx, generator=g, dtype=f64), "y": torch.randn(batch, ny, generator=g, dtype=f64)}
    return Spec(
        name="two_variable",
        description=(
            f"two-variable DEQ (x, y) = f(x, y), x: ({batch}, {nx}), y: ({batch}, {ny}), "
            f"coupled both ways, joint ‖·‖ = {rho}"
        ),
        fmap=two_variable_map,
        params=[A.clone(), Bm.clone(), C.clone(), D.clone(), U, by],
        inputs=u,
        cotangent=c,
        z0={"x": torch.zeros(batch, nx, dtype=f64), "y": torch.zeros(batch, ny, dtype=f64)},
        keys=["x", "y"],
    )


def conv(batch: int = 32, channels: int = 16, hw: int = 8, rho: float = 0.8, seed: int = 2) -> Spec:
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(channels, channels, 3, 3, generator=g, dtype=f64)
    K = K * (rho / conv_operator_norm(K, channels, hw))
    V = torch.randn(channels, 3, 3, 3, generator=g, dtype=f64) / 27**0.5 * 0.3
    bias = torch.randn(channels, generator=g, dtype=f64) * 0.1
    img = torch.randn(batch, 3, hw, hw, generator=g, dtype=f64)
    c = torch.randn(batch, channels, hw, hw, generator=g, dtype=f64)
    return Spec(
        name="conv",
        description=(
            f"conv DEQ z = tanh(conv3x3(z) + conv3x3(x) + b), batch {batch}, {channels} channels, "
            f"{hw}x{hw}, conv operator norm {rho}"
        ),
        fmap=conv_map,
        params=[K, V, bias],
        inputs=img,
        cotangent=c,
        z0=torch.zeros(batch, channels, hw, hw, dtype=f64),
    )


def all_specs(quick: bool = False) -> list[Spec]:
    if quick:
        return [
            mlp(0.5, batch=8, dim=64, d_in=16),
            mlp(0.95, batch=8, dim=64, d_in=16),
            two_variable(batch=8, nx=24, ny=12, d_in=8),
            conv(batch=4, channels=4, hw=6),
        ]
    return [mlp(0.5), mlp(0.95), two_variable(), conv()]


# --- a problem instantiated in one dtype on one device, with an f-call counter ----------


@dataclass
class Problem:
    """A :class:`Spec` at one dtype and device; ``f`` counts its calls in :attr:`calls`."""

    spec: Spec
    dtype: torch.dtype
    device: torch.device
    params: list[torch.Tensor] = field(init=False)
    inputs: Any = field(init=False)
    cotangent: State = field(init=False)
    calls: int = 0

    def __post_init__(self) -> None:
        self.params = [p.to(device=self.device, dtype=self.dtype).clone().requires_grad_() for p in self.spec.params]
        self.inputs = _to(self.spec.inputs, self.dtype, self.device)
        self.cotangent = _to(self.spec.cotangent, self.dtype, self.device)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def keys(self) -> list[str] | None:
        return self.spec.keys

    def f(self, z: State) -> State:
        """The map, counting one evaluation."""
        self.calls += 1
        return self.spec.fmap(z, self.params, self.inputs)

    def f_uncounted(self, z: State) -> State:
        return self.spec.fmap(z, self.params, self.inputs)

    def z0(self) -> State:
        return _to(self.spec.z0, self.dtype, self.device)

    def loss(self, z: State) -> torch.Tensor:
        if self.keys is None:
            return (z * self.cotangent).sum()
        return sum((z[k] * self.cotangent[k]).sum() for k in self.keys)  # type: ignore[return-value]

    # flat (B, N) views, for the libraries and loops that want one tensor
    def flatten(self, z: State) -> torch.Tensor:
        if self.keys is None:
            return z.reshape(z.shape[0], -1)
        return torch.cat([z[k].reshape(z[k].shape[0], -1) for k in self.keys], dim=1)

    def unflatten(self, v: torch.Tensor) -> State:
        """The inverse of :meth:`flatten`, for any number of rows (a single sample too)."""
        if self.keys is None:
            return v.view(v.shape[0], *self.spec.z0.shape[1:])
        out, i = {}, 0
        for k in self.keys:
            shape = self.spec.z0[k].shape[1:]
            n = shape.numel()
            out[k] = v[:, i : i + n].reshape(v.shape[0], *shape)
            i += n
        return out

    def f_sample(self, v: torch.Tensor, b: int) -> torch.Tensor:
        """The map of sample ``b`` alone, on a flat ``(1, N)`` state (counted)."""
        self.calls += 1
        inputs = self.inputs[b : b + 1]
        return self.flatten(self.spec.fmap(self.unflatten(v), self.params, inputs))

    def f_flat(self, v: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.f(self.unflatten(v)))

    def relative_residual(self, z: State) -> float:
        """``max_b ‖f(z)_b − z_b‖ / ‖z_b‖`` (not counted as an evaluation)."""
        with torch.no_grad():
            zf = self.flatten(z).to(self.dtype)
            r = self.flatten(self.f_uncounted(self.unflatten(zf))) - zf
            return float((r.norm(dim=1) / zf.norm(dim=1).clamp_min(1e-30)).max())


# --- the float64 reference ----------------------------------------------------------------


@dataclass
class Spectrum:
    """Where the eigenvalues of one sample's Jacobian ``∂f/∂z`` at ``z*`` lie.

    What any method built from products with the Jacobian can gain over
    Picard iteration (whose error shrinks like ``ρᵏ``) depends on this: on a
    real interval ``[-ρ, ρ]`` a polynomial of degree ``k`` that is 1 at 1 can
    be as small as about ``(ρ / (1 + √(1 - ρ²)))ᵏ`` (Chebyshev), while on a
    disc ``|λ| ≤ ρ`` none is smaller than ``ρᵏ`` (maximum modulus principle):
    Anderson acceleration and GMRES then need as many iterations as Picard.
    """

    radius: float  # spectral radius ρ
    complex_share: float  # share of eigenvalues with |Im λ| > 1e-6 ρ
    imag_max: float  # max |Im λ|
    real_min: float
    real_max: float

    @staticmethod
    def of(jacobian: torch.Tensor) -> Spectrum:
        ev = torch.linalg.eigvals(jacobian)
        rho = float(ev.abs().max())
        return Spectrum(
            radius=rho,
            complex_share=float((ev.imag.abs() > 1e-6 * rho).double().mean()),
            imag_max=float(ev.imag.abs().max()),
            real_min=float(ev.real.min()),
            real_max=float(ev.real.max()),
        )

    @property
    def chebyshev_rate(self) -> float:
        """The asymptotic error factor per iteration that an interval ``[-ρ, ρ]`` allows."""
        return self.radius / (1.0 + math.sqrt(max(0.0, 1.0 - self.radius**2)))

    def describe(self) -> str:
        rho = self.radius
        where = (
            f"{100 * self.complex_share:.0f} % of them complex, filling a disc (|Im λ| up to {self.imag_max:.2f}, "
            f"Re λ in [{self.real_min:.2f}, {self.real_max:.2f}]): on a disc no polynomial acceleration beats "
            f"Picard's ρᵏ, so Anderson and GMRES cannot need fewer iterations than Picard"
            if self.complex_share > 0.5
            else f"real, in [{self.real_min:.2f}, {self.real_max:.2f}]: acceleration can reach about "
            f"{self.chebyshev_rate:.2f} per iteration against Picard's {rho:.2f}"
        )
        return f"Eigenvalues of ∂f/∂z at z* (sample 0): spectral radius ρ = {rho:.2f}, {where}."


@dataclass
class Reference:
    z_star: State  # float64
    grads: list[torch.Tensor]  # float64, one per parameter
    sample_norms: torch.Tensor  # ‖z*_b‖, (B,)
    spectrum: Spectrum | None = None  # of ∂f/∂z at z*, sample 0


    def error(self, grads: list[torch.Tensor]) -> float:
        num = sum(float((g.detach().to(f64).cpu() - r).pow(2).sum()) for g, r in zip(grads, self.grads))
        den = sum(float(r.pow(2).sum()) for r in self.grads)
        return (num / den) ** 0.5


def reference(spec: Spec, chunk: int = 128) -> Reference:
    """Float64 solution and IFT gradient of ``L = Σ c ⊙ z*`` with dense per-sample Jacobians."""
    prob = Problem(spec, f64, torch.device("cpu"))
    with torch.no_grad():
        z = prob.flatten(prob.z0())
        for _ in range(100_000):
            new = prob.f_flat(z)
            step = float((new - z).abs().max())
            z = new
            if step < 1e-13:
                break
    z_star = z.detach()
    batch, n = z_star.shape
    zg = z_star.clone().requires_grad_()
    with torch.enable_grad():
        g_out = prob.f_flat(zg)
        rows = []
        eye = torch.eye(n, dtype=f64)
        for s in range(0, n, chunk):
            basis = eye[s : s + chunk, None, :].expand(-1, batch, n)
            (r,) = torch.autograd.grad(g_out, zg, basis, retain_graph=True, is_grads_batched=True)
            rows.append(r)
        J = torch.cat(rows).transpose(0, 1)  # (B, N, N), J[b, i, j] = ∂f_i/∂z_j of sample b
        c = prob.flatten(prob.cotangent)
        u = torch.linalg.solve((torch.eye(n, dtype=f64) - J).mT, c.unsqueeze(-1)).squeeze(-1)
        g_out = prob.f_flat(z_star)
        grads = torch.autograd.grad(g_out, prob.params, u)
    return Reference(
        z_star=prob.unflatten(z_star),
        grads=[g.detach() for g in grads],
        sample_norms=z_star.norm(dim=1),
        spectrum=Spectrum.of(J[0].detach()),
    )
