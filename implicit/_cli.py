"""The command line: ``python -m implicit demo`` and ``python -m implicit solvers``.

Both commands read the registry, so solvers and adjoints added by third-party
packages (entry points ``implicit.solvers`` / ``implicit.adjoints``) are run
and listed like the built-in ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any, TextIO

import torch

from . import __version__
from ._demo import CaseResult, DemoProblem, Reference, default_pairs, make_problem, run_demo
from ._registry import _GROUPS, RegistryError, available_adjoints, available_solvers, get_adjoint, get_solver

__all__ = ["build_parser", "describe_plugins", "main", "plot_convergence"]

PLOT_MISSING = (
    "--plot needs matplotlib, which is not installed; install it with `pip install matplotlib` "
    "(or `pip install torch-implicit[plot]`), or leave out --plot"
)

# A gradient error below this counts as exact in --check (the demo solves to tol=1e-10).
CHECK_GRAD_TOL = 1e-6


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m implicit``."""
    parser = argparse.ArgumentParser(
        prog="python -m implicit",
        description=(
            "implicit: solve F(z*) = 0 or z* = f(z*) over dicts of tensors and differentiate "
            "through the solution with the implicit function theorem."
        ),
    )
    parser.add_argument("--version", action="version", version=f"implicit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="solve a two-variable equilibrium with every registered solver and adjoint",
        description=(
            "Solve the equilibrium (x*, y*) = f(x*, y*) (x of size 3, y of size 5, a batch of samples, "
            "float64, coupled through a random contraction, f closing over its parameters) with every "
            "registered solver and adjoint, and compare each gradient with an exact reference computed "
            "from the dense Jacobian. By default every solver runs with the default adjoint and every "
            "adjoint with the default solver; --grid runs every pair. Progress goes to stderr, the table "
            "to stdout."
        ),
    )
    demo.add_argument("--grid", action="store_true", help="run every solver with every adjoint")
    demo.add_argument("--solvers", metavar="NAMES", help="comma-separated solver names (default: all registered)")
    demo.add_argument("--adjoints", metavar="NAMES", help="comma-separated adjoint names (default: all registered)")
    demo.add_argument("--batch", type=int, default=4, help="number of samples (default: %(default)s)")
    demo.add_argument(
        "--contraction",
        type=float,
        default=0.9,
        help="spectral norm of the coupling matrix; below 1 makes f a contraction (default: %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the random parameters (default: %(default)s)")
    demo.add_argument(
        "--tol", type=float, default=1e-10, help="relative tolerance of the solves (default: %(default)g)"
    )
    demo.add_argument("--max-iter", type=int, default=300, help="most forward iterations (default: %(default)s)")
    demo.add_argument(
        "--repeat", type=int, default=3, help="timed runs per case; the best time is shown (default: %(default)s)"
    )
    demo.add_argument("--plot", metavar="FILE.png", help="write a convergence plot (residual vs iteration per solver)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    demo.add_argument(
        "--check",
        action="store_true",
        help=f"exit with status 1 unless every non-approximate case is ok with gradient error below {CHECK_GRAD_TOL:g}",
    )
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    solvers = sub.add_parser(
        "solvers",
        help="list the registered solvers and adjoints with their options",
        description=(
            "List every registered forward solver and adjoint solver, third-party plugins included, with "
            "the options their constructors take (solver_options / adjoint_options) and the defaults."
        ),
    )
    solvers.add_argument("--json", action="store_true", help="print the listing as JSON")
    return parser


# ----------------------------------------------------------------------------- solvers


def _origins(kind: str) -> dict[str, str]:
    """Entry-point names of one group mapped to ``"<distribution> <version>"``."""
    out = {}
    for ep in entry_points(group=_GROUPS[kind]):
        dist = getattr(ep, "dist", None)
        out[ep.name] = f"{dist.metadata['Name']} {dist.version}" if dist is not None else ep.value
    return out


def _summary(cls: type) -> str:
    from .adjoints.from_solver import SolverAdjoint

    if issubclass(cls, SolverAdjoint):
        return f"the forward solver {cls.solver_class.name!r} run on the adjoint equation x = M x + b"
    doc = (cls.__doc__ or "").strip()
    line = doc.split("\n\n")[0].replace("\n", " ") if doc else ""
    return " ".join(line.replace("``", "`").split())


