"""One short GPU check: the MLP DEQ problems on CUDA, implicit against torchdeq and the hand loop.

Needs torch, implicit and the question's loop from ``benchmarks.methods`` (torchdeq is used when
importable). Run from the repository root on a machine with a GPU::

    python benchmarks/gpu_check.py            # about a minute on an H100
    python benchmarks/gpu_check.py --reps 30 --out gpu_results.md

Prints a markdown table per problem with the columns of ``benchmarks/RESULTS.md``;
the number to watch is ``fwd/limit``: the forward time over (evaluations of
f x one bare f call). On a GPU a small f is launch-bound, so the solver's
own kernels and its one host synchronisation per iteration weigh more than
on a CPU; the large problem shows the regime where f dominates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import autograd

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import implicit  # noqa: E402
from benchmarks.methods import DEQFixedPoint, forward_iteration, torchdeq_layer  # noqa: E402

f64 = torch.float64


# --- problems -----------------------------------------------------------------------------------


def symmetric_contraction(n: int, rho: float, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))
    return (q * (rho * torch.linspace(-1.0, 1.0, n, dtype=f64))) @ q.T


class MLP:
    """``z = tanh(W z + U x + b)``, ``‖W‖ = rho`` (symmetric W), the map counting its calls."""

    def __init__(self, name: str, rho: float, batch: int, dim: int, device: torch.device, d_in: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.name, self.rho, self.batch, self.dim = name, rho, batch, dim
        master = [
            symmetric_contraction(dim, rho, g),
            torch.randn(dim, d_in, generator=g, dtype=f64) / d_in**0.5 * 0.1,
            torch.randn(dim, generator=g, dtype=f64) * 0.01,
        ]
        x = torch.randn(batch, d_in, generator=g, dtype=f64)
        c = torch.randn(batch, dim, generator=g, dtype=f64)
        self.device = device
        self.p32 = [t.to(device, torch.float32).requires_grad_() for t in master]
        self.p64 = [t.to(device).requires_grad_() for t in master]
        self.x32, self.x64 = x.to(device, torch.float32), x.to(device)
        self.c32, self.c64 = c.to(device, torch.float32), c.to(device)
        self.calls = 0

    def f(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        W, U, b = self.p32
        return torch.tanh(z @ W.T + self.x32 @ U.T + b)

    def f64(self, z: torch.Tensor) -> torch.Tensor:
        W, U, b = self.p64
        return torch.tanh(z @ W.T + self.x64 @ U.T + b)

    def z0(self) -> torch.Tensor:
        return torch.zeros(self.batch, self.dim, device=self.device)

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        return (z * self.c32).sum()

    def reference(self) -> list[torch.Tensor]:
        """Float64 IFT gradient written out by hand: Picard to 1e-13, then ``u = c + Jᵀu`` to 1e-13."""
        with torch.no_grad():
            z = torch.zeros(self.batch, self.dim, dtype=f64, device=self.device)
            for _ in range(20000):
                new = self.f64(z)
                done = float((new - z).abs().max()) < 1e-13
                z = new
                if done:
                    break
        zg = z.detach().requires_grad_()
        g = self.f64(zg)
        u = self.c64.clone()
        for _ in range(20000):
            new = autograd.grad(g, zg, u, retain_graph=True)[0] + self.c64
            done = float((new - u).abs().max()) < 1e-13 * float(u.abs().max())
            u = new
            if done:
                break
        return [t.detach() for t in autograd.grad(self.f64(z.detach()), self.p64, u)]


# --- methods ------------------------------------------------------------------------------------


def hand_loop(p: MLP, tol: float, max_iter: int) -> tuple[torch.Tensor, int]:
    """The question's layer (:class:`benchmarks.methods.DEQFixedPoint`) on this problem."""
    layer = DEQFixedPoint(lambda z, _x: p.f(z), forward_iteration, max_iter=max_iter, tol=tol)
    return layer(p.z0()), len(layer.forward_res)


def implicit_method(solver: str, adjoint: str) -> Callable:
    def run(p: MLP, tol: float, max_iter: int) -> tuple[torch.Tensor, int]:
        sol = implicit.solve(
            implicit.ImplicitProblem.fixed_point(p.f, batched=True),
            p.z0(),
            solver=solver,
            adjoint=adjoint,
            tol=tol,
            atol=1e-12 if tol > 0 else 0.0,
            max_iter=max_iter,
            on_failure="ignore",
            adjoint_options={"tol": tol or 1e-12, "max_iter": max_iter},
        )
        return sol.z, sol.stats.iterations

    return run


def torchdeq_method(solver: str) -> Callable | None:
    try:
        import torchdeq  # noqa: F401  (present?)
    except ImportError:
        return None
    cache: dict = {}

    def run(p: MLP, tol: float, max_iter: int) -> tuple[torch.Tensor, int]:
        if (tol, max_iter) not in cache:
            cache[(tol, max_iter)] = torchdeq_layer(solver, tol, max_iter)
        z_out, info = cache[(tol, max_iter)](p.f, p.z0())
        return z_out[-1], int(info["nstep"].max())

    return run


# --- measurement --------------------------------------------------------------------------------


def saved_bytes(run: Callable, p: MLP, n: int) -> int:
    """Bytes autograd holds for backward (each storage once, parameters and inputs left out)."""
    skip = {t.untyped_storage().data_ptr() for t in [*p.p32, p.x32]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run(p, 0.0, n)
    return sum(seen.values())


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable) -> tuple[Any, float]:
    _sync()
    t0 = time.perf_counter()
    out = fn()
    _sync()
    return out, 1e3 * (time.perf_counter() - t0)


