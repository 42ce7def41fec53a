"""A whole DEQ training run on scikit-learn's digits, with implicit.nn.DEQ and with torchdeq, back to back.

The model (one cell for both libraries, the same initial weights, data order
and settings): an embedding of each 8×8 image into ``u_h`` (16×8×8) and
``u_g`` (32), the equilibrium of a feature map ``h`` and a global vector
``g`` that read each other,

    h* = tanh(GroupNorm(conv₂(ReLU(conv₁(h*) + U g*))) + u_h)
    g* = tanh(W g* / 2 + V mean(h*) + u_g)

and a linear head on the pooled ``h*`` and ``g*``; Adam (lr 1e-3), batch 64,
float32, one torch thread. Settings: forward ``anderson`` (tol 1e-4, at most
30 iterations, memory 6, regularisation 1e-4 as torchdeq's defaults), adjoint
``neumann`` / torchdeq's ``fixed_point_iter`` (tol 1e-6, at most 30);
``--defaults`` runs each library's own defaults instead. (The regularisation
is added to the diagonal of the residuals' Gram matrix, relative to it in
implicit and absolute in torchdeq; with implicit's default 1e-6 this model's
forward solves diverge on some batches late in training.)

The two tolerances are not the same test: implicit stops a sample when
``‖f(z) − z‖ ≤ tol·‖z‖`` for that sample; torchdeq (``stop_mode='rel'``)
when ``‖f(z) − z‖ / ‖f(z)‖ ≤ tol`` over the whole batch.

Per epoch and library: the time of the model's forward passes (of which the
cell's evaluations, timed around the cell), of the backward passes, of the
optimiser steps, the mean forward and adjoint iterations per step (the
libraries' own statistics) and the test accuracy. Run::

    python -m benchmarks.training            # 40 epochs each
    python -m benchmarks.training --quick    # 1 epoch each (a smoke test)
    python -m benchmarks.training --defaults # each library's defaults
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import implicit

C, K = 16, 32


class Cell(nn.Module):
    """``(h, g) ↦ (h', g')`` given the embedding ``(u_h, u_g)``; counts and times its evaluations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(C, C, 3, padding=1)
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.norm = nn.GroupNorm(4, C)
        self.g_to_h = nn.Linear(K, C, bias=False)
        self.h_to_g = nn.Linear(C, K, bias=False)
        self.g_to_g = nn.Linear(K, K, bias=False)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.mul_(0.5)
            self.g_to_g.weight.mul_(0.5)
        self.calls, self.seconds = 0, 0.0

    def step(self, h: torch.Tensor, g: torch.Tensor, u_h: torch.Tensor, u_g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        start = time.perf_counter()
        y = F.relu(self.conv1(h) + self.g_to_h(g)[:, :, None, None])
        h_new = torch.tanh(self.norm(self.conv2(y)) + u_h)
        g_new = torch.tanh(0.5 * self.g_to_g(g) + self.h_to_g(h.mean(dim=(2, 3))) + u_g)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return h_new, g_new

    # implicit.nn.DEQ's cell interface
    def forward(self, z: dict[str, torch.Tensor], x: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        h, g = self.step(z["h"], z["g"], *x)
        return {"h": h, "g": g}

    def init_state(self, x: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"h": torch.zeros_like(x[0]), "g": torch.zeros_like(x[1])}


class Model(nn.Module):
    """Embedding, an equilibrium layer given as ``solve(cell, u) -> (h*, g*)``, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_h = nn.Sequential(nn.Conv2d(1, C, 3, padding=1), nn.GroupNorm(4, C))
        self.embed_g = nn.Linear(64, K)
        self.cell = Cell()
        self.head = nn.Linear(C * 16 + K, 10)
        self.solve: Callable[[Cell, tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
        self.iterations: list[tuple[float, float]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        u = (self.embed_h(images), self.embed_g(images.flatten(1)))
        h, g = self.solve(self.cell, u)
        return self.head(torch.cat([F.avg_pool2d(h, 2).flatten(1), g], dim=1))


class ImplicitLayer:
    """``implicit.nn.DEQ`` around the cell; iterations from its statistics."""

    def __init__(self, model: Model, defaults: bool, adjoint: str = "neumann") -> None:
        kwargs: dict[str, Any] = (
            {}
            if defaults
            else {
                "solver": "anderson",
                "solver_options": {"m": 6, "lam": 1e-4},  # torchdeq's Anderson memory and regularisation
                "adjoint": adjoint,
                "tol": 1e-4,
                "max_iter": 30,
                "adjoint_options": {"tol": 1e-6, "max_iter": 30},
            }
        )
        self.deq = implicit.nn.DEQ(model.cell, **kwargs)
        self.model = model
        self.worst: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, cell: Cell, u: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.deq(u)
        if self.model.training:
            # The worst residual of a forward solve: of the last iterate, and of the iterate returned
            # (each sample's best seen), kept as tensors and read once per epoch.
            stats = self.deq.last_stats
            last, returned = stats.history[-1].max(), stats.residual.max()
            self.worst = (
                (last, returned)
                if self.worst is None
                else (torch.maximum(self.worst[0], last), torch.maximum(self.worst[1], returned))
            )
        return z["h"], z["g"]

    def worst_residuals(self) -> tuple[float, float] | None:
        """The worst forward residual since the last call, of the last iterates and of those returned."""
        worst, self.worst = self.worst, None
        return None if worst is None else (float(worst[0]), float(worst[1]))

    def iterations(self) -> tuple[float, float]:
        stats = self.deq.last_stats
        adjoint = self.deq.last_adjoint_stats if hasattr(self.deq, "last_adjoint_stats") else None
        return float(stats.iterations), float(adjoint.iterations) if adjoint is not None else float("nan")


class TorchdeqLayer:
    """torchdeq's DEQ around the same cell (its tuple state is packed into one vector by torchdeq)."""

    def __init__(self, defaults: bool) -> None:
        from torchdeq import get_deq

        kwargs: dict[str, Any] = (
            {}
            if defaults
            else {
                "f_solver": "anderson",
                "f_tol": 1e-4,
                "f_max_iter": 30,
                "f_stop_mode": "rel",
                "b_solver": "fixed_point_iter",
                "b_tol": 1e-6,
                "b_max_iter": 30,
                "b_stop_mode": "rel",
            }
        )
        self.deq = get_deq(ift=True, **kwargs)
        self.info: dict[str, Any] = {}
        self.backward_info: dict[str, Any] = {}

    def __call__(self, cell: Cell, u: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        z_init = (torch.zeros_like(u[0]), torch.zeros_like(u[1]))
        (z,), self.info = self.deq(
            lambda h, g: cell.step(h, g, *u), z_init, backward_writer=lambda info: self.backward_info.update(info)
        )
        return z[0], z[1]

    def iterations(self) -> tuple[float, float]:
        return _mean_steps(self.info), _mean_steps(self.backward_info)


def _mean_steps(info: dict[str, Any]) -> float:
    nstep = info.get("nstep")
    return float(torch.as_tensor(nstep, dtype=torch.float64).mean()) if nstep is not None else float("nan")


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(images, data.target, test_size=0.25, random_state=0, stratify=data.target)
    return torch.from_numpy(x_tr), torch.from_numpy(x_te), torch.from_numpy(y_tr), torch.from_numpy(y_te)


@torch.no_grad()
def accuracy(model: Model, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(images[i : i + 256]).argmax(1) == labels[i : i + 256]).sum()) for i in range(0, len(images), 256)
    )
    model.train()
    return correct / len(images)


def train(name: str, model: Model, layer: Any, data: tuple[torch.Tensor, ...], epochs: int, seed: int) -> list[dict]:
    """Train ``model`` for ``epochs``; one row of timings per epoch."""
    x_tr, x_te, y_tr, y_te = data
    model.solve = layer
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.Generator().manual_seed(seed)
    rows = []
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(x_tr), generator=order)
        fwd = bwd = opt = 0.0
        model.cell.calls, model.cell.seconds = 0, 0.0
        iters: list[tuple[float, float]] = []
        for start in range(0, len(x_tr), 64):
            idx = perm[start : start + 64]
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            t1 = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            optimiser.step()
            t3 = time.perf_counter()
            fwd, bwd, opt = fwd + t1 - t0, bwd + t2 - t1, opt + t3 - t2
            iters.append(layer.iterations())
        cell_calls, cell_seconds = model.cell.calls, model.cell.seconds
        acc = accuracy(model, x_te, y_te)
        it = np.nanmean(np.array(iters), axis=0) if iters else (float("nan"), float("nan"))
        rows.append(
            {
                "library": name,
                "epoch": epoch,
                "forward": fwd,
                "cell_calls": cell_calls,
                "cell_seconds": cell_seconds,
                "backward": bwd,
                "step": opt,
                "fwd_iters": float(it[0]),
                "adj_iters": float(it[1]),
                "accuracy": acc,
            }
        )
        worst = layer.worst_residuals() if hasattr(layer, "worst_residuals") else None
        rows[-1]["worst_last"], rows[-1]["worst_returned"] = worst if worst is not None else (None, None)
        r = rows[-1]
        if worst is not None:
            print(
                f"{name:9s} epoch {epoch:3d}: worst forward residual, last iterate {worst[0]:.2e}, returned {worst[1]:.2e}"
            )
        print(
            f"{name:9s} epoch {epoch:3d}: forward {r['forward']:.2f} s (cell {r['cell_seconds']:.2f} s, "
            f"{r['cell_calls']} calls)  backward {r['backward']:.2f} s  step {r['step']:.2f} s  "
            f"iterations {r['fwd_iters']:.1f} / {r['adj_iters']:.1f}  test accuracy {100 * acc:.2f} %",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--quick", action="store_true", help="one epoch each")
    parser.add_argument("--defaults", action="store_true", help="each library's default solvers and tolerances")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--adjoint",
        default="neumann",
        help="implicit's adjoint under the shared settings (torchdeq's stays fixed_point_iter)",
    )
    parser.add_argument("--only", choices=["implicit", "torchdeq"], help="train one library only")
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = load()
    initial = Model()
    runs: list[tuple[str, Callable[[Model], Any]]] = []
    if args.only != "torchdeq":
        runs.append(("implicit", lambda m: ImplicitLayer(m, args.defaults, args.adjoint)))
    try:
        import torchdeq  # noqa: F401
    except ImportError:
        print("torchdeq is not installed (pip install torchdeq==0.1.0): implicit alone")
    else:
        if args.only != "implicit":
            runs.append(("torchdeq", lambda m: TorchdeqLayer(args.defaults)))
    totals = {}
    for name, make in runs:
        model = copy.deepcopy(initial)
        start = time.perf_counter()
        rows = train(name, model, make(model), data, epochs, args.seed)
        totals[name] = (time.perf_counter() - start, rows)
    print()
    print(
        "| library | training time (s) | forward (s) | cell in forward (s) | backward (s) | step (s) "
        "| iterations fwd / adj (last epoch) | test accuracy (last epoch) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (total, rows) in totals.items():
        last = rows[-1]
        print(
            f"| {name} | {total:.1f} | {sum(r['forward'] for r in rows):.1f} | {sum(r['cell_seconds'] for r in rows):.1f} "
            f"| {sum(r['backward'] for r in rows):.1f} | {sum(r['step'] for r in rows):.1f} "
            f"| {last['fwd_iters']:.1f} / {last['adj_iters']:.1f} | {100 * last['accuracy']:.2f} % |"
        )
    if "torchdeq" in totals and "implicit" in totals:
        ratio = totals["implicit"][0] / totals["torchdeq"][0]
        print(f"\nimplicit / torchdeq training time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
