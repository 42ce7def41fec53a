"""Third-party plugins: examples/plugin_package installed for real and used by name.

The package is installed into a temporary folder (``pip install --target``,
offline; by hand from its pyproject.toml when setuptools is missing), and every
check runs in a fresh interpreter with that folder on ``sys.path``, so the
entry points are discovered exactly as for a user who ran ``pip install``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from problems import two_variable_map, two_variable_params, two_variable_z0
from reference import ift_grads, picard

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SRC = ROOT / "examples" / "plugin_package"
TESTS = Path(__file__).resolve().parent

TOL = 1e-12


def _install_by_hand(src: Path, site: Path) -> None:
    """What ``pip install --target`` leaves behind: the package and a dist-info with its entry points."""
    import tomllib  # Python 3.11+; only needed where setuptools is missing

    meta = tomllib.loads((src / "pyproject.toml").read_text())["project"]
    shutil.copytree(src / "implicit_extra", site / "implicit_extra")
    dist = site / f"{meta['name'].replace('-', '_')}-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = []
    for group, eps in meta["entry-points"].items():
        lines.append(f"[{group}]")
        lines += [f"{name} = {value}" for name, value in eps.items()]
        lines.append("")
    (dist / "entry_points.txt").write_text("\n".join(lines))


def _can_build_wheels() -> bool:
    """Whether pip can build the plugin without an index: setuptools with ``bdist_wheel`` (its own since 70.1, else ``wheel``)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    return (
        importlib.util.find_spec("wheel") is not None
        or importlib.util.find_spec("setuptools.command.bdist_wheel") is not None
    )


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding implicit-extra as installed by pip (and nothing else)."""
    base = tmp_path_factory.mktemp("plugin")
    src, site = base / "src", base / "site"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    if _can_build_wheels():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        cmd += ["--target", str(site), str(src)]
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_WARN_SCRIPT_LOCATION="1")
        subprocess.run(cmd, check=True, capture_output=True, cwd=base, env=env, timeout=240)
    else:
        site.mkdir()
        _install_by_hand(src, site)
    assert (site / "implicit_extra" / "__init__.py").is_file()
    assert list(site.glob("implicit_extra-*.dist-info/entry_points.txt"))
    return site


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second distribution whose two entry points cannot be loaded."""
    site = tmp_path_factory.mktemp("broken")
    (site / "implicit_broken.py").write_text('raise ImportError("implicit_broken needs a package that is missing")\n')
    dist = site / "implicit_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: implicit-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[implicit.solvers]\nbroken_solver = implicit_broken:Solver\n\n"
        "[implicit.adjoints]\nbroken_adjoint = implicit_broken_missing_module:Adjoint\n"
    )
    return site


def _run(script: str, *sites: Path) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter with ``sites`` on its path; it prints one JSON object."""
    path = [str(s) for s in sites] + [str(TESTS), str(ROOT)]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env, timeout=240
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


USE_BY_NAME = """
import json, sys
import torch
import implicit
from problems import two_variable_map, two_variable_params, two_variable_z0

TOL = __TOL__
out = {"loaded_at_import": "implicit_extra" in sys.modules}
params = [p.requires_grad_() for p in two_variable_params()]
problem = implicit.ImplicitProblem.fixed_point(lambda z: two_variable_map(z, params), batched=True)

# Built-in names only: the plugin must stay unloaded.
sol = implicit.solve(problem, two_variable_z0(), solver="fixed_point", adjoint="exact", tol=1e-10, max_iter=500)
sol.z["x"].sum().backward()
implicit.get_solver("fixed_point"), implicit.get_adjoint("neumann"), implicit.get_adjoint("fixed_point")
out["loaded_after_builtin"] = "implicit_extra" in sys.modules