def _default_repr(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def describe_plugins() -> dict[str, list[dict[str, Any]]]:
    """Every registered solver and adjoint with its class, origin and options.

    Returns:
        ``{"solvers": [...], "adjoints": [...]}``; each entry has ``name``,
        ``class``, ``origin`` (``"built-in"`` or the distribution that
        registered it), ``summary``, ``approximate`` (adjoints) and
        ``options``, a list of ``{"name", "type", "default"}`` from the
        dataclass fields of the class.
    """
    from .adjoints.from_solver import SolverAdjoint

    out: dict[str, list[dict[str, Any]]] = {}
    solver_origins = _origins("solver")
    for kind, names, get in (
        ("solver", available_solvers(), get_solver),
        ("adjoint", available_adjoints(), get_adjoint),
    ):
        origins = _origins(kind)
        entries = []
        for name in names:
            cls = get(name)
            module = cls.__module__
            # A forward solver serving as an adjoint comes from wherever the solver does.
            source = cls.solver_class if issubclass(cls, SolverAdjoint) else cls
            if source.__module__ == "implicit" or source.__module__.startswith("implicit."):
                origin = "built-in"
            else:
                origin = (origins if source is cls else solver_origins).get(name, f"registered by {source.__module__}")
            fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
            entry: dict[str, Any] = {
                "name": name,
                "class": f"{module}.{cls.__qualname__}",
                "origin": origin,
                "summary": _summary(cls),
                "options": [
                    {"name": f.name, "type": str(getattr(f.type, "__name__", f.type)), "default": _default_repr(f)}
                    for f in fields
                    if f.init
                ],
            }
            if kind == "adjoint":
                entry["approximate"] = bool(getattr(cls, "approximate", False))
                entry["symmetric"] = bool(getattr(cls, "symmetric", False))
            entries.append(entry)
        out[f"{kind}s"] = entries
    return out


def _print_plugins(info: dict[str, list[dict[str, Any]]], out: TextIO) -> None:
    for kind, title, keyword in (
        ("solvers", "Forward solvers", "solver"),
        ("adjoints", "Adjoint solvers", "adjoint"),
    ):
        entries = info[kind]
        print(f"{title} ({len(entries)}): implicit.solve(..., {keyword}=NAME, {keyword}_options={{...}})", file=out)
        for e in entries:
            flags = [e["origin"]]
            if e.get("approximate"):
                flags.append("approximate: not the implicit gradient")
            if e.get("symmetric"):
                flags.append("symmetric Jacobians only: argmin and least-squares problems")
            print(f"\n  {e['name']}  [{'; '.join(flags)}]  {e['class']}", file=out)
            if e["summary"]:
                print(f"      {e['summary']}", file=out)
            if e["options"]:
                width = max(len(f"{o['name']}: {o['type']}") for o in e["options"])
                for o in e["options"]:
                    print(f"      {(o['name'] + ': ' + o['type']).ljust(width)} = {o['default']}", file=out)
            else:
                print("      (no options)", file=out)
        print(file=out)


# ----------------------------------------------------------------------------- demo


def _fmt_int(v: int | None) -> str:
    return "-" if v is None else str(v)


def _fmt_ms(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.1f}"


def _fmt_sci(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1e}"


COLUMNS = (
    ("solver", "<"),
    ("adjoint", "<"),
    ("status", "<"),
    ("iters", ">"),
    ("f evals", ">"),
    ("adj iters", ">"),
    ("forward ms", ">"),
    ("backward ms", ">"),
    ("residual", ">"),
    ("grad error", ">"),
)


def format_table(rows: Sequence[CaseResult]) -> str:
    """The results as an aligned text table, one line per case."""
    cells = [
        [
            r.solver,
            r.adjoint,
            r.status,
            _fmt_int(r.iterations),
            _fmt_int(r.nfe),
            _fmt_int(r.adjoint_iterations),
            _fmt_ms(r.forward_ms),
            _fmt_ms(r.backward_ms),
            _fmt_sci(r.residual),
            _fmt_sci(r.grad_error),
        ]
        for r in rows
    ]
    widths = [max([len(name)] + [len(c[i]) for c in cells]) for i, (name, _) in enumerate(COLUMNS)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(w) if a == "<" else v.rjust(w) for v, w, (_, a) in zip(values, widths, COLUMNS)]
        return "  ".join(parts).rstrip()

    out = [line([name for name, _ in COLUMNS]), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def _notes(rows: Sequence[CaseResult]) -> list[str]:
    notes = []
    approx = sorted({r.adjoint for r in rows if r.status == "approx"})
    if approx:
        notes.append(
            f"{', '.join(approx)}: approximate adjoint (Jacobian-free); its gradient differs from the implicit "
            "gradient by design"
        )
    symmetric = sorted({r.adjoint for r in rows if r.status == "symmetric"})
    if symmetric:
        notes.append(
            f"{', '.join(symmetric)}: adjoint for symmetric Jacobians (argmin and least-squares problems); "
            "this equilibrium's Jacobian is not symmetric, so its gradient is not judged against the reference"
        )
    for r in rows:
        for m in r.messages:
            notes.append(f"{r.solver} + {r.adjoint}: {m}")
    return notes


def _header(demo: DemoProblem, ref: Reference, args: argparse.Namespace) -> str:
    return "\n".join(
        [
            f"implicit demo: (x*, y*) = f(x*, y*); x of size {demo.nx}, y of size {demo.ny}, batch {demo.batch}, "
            f"float64, coupling of spectral norm {args.contraction:g}, seed {args.seed}",
            f"reference: Newton's method and the implicit function theorem with the dense Jacobian "
            f"(residual {ref.residual:.1e}); gradient of a scalar loss w.r.t. {', '.join(demo.params)}",
            f"tol={args.tol:g}, max_iter={args.max_iter}; times are the best of {args.repeat} run(s); "
            "residual = largest per-sample |f(z) - z|; grad error = |g - g_ref| / |g_ref|",
        ]
    )


class _Progress:
    """Progress of the demo on stderr: one rewritten line on a terminal, plain lines elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def __call__(self, i: int, n: int, row: CaseResult | None, label: str) -> None:
        head = f"[{i + 1:>{len(str(n))}}/{n}] {label}"
        if row is None:
            if self.tty:
                self.stream.write(f"\r\033[K{head} ...")
                self.stream.flush()
            return
        done = f"{head}: {row.status} ({_fmt_ms(row.forward_ms)} + {_fmt_ms(row.backward_ms)} ms)"
        if self.tty:
            self.stream.write(f"\r\033[K{done}" + ("\n" if i + 1 == n else ""))
        else:
            self.stream.write(done + "\n")
        self.stream.flush()


def plot_convergence(rows: Sequence[CaseResult], path: str, title: str = "") -> None:
    """Residual vs iteration, one line per forward solver, written to ``path``.

    Args:
        rows: Demo results; the first row of each solver gives its history.
        path: The image file (format from its suffix, e.g. ``.png``).
        title: The figure title.

    Raises:
        ModuleNotFoundError: when matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for r in rows:
        if r.solver in seen or not r.history:
            continue
        seen.add(r.solver)
        hist = [max(h, 1e-300) for h in r.history]
        ax.semilogy(range(len(hist)), hist, marker=".", label=f"{r.solver} ({r.status})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("largest per-sample residual |f(z) - z|")
    if title:
        ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if seen:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def _run_demo_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(f"error: {PLOT_MISSING}", file=err)
        return 2
    for flag, value, low in (
        ("--batch", args.batch, 1),
        ("--repeat", args.repeat, 1),
        ("--max-iter", args.max_iter, 0),
    ):
        if value < low:
            print(f"error: {flag} must be at least {low}; got {value}", file=err)
            return 2
    solvers, adjoints = _names(args.solvers), _names(args.adjoints)
    try:
        for n in solvers or ():
            get_solver(n)
        for n in adjoints or ():
            get_adjoint(n)
        demo = make_problem(batch=args.batch, contraction=args.contraction, seed=args.seed)
    except (RegistryError, ValueError) as exc:
        print(f"error: {exc}", file=err)
        return 2
    pairs = default_pairs(solvers, adjoints, grid=args.grid)
    progress = None if args.quiet else _Progress(err)
    rows, ref = run_demo(pairs, demo=demo, tol=args.tol, max_iter=args.max_iter, repeat=args.repeat, progress=progress)

    if args.json:
        payload = {
            "problem": {
                "nx": demo.nx,
                "ny": demo.ny,
                "batch": demo.batch,
                "contraction": args.contraction,
                "seed": args.seed,
                "tol": args.tol,
                "max_iter": args.max_iter,
            },
            "reference_residual": ref.residual,
            "results": [dataclasses.asdict(r) for r in rows],
        }
        print(json.dumps(payload, indent=2, default=str), file=out)
    else:
        print(_header(demo, ref, args), file=out)
        print(file=out)
        print(format_table(rows), file=out)
        notes = _notes(rows)
        if notes:
            print("\nnotes:", file=out)
            for n in notes:
                print(f"  - {n}", file=out)

    if args.plot:
        title = f"(x*, y*) = f(x*, y*): x in R^{demo.nx}, y in R^{demo.ny}, batch {demo.batch}"
        plot_convergence(rows, args.plot, title)
        print(f"wrote {args.plot}", file=err)

    if args.check:
        bad = [
            r
            for r in rows
            if r.status not in ("approx", "symmetric") and (r.status != "ok" or not r.grad_error <= CHECK_GRAD_TOL)
        ]
        if bad:
            print(f"check failed for: {', '.join(f'{r.solver} + {r.adjoint} ({r.status})' for r in bad)}", file=err)
            return 1
    return 0


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``python -m implicit`` with ``argv`` (``sys.argv[1:]`` by default).

    Args:
        argv: The arguments after the program name.
        stdout: Where the results go (``sys.stdout`` by default).
        stderr: Where progress and errors go (``sys.stderr`` by default).

    Returns:
        The exit status: 0 on success, 1 when ``demo --check`` fails, 2 for a usage error.
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(out)
        return 0
    if args.command == "solvers":
        info = describe_plugins()
        if args.json:
            print(json.dumps(info, indent=2), file=out)
        else:
            _print_plugins(info, out)
        return 0
    with torch.random.fork_rng(devices=[]):
        return _run_demo_command(args, out, err)
