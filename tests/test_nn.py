"""The equilibrium layer ``implicit.nn.DEQ`` against dense float64 references."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import EXACT_ADJOINTS, SOLVERS
from torch import nn

import implicit

f64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIGHT = {"tol": 1e-12, "max_iter": 500, "adjoint_options": {"tol": 1e-12, "max_iter": 500}}


def step(z: dict[str, torch.Tensor], x: torch.Tensor, A, Bm, Cm, D) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """A contractive two-variable map: ``h`` (B, 3) and ``g`` (B, 2) read each other and ``x``."""
    h, g = z["h"], z["g"]
    return {
        "h": 0.5 * torch.tanh(h @ A.T + g @ Bm.T + x),
        "g": 0.4 * torch.sin(h @ Cm.T) + 0.3 * g @ D.T + x[:, :2] ** 2,
    }


class Cell(nn.Module):
    """The map above as a cell with parameters; records the structure it receives."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.A = nn.Parameter(torch.randn(3, 3, generator=gen, dtype=f64) * 0.5)
        self.Bm = nn.Parameter(torch.randn(3, 2, generator=gen, dtype=f64) * 0.5)
        self.Cm = nn.Parameter(torch.randn(2, 3, generator=gen, dtype=f64) * 0.5)
        self.D = nn.Parameter(torch.randn(2, 2, generator=gen, dtype=f64) * 0.5)
        self.seen: list[type] = []

    def forward(self, z: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.seen.append(type(z))
        return step(z, x, self.A, self.Bm, self.Cm, self.D)

    def init_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": x.new_zeros(len(x), 3), "g": x.new_zeros(len(x), 2)}


def _loss(z: dict[str, torch.Tensor]) -> torch.Tensor:
    return (z["h"] ** 2).sum() + (z["g"].cos() * torch.arange(1.0, 3.0, dtype=z["g"].dtype)).sum()


def _dense_reference(cell: Cell, x: torch.Tensor) -> list[torch.Tensor]:
    """``dL/dθ`` for θ = (A, Bm, Cm, D, x): Picard to 1e-15, dense Jacobians, dense solve."""
    params = [p.detach() for p in (cell.A, cell.Bm, cell.Cm, cell.D, x)]
    keys, shapes = ["h", "g"], [(len(x), 3), (len(x), 2)]

    def unflat(v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": v[: 3 * len(x)].reshape(shapes[0]), "g": v[3 * len(x) :].reshape(shapes[1])}

    def flat(z: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([z[k].reshape(-1) for k in keys])

    def G(v: torch.Tensor, ps: list[torch.Tensor]) -> torch.Tensor:
        return flat(step(unflat(v), ps[4], *ps[:4]))

    v = torch.zeros(5 * len(x), dtype=f64)
    for _ in range(5000):
        new = G(v, params)
        done = float((new - v).abs().max()) < 1e-15
        v = new
        if done:
            break
    J = torch.autograd.functional.jacobian(lambda w: G(w, params), v)
    vz = v.clone().requires_grad_()
    (dl,) = torch.autograd.grad(_loss(unflat(vz)), vz)
    u = torch.linalg.solve((torch.eye(len(v), dtype=f64) - J).T, dl)
    grads = []
    for i, p in enumerate(params):

        def g_of_p(q: torch.Tensor, i: int = i) -> torch.Tensor:
            ps = list(params)
            ps[i] = q
            return G(v, ps)

        grads.append((u @ torch.autograd.functional.jacobian(g_of_p, p).reshape(len(v), -1)).reshape(p.shape))
    return grads


def _relerr(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((g - w).norm() ** 2) for g, w in zip(got, want)) ** 0.5
    return num / sum(float(w.norm() ** 2) for w in want) ** 0.5


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, dtype=f64, generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("adjoint", EXACT_ADJOINTS)
def test_layer_gradients_match_dense_reference(adjoint: str) -> None:
    cell = Cell().double()
    layer = implicit.nn.DEQ(cell, solver="fixed_point", adjoint=adjoint, **TIGHT)
    x = _x().requires_grad_()
    z = layer(x)
    assert layer.last_stats is not None and layer.last_stats.all_converged
    assert layer.last_adjoint_stats is None
    grads = torch.autograd.grad(_loss(z), [cell.A, cell.Bm, cell.Cm, cell.D, x])
    assert _relerr(list(grads), _dense_reference(cell, x)) < 1e-8
    assert layer.last_adjoint_stats is not None
    assert layer.last_adjoint_stats.solver == adjoint
    assert layer.last_adjoint_stats.residual.shape == (4,)


@pytest.mark.parametrize("solver", SOLVERS)
def test_layer_with_every_solver(solver: str) -> None:
    cell = Cell()
    layer = implicit.nn.DEQ(cell, solver=solver, adjoint="exact", **TIGHT)
    x = _x().requires_grad_()
    z = layer(x)
    assert layer.last_stats is not None and layer.last_stats.all_converged
    grads = torch.autograd.grad(_loss(z), [cell.A, cell.Bm, cell.Cm, cell.D, x])
    assert _relerr(list(grads), _dense_reference(cell, x)) < 1e-8


def test_unbatched_layer_gradients_match_dense_reference() -> None:
    cell = Cell().double()
    layer = implicit.nn.DEQ(cell, solver="fixed_point", adjoint="exact", batched=False, **TIGHT)
    x = _x(3).requires_grad_()
    z = layer(x)
    assert layer.last_stats is not None and layer.last_stats.residual.shape == ()
    grads = torch.autograd.grad(_loss(z), [cell.A, cell.Bm, cell.Cm, cell.D, x])
    assert _relerr(list(grads), _dense_reference(cell, x)) < 1e-8


# --------------------------------------------------------------------------- settings


def _relative_residual(cell: Cell, x: torch.Tensor, z: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        new = cell(z, x)
        r = torch.cat([(new[k] - z[k]).reshape(len(x), -1) for k in z], dim=1).norm(dim=1)
        zn = torch.cat([z[k].reshape(len(x), -1) for k in z], dim=1).norm(dim=1)
    return r / zn


def test_train_and_eval_settings_are_honoured() -> None:
    cell = Cell().double()
    layer = implicit.nn.DEQ(
        cell, solver="fixed_point", adjoint="neumann", tol=1e-3, max_iter=200, eval_tol=1e-11, eval_max_iter=300
    )
    x = _x()
    z_train = layer(x)
    it_train = layer.last_stats.iterations
    assert layer.last_stats.all_converged
    assert float(_relative_residual(cell, x, z_train).max()) <= 1e-3
    assert float(_relative_residual(cell, x, z_train).max()) > 1e-9  # stopped at the loose tolerance

    layer.eval()
    z_eval = layer(x)
    assert layer.last_stats.all_converged
    assert layer.last_stats.iterations > it_train
    assert float(_relative_residual(cell, x, z_eval).max()) <= 1e-11

    layer.train()
    layer(x)
    assert layer.last_stats.iterations == it_train


def test_eval_max_iter_is_honoured_and_failure_reported() -> None:
    layer = implicit.nn.DEQ(
        Cell().double(), solver="fixed_point", adjoint="neumann", tol=1e-10, max_iter=300, eval_max_iter=3
    )
    x = _x()
    layer(x)
    assert layer.last_stats.all_converged and layer.last_stats.iterations > 3
    layer.eval()
    with pytest.warns(implicit.ConvergenceWarning, match="within max_iter") as caught:
        layer(x)
    assert caught[0].message.max_iter == 3 and "max_iter=3" in caught[0].message.reason
    assert layer.last_stats.iterations == 3
    assert not layer.last_stats.all_converged


def test_on_failure_raise_and_ignore() -> None:
    x = _x()
    strict = implicit.nn.DEQ(Cell().double(), solver="fixed_point", adjoint="neumann", max_iter=2, on_failure="raise")
    with pytest.raises(implicit.ConvergenceError):
        strict(x)
    lax = implicit.nn.DEQ(Cell().double(), solver="fixed_point", adjoint="neumann", max_iter=2, on_failure="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lax(x)
    assert lax.last_stats.iterations == 2


def test_warm_start_needs_no_more_iterations() -> None:
    cell = Cell().double()
    layer = implicit.nn.DEQ(cell, solver="fixed_point", adjoint="exact", tol=1e-10, max_iter=300)
    x = _x().requires_grad_()
    z = layer(x)
    cold = layer.last_stats.iterations
    # The same input from its own solution: already converged.
    z_again = layer(x, z0=z)
    assert layer.last_stats.iterations == 0
    for k in z:
        torch.testing.assert_close(z_again[k], z[k], rtol=0, atol=0)
    # A nearby input from the previous solution: no more than from init_state.
    x2 = (x + 1e-3 * torch.randn_like(x)).detach()
    layer(x2)
    cold2 = layer.last_stats.iterations
    z_warm = layer(x2, z0=z)
    assert layer.last_stats.iterations <= cold2 and layer.last_stats.iterations < cold
    # The warm start receives no gradient, and the gradient is still the IFT one.
    grads = torch.autograd.grad(_loss(z_warm), [cell.A, cell.Bm, cell.Cm, cell.D])
    want = _dense_reference(cell, x2)[:4]
    assert _relerr(list(grads), want) < 1e-8


def test_layer_without_grad_builds_no_graph() -> None:
    layer = implicit.nn.DEQ(Cell().double(), solver="fixed_point", adjoint="neumann", tol=1e-8)
    with torch.no_grad():
        z = layer(_x())
    assert all(t.grad_fn is None and not t.requires_grad for t in z.values())
    assert layer.last_adjoint_stats is None


# --------------------------------------------------------------------------- structures


class TupleCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(0.3 * torch.eye(2, dtype=f64))
        self.seen: list[type] = []

    def forward(self, z: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(type(z))
        a, b = z
        return torch.tanh(b @ self.W + x), 0.5 * torch.sin(a)

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros_like(x), torch.zeros_like(x)


class TensorCell(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(0.3 * torch.eye(2, dtype=f64))
        self.seen: list[type] = []

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(type(z))
        return torch.tanh(z @ self.W + x)

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@pytest.mark.parametrize(("cell_type", "kind"), [(Cell, dict), (TupleCell, tuple), (TensorCell, torch.Tensor)])
def test_cell_receives_and_returns_the_state_structure(cell_type: type, kind: type) -> None:
    cell = cell_type()
    layer = implicit.nn.DEQ(cell, solver="fixed_point", adjoint="exact", tol=1e-13, atol=0.0, max_iter=500)
    x = torch.randn(4, 3 if cell_type is Cell else 2, dtype=f64)
    z = layer(x)
    assert isinstance(z, kind)
    assert cell.seen and all(issubclass(t, kind) for t in cell.seen)
    # z is the fixed point of the cell, in the cell's own structure.
    with torch.no_grad():
        again = cell(z, x)
    assert isinstance(again, kind)
    parts = {dict: lambda s: list(s.values()), tuple: list, torch.Tensor: lambda s: [s]}[kind]
    zf = torch.cat([t.reshape(4, -1) for t in parts(z)], dim=1)
    af = torch.cat([t.reshape(4, -1) for t in parts(again)], dim=1)
    assert bool(((af - zf).norm(dim=1) <= 1e-13 * zf.norm(dim=1)).all())


# --------------------------------------------------------------------------- bad cells


class WrongKeys(Cell):
    def forward(self, z: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": z["h"], "q": z["g"]}


class WrongShape(Cell):
    def forward(self, z: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": z["h"][:, :2], "g": z["g"]}


class NoInit(nn.Module):
    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(z + x)


class BadBatchInit(Cell):
    def init_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": x.new_zeros(len(x), 3), "g": x.new_zeros(len(x) + 1, 2)}


@pytest.mark.parametrize(
    ("cell", "error", "match"),
    [
        (WrongKeys(), ValueError, r"keys.*missing \['g'\].*unexpected \['q'\]"),
        (WrongShape(), ValueError, r"z\['h'\] with shape \(4, 2\); expected \(4, 3\)"),
        (NoInit(), TypeError, r"NoInit has no init_state\(x\).*z0="),
        (BadBatchInit(), ValueError, r"z\['g'\] has batch size 5; expected 4"),
    ],
)
def test_bad_cells_give_clear_errors(cell: nn.Module, error: type, match: str) -> None:
    layer = implicit.nn.DEQ(cell.double(), solver="fixed_point", adjoint="neumann")
    with pytest.raises(error, match=match):
        layer(_x())


def test_cell_without_init_state_works_with_z0() -> None:
    layer = implicit.nn.DEQ(NoInit().double(), solver="fixed_point", adjoint="neumann", tol=1e-10, max_iter=300)
    x = _x()
    z = layer(x, z0=torch.zeros_like(x))
    torch.testing.assert_close(z, 0.5 * torch.tanh(z + x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"solver": "andersen"}, LookupError, "did you mean 'anderson'"),
        ({"adjoint": "nope"}, LookupError, "Available"),
        ({"solver_options": {"bogus": 1}}, LookupError, "unknown option 'bogus'"),
        ({"tol": -1.0}, ValueError, "tol"),
        ({"eval_max_iter": -1}, ValueError, "eval_max_iter"),
        ({"eval_tol": "small"}, ValueError, "eval_tol"),
        ({"on_failure": "explode"}, ValueError, "on_failure"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict, error: type, match: str) -> None:
    settings = {"solver": "fixed_point", "adjoint": "neumann", **kwargs}
    with pytest.raises(error, match=match):
        implicit.nn.DEQ(Cell(), **settings)


def test_cell_must_be_a_module() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        implicit.nn.DEQ(lambda z, x: z, solver="fixed_point", adjoint="neumann")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- module protocol


def _layer() -> implicit.nn.DEQ:
    return implicit.nn.DEQ(
        Cell().double(), solver="fixed_point", adjoint="neumann", tol=1e-10, max_iter=300, eval_tol=1e-6
    )


def _same_outputs(a: implicit.nn.DEQ, b: implicit.nn.DEQ) -> None:
    x = _x()
    za, zb = a(x), b(x)
    for k in za:
        torch.testing.assert_close(za[k], zb[k], rtol=0, atol=0)


def test_cell_is_a_registered_submodule() -> None:
    layer = _layer()
    assert dict(layer.named_children())["cell"] is layer.cell
    assert {n for n, _ in layer.named_parameters()} == {"cell.A", "cell.Bm", "cell.Cm", "cell.D"}


def test_state_dict_round_trip() -> None:
    a = _layer()
    b = _layer()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"cell.A", "cell.Bm", "cell.Cm", "cell.D"}
    _same_outputs(a, b)


def test_deepcopy_and_pickle_round_trips() -> None:
    layer = _layer()
    x = _x().requires_grad_()
    _loss(layer(x)).backward()  # stats and gradients present
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.cell is not layer.cell
        assert clone.eval_tol == layer.eval_tol and clone.solver == layer.solver
        assert clone.last_adjoint_stats is not None
        _same_outputs(layer, clone)


def test_to_dtype() -> None:
    layer = implicit.nn.DEQ(Cell(), solver="fixed_point", adjoint="neumann", tol=1e-5).float()
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    z = layer(_x().float())
    assert all(t.dtype == torch.float32 for t in z.values())
    layer = layer.to(f64)
    z = layer(_x())
    assert all(t.dtype == f64 for t in z.values())


def test_torch_compile_smoke() -> None:
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable")
    dynamo = pytest.importorskip("torch._dynamo")
    if not dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this platform")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(3, 3).double()
            self.deq = implicit.nn.DEQ(Cell().double(), solver="fixed_point", adjoint="exact", tol=1e-12, max_iter=500)
            self.out = nn.Linear(5, 1).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.deq(torch.tanh(self.inp(x)))
            return self.out(torch.cat([z["h"], z["g"]], dim=1)).sum()

    torch.manual_seed(0)
    model = Model()
    x = _x()
    eager = torch.autograd.grad(model(x), list(model.parameters()))
    dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss = compiled(x)
    got = torch.autograd.grad(loss, list(model.parameters()))
    assert model.deq.last_adjoint_stats is not None
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss, model(x), rtol=1e-10, atol=1e-12)


def test_digits_example_quick(tmp_path: os.PathLike[str]) -> None:
    plot = os.path.join(str(tmp_path), "digits.png")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "digits_deq.py"), "--quick", "--plot", plot],
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout and "solver=" in proc.stdout
    assert os.path.getsize(plot) > 1000