# The plugin by name, never imported here.
sol = implicit.solve(
    problem, two_variable_z0(), solver="relaxed_picard", adjoint="neumann_damped",
    tol=TOL, max_iter=5000, adjoint_options={"tol": TOL, "max_iter": 5000},
)
loss = (sol.z["x"] ** 2).sum() + sol.z["y"].sum()
grads = torch.autograd.grad(loss, params)
out["loaded_after_plugin"] = "implicit_extra" in sys.modules
out["z"] = {k: v.tolist() for k, v in sol.z.items()}
out["grads"] = [g.tolist() for g in grads]
out["iterations"] = sol.stats.iterations
out["converged"] = sol.converged
out["adjoint_converged"] = sol.adjoint_stats.all_converged
out["adjoint_solver"] = sol.adjoint_stats.solver
out["solvers"] = implicit.available_solvers()
out["adjoints"] = implicit.available_adjoints()
cls = implicit.get_solver("relaxed_picard")
out["subclass_of_fixed_point"] = issubclass(cls, implicit.get_solver("fixed_point"))
out["default_damping"] = cls().damping
out["adjoint_is_approximate"] = implicit.get_adjoint("neumann_damped").approximate

# The command-line listing sees it too, with its origin and options.
import io
from implicit.__main__ import main
buf = io.StringIO()
assert main(["solvers", "--json"], stdout=buf) == 0
listing = json.loads(buf.getvalue())
out["listing"] = {kind: {e["name"]: e for e in listing[kind]} for kind in ("solvers", "adjoints")}
print(json.dumps(out))
""".replace("__TOL__", repr(TOL))


def _reference_grads() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    params = two_variable_params()

    def G(z: dict[str, torch.Tensor], p: Any) -> dict[str, torch.Tensor]:
        return two_variable_map(z, p)

    z_star = picard(lambda z: G(z, params), two_variable_z0())
    x = z_star["x"].clone().requires_grad_()
    y = z_star["y"].clone().requires_grad_()
    dl = torch.autograd.grad((x**2).sum() + y.sum(), [x, y])
    return z_star, ift_grads(G, z_star, params, {"x": dl[0], "y": dl[1]})


def _damped_picard_iterations(damping: float, tol: float, atol: float = 1e-12) -> int:
    """Iterations of ``z ← (1 - β) z + β f(z)`` until every sample meets ``‖f(z) - z‖ ≤ tol‖z‖ + atol``."""
    params = two_variable_params()
    z = two_variable_z0()
    with torch.no_grad():
        for k in range(100_000):
            fz = two_variable_map(z, params)
            r = torch.cat([(fz[v] - z[v]) for v in ("x", "y")], dim=1).norm(dim=1)
            zn = torch.cat([z[v] for v in ("x", "y")], dim=1).norm(dim=1)
            if bool((r <= tol * zn + atol).all()):
                return k
            z = {v: (1 - damping) * z[v] + damping * fz[v] for v in z}
    raise AssertionError("the hand-written damped Picard iteration did not converge")


def test_plugin_is_used_by_name_and_loaded_lazily(plugin_site: Path) -> None:
    out = _run(USE_BY_NAME, plugin_site)

    assert out["loaded_at_import"] is False
    assert out["loaded_after_builtin"] is False, "a built-in name loaded the plugin"
    assert out["loaded_after_plugin"] is True
    assert "relaxed_picard" in out["solvers"]
    assert "neumann_damped" in out["adjoints"]
    assert out["subclass_of_fixed_point"] is True
    assert out["default_damping"] == 0.5
    assert out["adjoint_is_approximate"] is False
    assert out["converged"] is True and out["adjoint_converged"] is True
    assert out["adjoint_solver"] == "neumann_damped"

    # The plugin's default damping is the one used: same iteration count as a hand-written damped Picard.
    assert out["iterations"] == _damped_picard_iterations(0.5, TOL)

    z_ref, g_ref = _reference_grads()
    for k in ("x", "y"):
        torch.testing.assert_close(torch.tensor(out["z"][k], dtype=torch.float64), z_ref[k], rtol=1e-9, atol=1e-11)
    for got, ref in zip(out["grads"], g_ref):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), ref, rtol=1e-8, atol=1e-10)

    solvers, adjoints = out["listing"]["solvers"], out["listing"]["adjoints"]
    assert solvers["relaxed_picard"]["origin"] == "implicit-extra 0.1.0"
    assert {"name": "damping", "type": "float", "default": "0.5"} in solvers["relaxed_picard"]["options"]
    assert solvers["fixed_point"]["origin"] == "built-in"
    assert adjoints["neumann_damped"]["origin"] == "implicit-extra 0.1.0"
    assert adjoints["neumann_damped"]["approximate"] is False
    assert [o["name"] for o in adjoints["neumann_damped"]["options"]] == ["tol", "atol", "max_iter", "omega"]
    # The plugin solver also serves as an adjoint, and keeps its origin and damping there.
    assert adjoints["relaxed_picard"]["origin"] == "implicit-extra 0.1.0"
    assert {"name": "damping", "type": "float", "default": "0.5"} in adjoints["relaxed_picard"]["options"]


BROKEN = """
import json, sys, warnings
import torch
import implicit

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    solvers = implicit.available_solvers()
    adjoints = implicit.available_adjoints()
