"""The command line: ``python -m implicit demo`` and ``python -m implicit solvers``.

Run in-process through ``implicit.__main__.main(argv)``, and once as a real
subprocess. The demo's own reference is checked against the independent dense
reference of ``tests/reference.py``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ADJOINTS, SOLVERS
from reference import ift_grads, picard

import implicit
from implicit import _registry
from implicit.__main__ import main
from implicit._demo import default_pairs, make_problem, reference_solution, run_case

ROOT = Path(__file__).resolve().parents[1]


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["solvers", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m implicit")
    if argv[0] == "demo":
        for flag in ("--plot", "--grid", "--solvers", "--adjoints", "--repeat", "--check"):
            assert flag in text


def test_no_command_prints_help() -> None:
    code, out, _ = _main()
    assert code == 0
    assert "demo" in out and "solvers" in out


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bogus"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# ----------------------------------------------------------------------------- solvers


def _constructor_defaults(cls: type) -> dict[str, str]:
    """Constructor keywords from the signature, defaults read off a default-constructed instance."""
    instance = cls()
    return {name: repr(getattr(instance, name)) for name in inspect.signature(cls).parameters}


def test_solvers_lists_every_registered_name_with_its_options() -> None:
    code, out, _ = _main("solvers", "--json")
    assert code == 0
    info = json.loads(out)
    assert [e["name"] for e in info["solvers"]] == implicit.available_solvers()
    assert [e["name"] for e in info["adjoints"]] == implicit.available_adjoints()
    for kind, get in (("solvers", implicit.get_solver), ("adjoints", implicit.get_adjoint)):
        for entry in info[kind]:
            cls = get(entry["name"])
            listed = {o["name"]: o["default"] for o in entry["options"]}
            assert listed == _constructor_defaults(cls), entry["name"]
            assert entry["class"].endswith(cls.__qualname__)
            if kind == "adjoints":
                assert entry["approximate"] == cls.approximate


def test_solvers_text_lists_names_and_defaults() -> None:
    code, out, _ = _main("solvers")
    assert code == 0
    for name in implicit.available_solvers() + implicit.available_adjoints():
        assert f"\n  {name}  [" in out
    assert "damping: float = 1.0" in out  # fixed_point's option, from its dataclass field
    assert "approximate" in out  # jfb is flagged


# ----------------------------------------------------------------------------- the demo's reference


def test_demo_reference_matches_an_independent_dense_reference() -> None:
    demo = make_problem(batch=3, contraction=0.8, seed=5)
    ref = reference_solution(demo)
    names = list(demo.params)

    def G(z: dict[str, torch.Tensor], p: Any) -> dict[str, torch.Tensor]:
        return demo.f(z, dict(zip(names, p)))

    params = [demo.params[k].detach() for k in names]
    z_star = picard(lambda z: G(z, params), demo.z0())
    zx = z_star["x"].clone().requires_grad_()
    zy = z_star["y"].clone().requires_grad_()
    dl = torch.autograd.grad(demo.loss({"x": zx, "y": zy}), [zx, zy])
    grads = ift_grads(G, z_star, params, {"x": dl[0], "y": dl[1]})

    assert ref.residual < 1e-14
    for k in ("x", "y"):
        torch.testing.assert_close(ref.z[k], z_star[k], rtol=1e-12, atol=1e-13)
    for k, g in zip(names, grads):
        torch.testing.assert_close(ref.grads[k], g, rtol=1e-10, atol=1e-12, msg=k)


def test_demo_problem_is_a_contraction_of_the_stated_shapes() -> None:
    demo = make_problem(batch=4, contraction=0.9, seed=0)
    p = demo.params
    assert p["A"].shape == (3, 3) and p["B"].shape == (3, 5) and p["C"].shape == (5, 3) and p["D"].shape == (5, 5)
    assert p["u"].shape == (4, 3)
    assert all(t.dtype == torch.float64 and t.requires_grad for t in p.values())
    w = torch.cat([torch.cat([p["A"], p["B"]], 1), torch.cat([p["C"], p["D"]], 1)], 0).detach()
    assert float(torch.linalg.matrix_norm(w, ord=2)) == pytest.approx(0.9, rel=1e-12)


def test_default_pairs_cover_every_registered_name() -> None:
    pairs = default_pairs()
    # Every name that solves the demo's fixed-point problem (conftest's tables).
    assert {s for s, _ in pairs} == set(SOLVERS)
    assert {a for _, a in pairs} == set(ADJOINTS)
    assert len(pairs) == len(set(pairs))
    grid = default_pairs(["fixed_point"], ["exact", "neumann"], grid=True)
    assert grid == [("fixed_point", "exact"), ("fixed_point", "neumann")]


# ----------------------------------------------------------------------------- the demo


def _table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("solver "))
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_demo_runs_every_registered_solver_and_adjoint() -> None:
    code, out, err = _main("demo", "--repeat", "1")
    assert code == 0, err
    rows = _table_rows(out)
    assert {r[0] for r in rows} == set(SOLVERS)
    assert {r[1] for r in rows} == set(ADJOINTS)
    header = next(line for line in out.splitlines() if line.startswith("solver "))
    for name in ("iters", "f evals", "forward ms", "backward ms", "residual", "grad error"):
        assert name in header
    # Progress went to stderr, one line per case when stderr is not a terminal.
    assert err.count("\n") == len(rows)
    assert err.startswith(f"[ 1/{len(rows)}]" if len(rows) >= 10 else f"[1/{len(rows)}]")


def test_demo_gradients_match_the_reference_for_exact_adjoints() -> None:
    adjoints = [a for a in ADJOINTS if not implicit.get_adjoint(a).approximate and not implicit.get_adjoint(a).symmetric]
    code, out, err = _main(
        "demo", "--solvers", "fixed_point", "--adjoints", ",".join(adjoints), "--repeat", "1", "--json", "-q"
    )
    assert code == 0, err
    assert err == ""
    results = json.loads(out)["results"]
    assert sorted(r["adjoint"] for r in results) == sorted(adjoints)
    for r in results:
        assert r["status"] == "ok", r
        assert r["grad_error"] < 1e-7, r
        assert r["solution_error"] < 1e-8, r
        assert r["residual"] < 1e-8 and r["iterations"] > 0 and r["nfe"] >= r["iterations"]
        assert len(r["history"]) == r["iterations"] + 1
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0


def test_demo_table_is_aligned() -> None:
    code, out, _ = _main("demo", "--solvers", "fixed_point", "--adjoints", "exact,jfb", "--repeat", "1", "-q")
    assert code == 0
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("solver "))
    header, rule, *body = lines[start : start + 4]
    assert set(rule.replace(" ", "")) == {"-"}
    ends = [i + 1 for i, c in enumerate(rule) if c == "-" and (i + 1 == len(rule) or rule[i + 1] == " ")]
    for line in (header, *body):
        # right-aligned numeric columns end exactly where their rule ends
        assert line[ends[-1] - 1] != " " and len(line) == ends[-1]
    statuses = {row[1]: row[2] for row in (line.split() for line in body)}
    assert statuses == {"exact": "ok", "jfb": "approx"}
    assert "approximate adjoint" in out


def test_demo_reports_non_convergence_without_crashing() -> None:
    code, out, _ = _main(
        "demo", "--solvers", "fixed_point", "--adjoints", "exact", "--max-iter", "2", "--repeat", "1", "-q"
    )
    assert code == 0
    (row,) = _table_rows(out)
    assert row[:3] == ["fixed_point", "exact", "no"]  # status "no conv"
    assert "ConvergenceWarning" in out and "did not converge" in out
    code, _, err = _main(
        "demo", "--solvers", "fixed_point", "--adjoints", "exact", "--max-iter", "2", "--repeat", "1", "-q", "--check"
    )
    assert code == 1 and "fixed_point + exact" in err


@dataclass(frozen=True, kw_only=True)
class _Exploding(implicit.Solver):
    """A solver that raises, standing in for a broken plugin."""

    def solve(self, system: Any, z0: torch.Tensor, monitor: Any) -> torch.Tensor:
        raise RuntimeError("kaboom")


@dataclass(frozen=True, kw_only=True)
class _NaNAdjoint(implicit.AdjointSolver):
    """An adjoint that returns NaN, standing in for a broken plugin."""

    def solve(self, op: Any, b: torch.Tensor, monitor: Any) -> torch.Tensor:
        x = torch.full_like(b, float("nan"))
        monitor.check(x, x)
        return x


def test_demo_survives_failing_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_Exploding, "name", "exploding")
    monkeypatch.setattr(_NaNAdjoint, "name", "nan_adjoint")
    monkeypatch.setitem(_registry._SOLVERS, "exploding", _Exploding)
    monkeypatch.setitem(_registry._ADJOINTS, "nan_adjoint", _NaNAdjoint)
    code, out, _ = _main(
        "demo", "--solvers", "exploding,fixed_point", "--adjoints", "exact,nan_adjoint", "--grid", "--repeat", "1", "-q"
    )
    assert code == 0
    status = {(r[0], r[1]): r[2] for r in _table_rows(out)}
    assert status[("exploding", "exact")] == "error"
    assert status[("exploding", "nan_adjoint")] == "error"
    assert status[("fixed_point", "exact")] == "ok"
    assert status[("fixed_point", "nan_adjoint")] == "non-finite"
    assert "RuntimeError: kaboom" in out


def test_run_case_keeps_forward_stats_when_backward_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_NaNAdjoint, "name", "nan_adjoint")
    monkeypatch.setitem(_registry._ADJOINTS, "nan_adjoint", _NaNAdjoint)
    demo = make_problem()
    row = run_case(demo, reference_solution(demo), "fixed_point", "nan_adjoint", tol=1e-10)
    assert row.iterations is not None and row.iterations > 0
    assert row.residual < 1e-8
    assert row.status == "non-finite"


def test_demo_rejects_unknown_names_and_bad_sizes() -> None:
    code, _, err = _main("demo", "--solvers", "fixed_pont")
    assert code == 2 and "fixed_point" in err  # the suggestion and the list of names
    code, _, err = _main("demo", "--repeat", "0")
    assert code == 2 and "--repeat" in err


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_demo_writes_a_convergence_plot(tmp_path: Path) -> None:
    path = tmp_path / "conv.png"
    code, _, err = _main(
        "demo", "--solvers", "fixed_point", "--adjoints", "exact", "--repeat", "1", "--plot", str(path)
    )
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {path}" in err


def test_demo_plot_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    path = tmp_path / "conv.png"
    code, out, err = _main("demo", "--plot", str(path))
    assert code == 2
    assert "matplotlib" in err and "pip install matplotlib" in err
    assert out == "" and not path.exists()


def test_demo_is_deterministic() -> None:
    args = ("demo", "--solvers", "fixed_point", "--adjoints", "exact", "--repeat", "1", "--json", "-q")
    first = json.loads(_main(*args)[1])["results"][0]
    second = json.loads(_main(*args)[1])["results"][0]
    for key in ("iterations", "nfe", "residual", "grad_error", "history"):
        assert first[key] == second[key]


def test_demo_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _main("demo", "--solvers", "fixed_point", "--adjoints", "exact", "--repeat", "1", "-q", "--seed", "7")
    torch.testing.assert_close(torch.rand(3), expected)


# ----------------------------------------------------------------------------- as a program


def test_python_dash_m_implicit_demo_runs_as_a_program() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "implicit",
            "demo",
            "--solvers",
            "fixed_point",
            "--adjoints",
            "exact,neumann",
            "--repeat",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    rows = _table_rows(proc.stdout)
    assert [r[:3] for r in rows] == [["fixed_point", "exact", "ok"], ["fixed_point", "neumann", "ok"]]
    assert "[1/2] fixed_point + exact" in proc.stderr and "[2/2] fixed_point + neumann" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dataclass_fields_drive_the_listing() -> None:
    # A class registered at run time shows up in the listing with its own options.
    class Tuned(implicit.get_solver("fixed_point")):  # type: ignore[misc]
        """A tuned Picard."""

        damping: float = 0.25
        extra: tuple[int, ...] = dataclasses.field(default_factory=lambda: (1, 2))

    Tuned.name = "tuned_test"
    saved = dict(_registry._SOLVERS)
    try:
        _registry._SOLVERS["tuned_test"] = Tuned
        code, out, _ = _main("solvers", "--json")
    finally:
        _registry._SOLVERS.clear()
        _registry._SOLVERS.update(saved)
    (entry,) = [e for e in json.loads(out)["solvers"] if e["name"] == "tuned_test"]
    assert entry["options"] == [
        {"name": "damping", "type": "float", "default": "0.25"},
        {"name": "extra", "type": "tuple[int, ...]", "default": "(1, 2)"},
    ]
    assert entry["summary"] == "A tuned Picard."
    assert entry["origin"] == f"registered by {__name__}"
