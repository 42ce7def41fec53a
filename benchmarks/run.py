"""Benchmark implicit against torchdeq, the question's hand loop, scipy and unrolled backprop.

Run from the repository root::

    python -m benchmarks.run                 # full CPU run, writes benchmarks/RESULTS.md
    python -m benchmarks.run --quick         # smoke run on small problems
    python benchmarks/run.py --device cuda --threads 2 --out /tmp/results.md

All methods run in one process on the same problems, tolerance and iteration
limit; timings are medians over round-robin repeats (every method once per
round, in rotating order), with the interquartile range.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import torch

import implicit

from . import methods as M
from . import problems as P
from .measure import SavedBytes, Series, describe_machine, load_average, sync, timed

# -----------------------------------------------------------------------------------------


@dataclass
class Row:
    method: M.Method
    problem: P.Problem | None = None
    skip: str | None = None
    error: str | None = None
    iterations: float = float("nan")
    nfe: float = float("nan")  # evaluations of f per forward, in batch-equivalents
    calls: int = 0  # raw calls of the map (per-sample calls for scipy)
    converged: bool = False
    residual: float = float("nan")
    grad_err: float | None = None
    bwd_iters: float | None = None
    saved: list[int] = field(default_factory=list)  # beyond parameters and inputs, each storage once
    saved_raw: list[int] = field(default_factory=list)  # plain sum over packed tensors
    fwd: Series = field(default_factory=Series)
    bwd: Series = field(default_factory=Series)
    stride: int = 1
    cost: float = 0.0  # seconds of the first forward + backward
    limit_ms: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.skip is None and self.error is None

    @property
    def label(self) -> str:
        return self.method.label


@dataclass
class ProblemResult:
    spec: P.Spec
    rows: list[Row]
    f_ms: dict[str, Series]
    reference_s: float
    spectrum: P.Spectrum | None = None


def _err(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return msg[:160]


def bench_problem(
    spec: P.Spec, methods: list[M.Method], args: argparse.Namespace, device: torch.device
) -> ProblemResult:
    t0 = time.perf_counter()
    ref = P.reference(spec)
    ref_s = time.perf_counter() - t0
    probs: dict[torch.dtype, P.Problem] = {}

    def problem_for(m: M.Method) -> P.Problem:
        if m.dtype not in probs:
            probs[m.dtype] = P.Problem(spec, m.dtype, device)
        return probs[m.dtype]

    rows = [Row(m) for m in methods]
    tol, max_iter = args.tol, args.max_iter
    # 1. accuracy pass (also the warm-up): iterations, f evaluations, residual, gradient error
    for row in rows:
        m = row.method
        prob = row.problem = problem_for(m)
        reason = m.available(prob)
        if reason is not None:
            row.skip = reason
            continue
        try:
            m.prepare(prob, ref)
            prob.calls = 0
            out, tf = timed(lambda m=m, prob=prob: m.forward(prob, tol, max_iter), device)
            row.calls = prob.calls
            row.iterations, row.converged = out.iterations, out.converged
            batch = prob.flatten(prob.z0()).shape[0]
            row.nfe = prob.calls / batch if isinstance(m, M.Scipy) else prob.calls
            row.residual = prob.relative_residual(out.z)
            tb = 0.0
            if m.differentiable:
                grads, tb = timed(lambda out=out, prob=prob: torch.autograd.grad(prob.loss(out.z), prob.params), device)
                row.grad_err = ref.error(list(grads))
                row.bwd_iters = m.backward_iterations(out)
            del out
            row.cost = tf + tb
            if row.cost > args.row_budget:  # too slow to repeat: this first run is its only timing
                row.fwd.add(1e3 * tf)
                if m.differentiable:
                    row.bwd.add(1e3 * tb)
        except Exception as exc:  # noqa: BLE001 - a failing row is reported, not fatal
            row.error = _err(exc)
    # 2. bytes saved for backward at n and 2n iterations (tol = 0: every method runs them all)
    for row in rows:
        if not row.ok or not row.method.differentiable or row.cost > 4 * args.row_budget:
            continue
        assert row.problem is not None
        try:
            keep = [*row.problem.params, *P.tensors(row.problem.inputs)]
            for n in (args.mem_iters, 2 * args.mem_iters):
                with SavedBytes(keep) as sb:
                    out = row.method.forward(row.problem, 0.0, n)
                row.saved.append(sb.extra)
                row.saved_raw.append(sb.total)
                del out
        except Exception as exc:  # noqa: BLE001
            row.saved = []
            row.error = (row.error or "") + f" [memory pass: {_err(exc)}]"
    # 3. timing: round-robin repeats
    active = [r for r in rows if r.ok and r.cost <= args.row_budget]
    f_ms = time_rows(active, probs, ref, args, device)
    for row in rows:
        if not row.ok:
            continue
        key = "sample" if isinstance(row.method, M.Scipy) else str(row.method.dtype)
        row.limit_ms = row.calls * f_ms[key].median
    return ProblemResult(spec, rows, f_ms, ref_s, ref.spectrum)


def _run_once(row: Row, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    prob = row.problem
    assert prob is not None
    out, tf = timed(lambda: row.method.forward(prob, args.tol, args.max_iter), device)
    tb = float("nan")
    if row.method.differentiable:
        _, tb = timed(lambda out=out: torch.autograd.grad(prob.loss(out.z), prob.params), device)
    del out
    return tf, tb


def time_rows(
    active: list[Row],
    probs: dict[torch.dtype, P.Problem],
    ref: P.Reference,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Series]:
    """Round-robin timing; also the median time of one bare ``f`` call under ``no_grad``."""
    reps = args.reps
    # thin out the slowest rows: at most row_budget seconds each, at least 3 rounds
    for row in active:
        n_row = max(3, min(reps, int(args.row_budget / max(row.cost, 1e-9))))
        row.stride = max(1, math.ceil(reps / n_row))
    bare: dict[str, tuple[Any, Any]] = {}
    for dtype, prob in probs.items():
        z = P._to(ref.z_star, dtype, device)  # noqa: SLF001
        bare[str(dtype)] = (prob.f_uncounted, z)
    if torch.float64 in probs:
        prob64 = probs[torch.float64]
        v = prob64.flatten(P._to(ref.z_star, torch.float64, device))[:1]
        bare["sample"] = (
            lambda s: prob64.flatten(prob64.spec.fmap(prob64.unflatten(s), prob64.params, prob64.inputs[:1])),
            v,
        )
    f_ms = {k: Series() for k in bare}
    calls = {}
    with torch.no_grad():
        for k, (fn, z) in bare.items():
            _, t = timed(lambda fn=fn, z=z: [fn(z) for _ in range(5)], device)
            calls[k] = max(5, math.ceil(0.003 / max(t / 5, 1e-7)))
    for rep in range(reps):
        gc.collect()
        with torch.no_grad():
            for k, (fn, z) in bare.items():
                _, t = timed(lambda fn=fn, z=z, n=calls[k]: [fn(z) for _ in range(n)], device)
                f_ms[k].add(1e3 * t / calls[k])
        shift = rep % max(1, len(active))
        for row in active[shift:] + active[:shift]:
            if rep % row.stride:
                continue
            try:
                tf, tb = _run_once(row, args, device)
            except Exception as exc:  # noqa: BLE001
                row.error = _err(exc)
                continue
            row.fwd.add(1e3 * tf)
            if not math.isnan(tb):
                row.bwd.add(1e3 * tb)
        if args.verbose:
            print(f"    rep {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    return f_ms


# --- per-iteration overhead on a 2-dimensional problem -----------------------------------------


@dataclass
class OverheadRow:
    label: str
    per_iter: Series = field(default_factory=Series)
    iterations: int = 0
    ops_per_iter: float = float("nan")
    error: str | None = None


def count_ops(run: Any) -> int:
    """Top-level ATen operator calls made by ``run()`` (each would be a kernel launch on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    n = 0
    for e in prof.events():
        parent = e.cpu_parent
        if e.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::")):
            n += 1
    return n


def bench_overhead(args: argparse.Namespace, device: torch.device) -> tuple[list[OverheadRow], Series, int]:
    """Time per iteration on ``(x, y) = f(x, y)`` with one unknown each (the map costs almost nothing)."""
    dt = torch.float64
    k = args.overhead_iters

    def f(z: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = z["x"], z["y"]
        return {"x": torch.tanh(0.7 * x - 0.7 * y + 0.1), "y": torch.tanh(0.7 * x + 0.7 * y - 0.2)}

    def z0() -> dict[str, torch.Tensor]:
        return {"x": torch.zeros(1, dtype=dt, device=device), "y": torch.zeros(1, dtype=dt, device=device)}

    def f_flat(v: torch.Tensor) -> torch.Tensor:
        out = f({"x": v[0:1], "y": v[1:2]})
        return torch.cat([out["x"], out["y"]])

    rows: list[OverheadRow] = []
    runners: list[tuple[OverheadRow, Any]] = []
    primary = "gmres" if "gmres" in implicit.available_adjoints() else "neumann"
    for s in implicit.available_solvers():
        row = OverheadRow(f"implicit {s}")

        def run(s: str = s, row: OverheadRow = row) -> int:
            sol = implicit.solve(
                implicit.ImplicitProblem.fixed_point(f),
                z0(),
                solver=s,
                adjoint=primary,
                tol=0.0,
                atol=0.0,
                max_iter=k,
                on_failure="ignore",
            )
            return sol.stats.iterations

        rows.append(row)
        runners.append((row, run))
    hand = OverheadRow("hand loop (question)")
    rows.append(hand)
    runners.append(
        (
            hand,
            lambda: len(M.forward_iteration(f_flat, torch.zeros(2, dtype=dt, device=device), max_iter=k, tol=0.0)[1]),
        )
    )
    try:
        from torchdeq.solver import get_solver as td_get

        for name in ("fixed_point_iter", "anderson", "broyden"):
            row = OverheadRow(f"torchdeq {name}")
            solver = td_get(name)

            def run_td(solver: Any = solver) -> int:
                _, _, info = solver(
                    f_flat, torch.zeros(2, dtype=dt, device=device), max_iter=k, tol=0.0, stop_mode="rel"
                )
                return k

            rows.append(row)
            runners.append((row, run_td))
    except ImportError:
        pass
    t_f = Series()
    zf = z0()
    with torch.no_grad():
        for row, run in runners:  # warm-up, then a count of operator calls (noise-free, unlike times)
            try:
                row.iterations = run()
                row.ops_per_iter = count_ops(run) / max(1, row.iterations)
            except Exception as exc:  # noqa: BLE001
                row.error = _err(exc)
        f_ops = count_ops(lambda: f(zf))
        for rep in range(args.overhead_reps):
            _, t = timed(lambda: [f(zf) for _ in range(200)], device)
            t_f.add(1e6 * t / 200)
            live = [(r, fn) for r, fn in runners if r.error is None]
            shift = rep % max(1, len(live))
            for row, run in live[shift:] + live[:shift]:
                iters, t = timed(run, device)
                row.per_iter.add(1e6 * t / max(1, iters))
    for row in rows:
        row.ops_per_iter -= f_ops
    return rows, t_f, k


# --- report -----------------------------------------------------------------------------------


def _ms(s: Series) -> str:
    if not len(s):
        return "—"
    lo, hi = s.quartiles()
    return f"{s.median:.3g} [{lo:.3g}–{hi:.3g}]"


def _num(x: float | None, fmt: str = "{:.3g}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return fmt.format(x)


def _kib2(v: list[int]) -> str:
    return f"{v[0] / 1024:.0f} → {v[1] / 1024:.0f}"


def _kib(rows: Row) -> str:
    if len(rows.saved) != 2:
        return "—"
    return f"{rows.saved[0] / 1024:.0f} / {rows.saved[1] / 1024:.0f}"


def _find(rows: list[Row], label: str) -> Row | None:
    for r in rows:
        if r.label == label and r.ok and len(r.fwd):
            return r
    return None


def torchdeq_best(rows: list[Row]) -> Row | None:
    cands = [r for r in rows if r.method.family == "torchdeq" and r.ok and len(r.fwd)]
    conv = [r for r in cands if r.converged] or cands
    return min(conv, key=lambda r: r.fwd.median) if conv else None


def render_problem(res: ProblemResult) -> list[str]:
    rows = res.rows
    td, hand = torchdeq_best(rows), _find(rows, "hand loop (question)")
    lines = [f"### {res.spec.name}: {res.spec.description}", ""]
    f_desc = ", ".join(f"{k.replace('torch.', '')}: {_ms(s)} ms" for k, s in res.f_ms.items())
    lines.append(f"One bare call of f under no_grad ({f_desc}). Reference built in {res.reference_s:.1f} s.")
    if td is not None:
        lines.append(f"Best torchdeq forward: `{td.label}`.")
    if res.spectrum is not None:
        lines.append(res.spectrum.describe())
    lines.append("")
    lines.append(
        "| method | iters | f evals | fwd ms [IQR] | limit ms | fwd/limit | bwd ms [IQR] | bwd iters "
        "| saved KiB n / 2n | grad rel err | residual | fwd ÷ TD best | fwd ÷ hand | bwd ÷ hand | reps |"
    )
    lines.append("|" + "---|" * 15)
    for r in rows:
        if r.skip is not None:
            continue
        if r.error is not None and not len(r.fwd):
            lines.append(f"| {r.label} | error: {r.error} |" + " |" * 13)
            continue
        fwd_td = r.fwd.median / td.fwd.median if td and len(r.fwd) else None
        fwd_h = r.fwd.median / hand.fwd.median if hand and len(r.fwd) else None
        bwd_h = r.bwd.median / hand.bwd.median if hand and len(r.bwd) and len(hand.bwd) else None
        it = _num(r.iterations, "{:.0f}" if float(r.iterations).is_integer() else "{:.1f}")
        if not r.converged:
            it += " (not conv.)"
        lines.append(
            f"| {r.label} | {it} | {_num(r.nfe, '{:.0f}' if float(r.nfe).is_integer() else '{:.1f}')} | {_ms(r.fwd)} "
            f"| {_num(r.limit_ms)} | {_num(r.fwd.median / r.limit_ms if len(r.fwd) else None, '{:.2f}')} "
            f"| {_ms(r.bwd)} | {_num(r.bwd_iters, '{:.0f}')} | {_kib(r)} | {_num(r.grad_err, '{:.1e}')} "
            f"| {_num(r.residual, '{:.1e}')} | {_num(fwd_td, '{:.2f}')} | {_num(fwd_h, '{:.2f}')} "
            f"| {_num(bwd_h, '{:.2f}')} | {len(r.fwd)} |"
        )
    skipped = [f"`{r.label}` ({r.skip})" for r in rows if r.skip is not None]
    if skipped:
        lines += ["", "Not run here: " + "; ".join(skipped) + "."]
    errors = [f"`{r.label}`: {r.error}" for r in rows if r.error is not None and len(r.fwd)]
    if errors:
        lines += ["", "Errors during some repeats: " + "; ".join(errors) + "."]
    return lines + [""]


def _per_iteration(r: Row) -> str:
    """What a forward pass spends per iteration beyond its evaluations of f."""
    extra = 1e3 * (r.fwd.median - r.limit_ms) / max(1.0, r.iterations)
    return f"{extra:.0f} µs per iteration beyond f ({1e3 * r.limit_ms / r.nfe:.0f} µs), {r.iterations:.0f} iterations"


def _backward_split(r: Row, hand: Row) -> str:
    """Backward iterations and the time per iteration (one vector-Jacobian product each, plus the final one)."""
    if r.bwd_iters is None or hand.bwd_iters is None:
        return ""
    a, h = r.bwd.median / (r.bwd_iters + 1), hand.bwd.median / (hand.bwd_iters + 1)
    return f"{r.bwd_iters:.0f} vs {hand.bwd_iters:.0f} iterations; per iteration {a:.2f} vs {h:.2f} ms ({a / h:.2f}×)"


def check_targets(results: list[ProblemResult], overhead: tuple[list[OverheadRow], Series, int] | None) -> list[str]:
    """The targets table; a missed target's last column holds the measured split that explains it."""
    lines = ["| target | measured | verdict | where the time goes (missed targets) |", "|---|---|---|---|"]

    def verdict(ok: bool | None, why: str = "") -> str:
        if ok is None:
            return "n/a |"
        return "met |" if ok else f"**missed** | {why}"

    primary = "gmres" if "gmres" in implicit.available_adjoints() else "neumann"
    for res in results:
        name, rows = res.spec.name, res.rows
        if name == "two_variable":
            continue
        for solver, bound in (("fixed_point", 1.10), ("anderson", 1.3), ("broyden", 1.3)):
            r = _find(rows, f"implicit {solver} + {primary}")
            if r is None:
                lines.append(f"| {name}: {solver} fwd/limit ≤ {bound} | not available | n/a |")
                continue
            ratio = r.fwd.median / r.limit_ms
            lines.append(
                f"| {name}: {solver} fwd/limit ≤ {bound} | {ratio:.2f} | {verdict(ratio <= bound, _per_iteration(r))} |"
            )
    if overhead is not None:
        orows, t_f, _ = overhead
        imp = next((r for r in orows if r.label == "implicit fixed_point" and len(r.per_iter)), None)
        hand = next((r for r in orows if r.label.startswith("hand") and len(r.per_iter)), None)
        if imp and hand:
            oi, oh = imp.per_iter.median - t_f.median, hand.per_iter.median - t_f.median
            ops = f"ATen calls per iteration {imp.ops_per_iter:.1f} vs {hand.ops_per_iter:.1f}; the rest is Python"
            lines.append(
                f"| 2-dim problem: fixed_point overhead/iteration ≤ hand loop's | {oi:.1f} µs vs {oh:.1f} µs "
                f"| {verdict(oi <= oh, ops)} |"
            )
    slow = next((r for r in results if r.spec.name == "mlp_slow"), None)
    if slow is not None:
        a = _find(slow.rows, f"implicit anderson + {primary}")
        fp = _find(slow.rows, f"implicit fixed_point + {primary}")
        td = torchdeq_best(slow.rows)
        if a and fp:
            q = a.nfe / fp.nfe
            lines.append(
                f"| mlp_slow: anderson f evals ≤ 0.5 × fixed_point's | {a.nfe:.0f} / {fp.nfe:.0f} = {q:.2f} | {verdict(q <= 0.5)} |"
            )
        if a and td:
            q = a.fwd.median / td.fwd.median
            lines.append(
                f"| mlp_slow: anderson time ≤ 0.6 × best torchdeq ({td.label}) | {q:.2f} | {verdict(q <= 0.6)} |"
            )
    for res in results:
        if not res.spec.fast:
            continue
        a = _find(res.rows, f"implicit anderson + {primary}")
        fp = _find(res.rows, f"implicit fixed_point + {primary}")
        if a and fp:
            q = a.fwd.median / fp.fwd.median
            step = 1e3 * (a.fwd.median - fp.fwd.median * a.nfe / fp.nfe) / max(1.0, a.iterations)
            why = f"{a.iterations:.0f} vs {fp.iterations:.0f} iterations; the mixing step costs {step:.0f} µs"
            if res.spectrum is not None and res.spectrum.complex_share > 0.5:
                why += "; ∂f/∂z's eigenvalues fill a disc, where no acceleration beats Picard"
            lines.append(
                f"| {res.spec.name} (fast): anderson time ≤ 1.1 × fixed_point's | {q:.2f} | {verdict(q <= 1.1, why)} |"
            )
    for res in results:
        hand = _find(res.rows, "hand loop (question)")
        for adj in ("neumann", "gmres"):
            r = _find(res.rows, f"implicit fixed_point + {adj}")
            if r and hand and len(r.bwd) and len(hand.bwd):
                q = r.bwd.median / hand.bwd.median
                lines.append(
                    f"| {res.spec.name}: backward ({adj}) ≤ hand loop's hook | {q:.2f} "
                    f"| {verdict(q <= 1.0, _backward_split(r, hand))} |"
                )
    for res in results:
        if not res.spec.mlp:
            continue
        sp = _find(res.rows, "scipy newton_krylov (per sample, float64)")
        for dtype_label in ("", " (float64)"):
            nk = _find(res.rows, f"implicit newton_krylov + {primary}{dtype_label}")
            if nk and sp:
                q = sp.fwd.median / nk.fwd.median
                lines.append(
                    f"| {res.spec.name}: batched newton_krylov{dtype_label or ' (float32)'} ≥ 5× faster than scipy's "
                    f"| {q:.1f}× | {verdict(q >= 5)} |"
                )
        if sp is not None and _find(res.rows, f"implicit newton_krylov + {primary}") is None:
            lines.append(f"| {res.spec.name}: batched newton_krylov ≥ 5× faster than scipy's | not available | n/a |")
    for res in results:
        fp = next((r for r in res.rows if r.label == f"implicit fixed_point + {primary}" and len(r.saved) == 2), None)
        td = next((r for r in res.rows if r.label == "torchdeq fixed_point_iter" and len(r.saved) == 2), None)
        if fp:
            same = fp.saved[0] == fp.saved[1] and fp.saved_raw[0] == fp.saved_raw[1]
            lines.append(
                f"| {res.spec.name}: saved bytes unchanged n → 2n | {_kib2(fp.saved)} KiB (plain sum "
                f"{_kib2(fp.saved_raw)}) | {verdict(same)} |"
            )
            if td:
                lines.append(
                    f"| {res.spec.name}: saved bytes ≤ torchdeq's | {fp.saved[0] / 1024:.0f} vs {td.saved[0] / 1024:.0f} KiB "
                    f"(plain sum {fp.saved_raw[0] / 1024:.0f} vs {td.saved_raw[0] / 1024:.0f}) "
                    f"| {verdict(fp.saved[0] <= td.saved[0])}"
                    f"{'' if fp.saved_raw[0] <= td.saved_raw[0] else ' plain sum higher: a weight counted once per use'} |"
                )
    return lines


def render_overhead(overhead: tuple[list[OverheadRow], Series, int]) -> list[str]:
    rows, t_f, k = overhead
    hand = next((r for r in rows if r.label.startswith("hand") and len(r.per_iter)), None)
    lines = [
        f"One bare call of f: {_ms(t_f)} µs. {k} iterations per solve (tol = 0), float64, unbatched; "
        "overhead = time per iteration − one f call. The operator count (top-level ATen calls per iteration "
        "minus those of one f call, from torch.profiler) is exact and unaffected by other processes.",
        "",
        "| method | iterations | µs / iteration [IQR] | overhead µs / iteration | ÷ hand loop's overhead "
        "| ATen ops / iteration besides f |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.label} | error: {r.error} | | | | |")
            continue
        ov = r.per_iter.median - t_f.median
        rel = ov / (hand.per_iter.median - t_f.median) if hand else None
        lines.append(
            f"| {r.label} | {r.iterations} | {_ms(r.per_iter)} | {ov:.1f} | {_num(rel, '{:.2f}')} "
            f"| {_num(r.ops_per_iter, '{:.1f}')} |"
        )
    return lines + [""]


def render(
    results: list[ProblemResult],
    overhead: tuple[list[OverheadRow], Series, int] | None,
    args: argparse.Namespace,
    machine: dict[str, str],
    load: tuple[str, str],
    wall: float,
) -> str:
    cmd = "python -m benchmarks.run " + " ".join(args.argv)
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{cmd.strip()}` in {wall / 60:.1f} min.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += [
        f"- load average (1/5/15 min) at start: {load[0]}; at end: {load[1]}. The machine is shared: other "
        "processes may have used the same cores during the run, which widens the spreads below; ratios are "
        "taken between methods measured in the same rounds.",
        f"- implicit solvers registered: {', '.join(implicit.available_solvers())}; adjoints: "
        f"{', '.join(implicit.available_adjoints())}",
        "",
        "## Settings",
        "",
        f"- tol = {args.tol:g} (relative, per sample for implicit; torchdeq `stop_mode='rel'`; the question's loop "
        f"uses its batch-global relative residual), max_iter = {args.max_iter}, float32 unless marked.",
        f"- {args.reps} round-robin rounds; slow rows run every k-th round (the `reps` column; a row whose first forward + backward took over {args.row_budget:g} s is timed by that run alone, reps = 1). Times are medians "
        "with the interquartile range in brackets.",
        "- `f evals`: calls of the map during the forward pass, including the evaluations each method makes to "
        "attach its gradient (scipy: per-sample calls / batch).",
        "- `limit ms` = f evals × the median time of one bare f call under no_grad (for scipy: per-sample calls × "
        "one per-sample float64 call); `fwd/limit` is how close a forward pass gets to doing nothing but f.",
        f"- `saved KiB n / 2n`: bytes autograd saves for backward with exactly n = {args.mem_iters} and "
        f"2n = {2 * args.mem_iters} iterations (tol = 0), from `saved_tensors_hooks`: each packed storage once, "
        "leaving out the parameters and inputs (which exist anyway; the plain sum of numel × element_size over "
        "packed tensors, which counts a weight matrix once per use, is in the targets table).",
        "- `grad rel err`: ‖∇θL − ∇θL_ref‖ / ‖∇θL_ref‖ for L = Σ c ⊙ z*, against a float64 reference (Picard to "
        "1e-13, per-sample dense Jacobian, dense solve); `residual`: max over samples of ‖f(z) − z‖ / ‖z‖ of the "
        "returned state.",
        "- `fwd ÷ TD best`: forward time over the fastest converged torchdeq forward; `÷ hand`: over the question's "
        "hand-written loop (Picard under no_grad + a backward hook iterating g = Jᵀg + grad).",
        "",
        "## Targets",
        "",
    ]
    lines += check_targets(results, overhead)
    lines += ["", "## Results", ""]
    for res in results:
        lines += render_problem(res)
    if overhead is not None:
        lines += ["## Per-iteration overhead on a 2-dimensional problem", ""]
        lines += render_overhead(overhead)
    # The analysis of the targets missed is written by hand (from profiles) and
    # kept beside this script, so that a new run carries it along.
    limits = os.path.join(os.path.dirname(os.path.abspath(__file__)), "LIMITS.md")
    if os.path.exists(limits):
        with open(limits, encoding="utf-8") as fh:
            lines += ["", fh.read().rstrip()]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small problems and few repeats (a smoke run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--out", default=None, help="write the markdown report here (default: print it)")
    p.add_argument("--reps", type=int, default=None, help="round-robin rounds (default 21, quick 3)")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--mem-iters", type=int, default=10, help="n for the saved-bytes columns (also 2n)")
    p.add_argument("--row-budget", type=float, default=None, help="seconds of timing per row (default 20, quick 2)")
    p.add_argument("--problems", default=None, help="comma-separated subset: mlp_fast,mlp_slow,two_variable,conv")
    p.add_argument("--methods", default=None, help="comma-separated substrings of method labels to keep")
    p.add_argument("--overhead-iters", type=int, default=200)
    p.add_argument("--overhead-reps", type=int, default=None)
    p.add_argument("--no-overhead", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.reps is None:
        args.reps = 3 if args.quick else 21
    if args.row_budget is None:
        args.row_budget = 2.0 if args.quick else 20.0
    if args.overhead_reps is None:
        args.overhead_reps = 5 if args.quick else 31
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    machine = describe_machine(device, args.threads)
    load0 = load_average()
    t0 = time.perf_counter()
    specs = P.all_specs(args.quick)
    if args.problems:
        keep = set(args.problems.split(","))
        specs = [s for s in specs if s.name in keep]
    overhead = None
    if not args.no_overhead:
        # First, while the process holds little: the loops timed here allocate small
        # Python objects every iteration, and the garbage collector's passes over a
        # heap full of earlier results would be charged to them.
        print(f"[{time.perf_counter() - t0:6.0f}s] 2-dimensional overhead", file=sys.stderr, flush=True)
        gc.collect()
        overhead = bench_overhead(args, device)
    results = []
    for spec in specs:
        methods = M.all_methods(device)
        if args.methods:
            subs = args.methods.split(",")
            methods = [m for m in methods if any(s in m.label for s in subs) or m.label == "hand loop (question)"]
        print(f"[{time.perf_counter() - t0:6.0f}s] {spec.name}: {len(methods)} methods", file=sys.stderr, flush=True)
        results.append(bench_problem(spec, methods, args, device))
    sync(device)
    text = render(results, overhead, args, machine, (load0, load_average()), time.perf_counter() - t0)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