out = {
    "warnings": [(w.category.__name__, str(w.message)) for w in caught],
    "solvers": solvers,
    "adjoints": adjoints,
}

W = torch.tensor([[0.4, 0.2], [-0.1, 0.3]], dtype=torch.float64)
theta = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
problem = implicit.ImplicitProblem.fixed_point(lambda z: torch.tanh(W @ z + theta))
results = {}
for solver, adjoint in [("relaxed_picard", "neumann_damped"), ("fixed_point", "exact"), ("fixed_point", "neumann")]:
    sol = implicit.solve(problem, torch.zeros(2, dtype=torch.float64), solver=solver, adjoint=adjoint,
                         tol=1e-12, max_iter=5000, adjoint_options={"tol": 1e-12, "max_iter": 5000})
    (g,) = torch.autograd.grad(sol.z.sum(), theta)
    results[f"{solver}+{adjoint}"] = {"z": sol.z.tolist(), "grad": g.tolist(), "converged": sol.converged}
out["results"] = results
errors = {}
for kind, name in [("solver", "broken_solver"), ("adjoint", "broken_adjoint")]:
    try:
        getattr(implicit, "get_" + kind)(name)
        errors[name] = None
    except LookupError as exc:
        errors[name] = str(exc)
out["errors"] = errors
print(json.dumps(out))
"""


def test_broken_plugin_warns_and_every_other_name_works(plugin_site: Path, broken_site: Path) -> None:
    out = _run(BROKEN, plugin_site, broken_site)

    messages = [m for cat, m in out["warnings"] if cat == "RuntimeWarning"]
    for name, value in [
        ("broken_solver", "implicit_broken:Solver"),
        ("broken_adjoint", "implicit_broken_missing_module:Adjoint"),
    ]:
        hits = [m for m in messages if name in m]
        assert len(hits) == 1, f"expected one warning naming {name!r}; got {out['warnings']}"
        assert value in hits[0]
    assert "relaxed_picard" in out["solvers"] and "broken_solver" not in out["solvers"]
    assert "neumann_damped" in out["adjoints"] and "broken_adjoint" not in out["adjoints"]
    assert {"fixed_point", "exact", "neumann"} <= set(out["solvers"]) | set(out["adjoints"])
    for name, err in out["errors"].items():
        assert err is not None and name in err, f"{name} should be unknown; got {err!r}"

    # z = tanh(W z + θ): the implicit gradient of sum(z) by hand, (I - D W)ᵀ u = 1, dθ = D u.
    W = torch.tensor([[0.4, 0.2], [-0.1, 0.3]], dtype=torch.float64)
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64)
    z = torch.zeros(2, dtype=torch.float64)
    for _ in range(2000):
        z = torch.tanh(W @ z + theta)
    d = torch.diag(1 - z**2)
    u = torch.linalg.solve((torch.eye(2, dtype=torch.float64) - d @ W).T, torch.ones(2, dtype=torch.float64))
    grad_ref = d @ u
    for key, res in out["results"].items():
        assert res["converged"], key
        torch.testing.assert_close(torch.tensor(res["z"], dtype=torch.float64), z, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.tensor(res["grad"], dtype=torch.float64), grad_ref, rtol=1e-9, atol=1e-11)
