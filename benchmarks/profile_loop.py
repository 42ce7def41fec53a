"""Where the time of implicit's solve loop goes, next to the question's hand loop.

Run from the repository root::

    python -m benchmarks.profile_loop                    # 2-dimensional problem, fixed_point
    python -m benchmarks.profile_loop --problem mlp_fast --solver anderson

Prints the time per iteration of each, then a cProfile listing of implicit's
solve sorted by own time (``tottime``), so each line of the loop (map call,
structure checks, monitor, step) shows what it costs per iteration.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import torch

import implicit
from implicit._saved import evaluate_without_saving

from . import methods as M
from . import problems as P


def interleaved(fns: dict[str, Any], rounds: int = 15) -> dict[str, float]:
    """Median µs per call of each function, timed round-robin (each round: every function, ~10 ms each)."""
    counts = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        counts[name] = max(3, min(5000, int(0.01 / max(time.perf_counter() - t0, 1e-7))))
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = counts[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            runs[name].append(1e6 * (time.perf_counter() - t0) / n)
    return {name: sorted(v)[len(v) // 2] for name, v in runs.items()}


def components(f: Any, z0: Any, batched: bool, f_flat: Any, v0: torch.Tensor) -> list[tuple[str, float]]:
    """Each operation one iteration of implicit's Picard loop performs, timed alone.

    Mirrors ``IterativeSolver.solve`` + ``System.map`` + ``Monitor.check`` +
    ``FixedPointIteration.step``; the hand loop's pieces follow for comparison.
    """
    from implicit._monitor import Monitor

    system = implicit.ImplicitProblem.fixed_point(f, batched=batched).bind(z0)
    st = system.structure
    z = st.flatten(z0).clone()
    out = f(st.unflatten(z))
    g = st.flatten(out)
    r = g - z
    mon = Monitor(st, tol=0.0, atol=0.0, max_iter=10**9)
    n = 0 if mon.check(z, r) else 0  # prime the monitor
    del n
    x = v0.clone()
    fx = f_flat(x)
    zu = st.unflatten(z)
    fns = {
        "f(z), z a dict of fresh tensors": lambda: f(z0),
        "f(z), z the views Structure.unflatten makes": lambda: f(zu),
        "Structure.unflatten (split + view per variable)": lambda: st.unflatten(z),
        "Structure.flatten_output (checks + reshape + cat)": lambda: st.flatten_output(out, "the map f"),
        "r = G(z) - z": lambda: g - z,
        "Monitor.check (2 norms, margin, 1 read, history)": lambda: mon.check(z, r),
        "Monitor.freeze": lambda: mon.freeze(z, z),
        "FixedPointIteration.step (z + r)": lambda: z + r,
        "whole System.map(z) (count, unflatten, f, check, flatten)": lambda: system.map(z),
        "hand loop: f_flat(v) (slices + f + cat)": lambda: f_flat(x),
        "hand loop: (f0 - x).norm().item() / (1e-5 + f0.norm().item())": lambda: (
            (fx - x).norm().item() / (1e-5 + fx.norm().item())
        ),
    }
    res = list(interleaved(fns).items())
    return res


def attach_cost(f: Any, z0: Any, prob: P.Problem, solver: str) -> None:
    """A converging solve under no_grad and with grad: the difference is what attaching the IFT costs."""
    ref = P.reference(prob.spec)
    params = prob.params

    def solve() -> Any:
        return implicit.solve(
            implicit.ImplicitProblem.fixed_point(f, batched=True),
            z0,
            solver=solver,
            adjoint="neumann",
            tol=1e-5,
            max_iter=300,
            on_failure="ignore",
        )

    zs = P._to(ref.z_star, torch.float32, torch.device("cpu"))

    def solve_no_grad() -> Any:
        with torch.no_grad():
            return solve()

    def f_no_grad() -> Any:
        with torch.no_grad():
            return f(zs)

    with torch.enable_grad():
        sol = solve()
        torch.autograd.grad(prob.loss(sol.z), params)
        t = interleaved(
            {
                "bare": f_no_grad,
                "graph": lambda: f(zs),
                "ckpt": lambda: torch.utils.checkpoint.checkpoint(f, zs, use_reentrant=False, preserve_rng_state=False),
                "nosave": lambda: evaluate_without_saving(f, zs),
                "ng": solve_no_grad,
                "g": solve,
            }
        )
    bare, t_graph, t_ckpt, t_ng, t_g = t["bare"], t["graph"], t["ckpt"], t["ng"], t["g"]
    t_nosave = t["nosave"]
    it, nfe = sol.stats.iterations, sol.stats.nfe
    print(
        f"\nconverging solve (tol 1e-5): {it} iterations, {nfe} evaluations inside the solver; one bare f {bare:.1f} µs"
    )
    print(
        f"  solve under no_grad          {t_ng:10.1f} µs = {t_ng / (nfe * bare):.3f} x (nfe x bare f); "
        f"overhead {(t_ng - nfe * bare) / max(it, 1):.1f} µs / iteration"
    )
    print(
        f"  solve with grad (+ attach)   {t_g:10.1f} µs; attach costs {t_g - t_ng:.1f} µs = {(t_g - t_ng) / bare:.2f} bare f"
    )
    print(
        f"  f with graph {t_graph:.1f} µs ({t_graph / bare:.2f} bare f); f keeping nothing (the fallback of the attach's inner "
        f"evaluation) {t_nosave:.1f} µs ({t_nosave / bare:.2f} bare f); under torch.utils.checkpoint {t_ckpt:.1f} µs "
        f"({t_ckpt / bare:.2f} bare f)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_loop")
    p.add_argument("--problem", default="2d", help="2d, mlp_fast, mlp_slow, two_variable or conv")
    p.add_argument("--solver", default="fixed_point")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    k = args.iters

    if args.problem == "2d":

        def f(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            x, y = z["x"], z["y"]
            return {"x": torch.tanh(0.7 * x - 0.7 * y + 0.1), "y": torch.tanh(0.7 * x + 0.7 * y - 0.2)}

        dt = torch.float64
        z0 = {"x": torch.zeros(1, dtype=dt), "y": torch.zeros(1, dtype=dt)}
        batched = False

        def f_flat(v: torch.Tensor) -> torch.Tensor:
            out = f({"x": v[0:1], "y": v[1:2]})
            return torch.cat([out["x"], out["y"]])

        v0 = torch.zeros(2, dtype=dt)
    else:
        spec = {s.name: s for s in P.all_specs()}[args.problem]
        prob = P.Problem(spec, torch.float32, torch.device("cpu"))
        f, z0, batched = prob.f_uncounted, prob.z0(), True

        def f_flat(v: torch.Tensor) -> torch.Tensor:
            return prob.flatten(prob.f_uncounted(prob.unflatten(v)))

        v0 = prob.flatten(z0)

    def run_implicit() -> int:
        sol = implicit.solve(
            implicit.ImplicitProblem.fixed_point(f, batched=batched),
            z0,
            solver=args.solver,
            tol=0.0,
            atol=0.0,
            max_iter=k,
            on_failure="ignore",
        )
        return sol.stats.iterations

    def run_hand() -> int:
        return len(M.forward_iteration(f_flat, v0, max_iter=k, tol=0.0)[1])

    with torch.no_grad():
        for _ in range(2):
            run_implicit(), run_hand()
        t_f, t_i, t_h = [], [], []
        for _ in range(9):
            t0 = time.perf_counter()
            for _ in range(50):
                f(z0)
            t_f.append((time.perf_counter() - t0) / 50)
            t0 = time.perf_counter()
            n = run_implicit()
            t_i.append((time.perf_counter() - t0) / n)
            t0 = time.perf_counter()
            n = run_hand()
            t_h.append((time.perf_counter() - t0) / n)
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        print(f"one f call:                 {1e6 * med(t_f):8.1f} µs")
        print(
            f"implicit {args.solver:<12} / iter: {1e6 * med(t_i):8.1f} µs  (overhead {1e6 * (med(t_i) - med(t_f)):.1f})"
        )
        print(f"hand loop          / iter: {1e6 * med(t_h):8.1f} µs  (overhead {1e6 * (med(t_h) - med(t_f)):.1f})")
        if args.problem == "2d" or args.solver == "fixed_point":
            print(
                "\nper-iteration cost of each piece of the fixed_point loop (µs per call, median of 15 round-robin rounds):"
            )
            for name, us in components(f, z0, batched, f_flat, v0):
                print(f"  {name:<58} {us:8.2f}")
        if args.problem != "2d":
            attach_cost(f, z0, prob, args.solver)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            run_implicit()
        prof.disable()
    print(f"\ncProfile of 5 implicit solves x {k} iterations (times in s; divide by {5 * k} per iteration):")
    pstats.Stats(prof).strip_dirs().sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