def quartiles(v: list[float]) -> str:
    if len(v) < 2:
        return f"{v[0]:.3g}"
    q = statistics.quantiles(sorted(v), n=4, method="inclusive")
    return f"{statistics.median(v):.3g} [{q[0]:.3g}–{q[2]:.3g}]"


def bench(p: MLP, methods: dict[str, Callable], tol: float, max_iter: int, reps: int) -> list[str]:
    ref = p.reference()
    den = sum(float(r.pow(2).sum()) for r in ref) ** 0.5
    rows: dict[str, dict[str, Any]] = {}
    for label, run in methods.items():
        try:
            for _ in range(2):  # warm-up
                p.calls = 0
                z, it = run(p, tol, max_iter)
                nfe = p.calls
                grads = autograd.grad(p.loss(z), p.p32)
            err = sum(float((g.double() - r).pow(2).sum()) for g, r in zip(grads, ref)) ** 0.5 / den
            saved = [saved_bytes(run, p, n) for n in (10, 20)]
            rows[label] = {"it": it, "nfe": nfe, "err": err, "saved": saved, "fwd": [], "bwd": []}
        except Exception as exc:  # noqa: BLE001
            rows[label] = {"error": f"{type(exc).__name__}: {exc}"[:120]}
    zs = ref_z = p.z0()
    with torch.no_grad():  # the state at the solution, for the bare f timing
        for _ in range(2000):
            ref_z = p.f(zs)
            if float((ref_z - zs).norm()) < 1e-6 * float(ref_z.norm()):
                break
            zs = ref_z
    f_ms: list[float] = []
    live = [k for k in rows if "error" not in rows[k]]
    for rep in range(reps):
        with torch.no_grad():
            _, t = timed(lambda: [p.f(zs) for _ in range(50)])
            f_ms.append(t / 50)
        shift = rep % max(1, len(live))
        for label in live[shift:] + live[:shift]:
            run = methods[label]
            (z, _), tf = timed(lambda run=run: run(p, tol, max_iter))
            _, tb = timed(lambda z=z: autograd.grad(p.loss(z), p.p32))
            rows[label]["fwd"].append(tf)
            rows[label]["bwd"].append(tb)
    t_f = statistics.median(f_ms)
    med = {k: (statistics.median(r["fwd"]), statistics.median(r["bwd"])) for k, r in rows.items() if "error" not in r}
    td = [k for k in med if k.startswith("torchdeq")]
    td_best = min(td, key=lambda k: med[k][0]) if td else None
    hand = "hand loop (question)"
    out = [
        f"### {p.name}: batch {p.batch}, dim {p.dim}, ‖W‖ = {p.rho}; one bare f call {quartiles(f_ms)} ms",
        "",
        "| method | iters | f evals | fwd ms [IQR] | limit ms | fwd/limit | bwd ms [IQR] | saved KiB n / 2n "
        "| grad rel err | fwd ÷ TD best | fwd ÷ hand | bwd ÷ hand |",
        "|" + "---|" * 12,
    ]
    for label, r in rows.items():
        if "error" in r:
            out.append(f"| {label} | error: {r['error']} |" + " |" * 10)
            continue
        fwd, bwd = med[label]
        limit = r["nfe"] * t_f
        ratio_td = f"{fwd / med[td_best][0]:.2f}" if td_best else "—"
        out.append(
            f"| {label} | {r['it']} | {r['nfe']} | {quartiles(r['fwd'])} | {limit:.3g} | {fwd / limit:.2f} "
            f"| {quartiles(r['bwd'])} | {r['saved'][0] / 1024:.0f} / {r['saved'][1] / 1024:.0f} | {r['err']:.1e} "
            f"| {ratio_td} | {fwd / med[hand][0]:.2f} | {bwd / med[hand][1]:.2f} |"
        )
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run of the script itself
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; this check needs a GPU.", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    t0 = time.perf_counter()
    solvers = implicit.available_solvers()
    adjoint = "gmres" if "gmres" in implicit.available_adjoints() else "neumann"
    methods: dict[str, Callable] = {}
    for s in ("fixed_point", "anderson", "broyden"):
        if s in solvers:
            methods[f"implicit {s} + {adjoint}"] = implicit_method(s, adjoint)
    if adjoint != "neumann":
        methods["implicit fixed_point + neumann"] = implicit_method("fixed_point", "neumann")
    for s in ("fixed_point_iter", "anderson"):
        m = torchdeq_method(s)
        if m is not None:
            methods[f"torchdeq {s}"] = m
    methods["hand loop (question)"] = hand_loop
    problems = [MLP("mlp_fast", 0.5, 64, 512, dev), MLP("mlp_slow", 0.95, 64, 512, dev)]
    if dev.type == "cuda":
        problems += [MLP("mlp_fast_large", 0.5, 1024, 2048, dev), MLP("mlp_slow_large", 0.95, 1024, 2048, dev)]
    lines = [
        "# GPU check",
        "",
        f"- device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu (dry run)'}; torch {torch.__version__}; implicit {implicit.__version__}; "
        f"torchdeq {'present' if any(k.startswith('torchdeq') for k in methods) else 'not installed'}",
        f"- tol = {args.tol:g}, max_iter = {args.max_iter}, float32, {args.reps} round-robin rounds (medians [IQR]).",
        "- `limit ms` = f evals × one bare f call under no_grad; saved bytes at n = 10 and 2n = 20 iterations.",
        "",
    ]
    for p in problems:
        lines += bench(p, methods, args.tol, args.max_iter, args.reps)
        print(f"[{time.perf_counter() - t0:5.0f}s] {p.name} done", file=sys.stderr, flush=True)
    text = "\n".join(lines) + f"\nTotal {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
