"""DistributedDataParallel over a DEQ layer: two processes train as one does.

The test launches this file twice as a worker (``python tests/test_ddp.py
--worker RANK PORT OUT``): gloo backend, CPU, localhost, a free port. Each
rank trains on its half of a global batch; the parameters after two steps
must equal those of a single process trained on the whole batch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

import torch
from torch import nn

import implicit

f64 = torch.float64
WORLD = 2
STEPS = 2
GLOBAL_BATCH = 8
TIMEOUT_S = 120


class Cell(nn.Module):
    """A two-variable contractive cell: ``h`` (B, 4) and ``g`` (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.hh = nn.Linear(4, 4, bias=False)
        self.gh = nn.Linear(2, 4)
        self.hg = nn.Linear(4, 2)
        with torch.no_grad():
            self.hh.weight.mul_(0.5)

    def forward(self, z: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = 0.6 * torch.tanh(self.hh(z["h"]) + self.gh(z["g"]) + x)
        g = 0.5 * torch.sin(self.hg(z["h"]))
        return {"h": h, "g": g}

    def init_state(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": x.new_zeros(len(x), 4), "g": x.new_zeros(len(x), 2)}


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.deq = implicit.nn.DEQ(
            Cell(),
            solver="fixed_point",
            adjoint="neumann",
            tol=1e-12,
            max_iter=500,
            on_failure="raise",
            adjoint_options={"tol": 1e-12, "max_iter": 500},
        )
        self.out = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.deq(self.inp(x))
        return self.out(torch.cat([z["h"], z["g"]], dim=1))


def make_model() -> Model:
    torch.manual_seed(0)
    return Model().double()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(GLOBAL_BATCH, 3, dtype=f64, generator=gen)
    return x, torch.randn(GLOBAL_BATCH, 1, dtype=f64, generator=gen)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(STEPS):
        opt.zero_grad()
        # A mean over the local batch: DDP averages gradients over ranks, so
        # equal shards give the gradient of the mean over the global batch.
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=TIMEOUT_S))
    try:
        model = make_model()
        ddp = DistributedDataParallel(model)
        x, y = global_batch()
        shard = GLOBAL_BATCH // WORLD
        train(ddp, x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard])
        stats = model.deq.last_stats
        torch.save(
            {
                "params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "iterations": stats.iterations,
                "residual": stats.residual.clone(),
                "adjoint_iterations": model.deq.last_adjoint_stats.iterations,
            },
            out,
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_ddp_matches_single_process(tmp_path: os.PathLike[str]) -> None:
    port = _free_port()
    outs = [os.path.join(str(tmp_path), f"rank{r}.pt") for r in range(WORLD)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", str(r), str(port), outs[r]],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for r in range(WORLD)
    ]
    deadline = time.monotonic() + TIMEOUT_S
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-3000:]}"

    model = make_model()
    train(model, *global_batch())
    want = {k: v.detach() for k, v in model.named_parameters()}
    start = {k: v.detach() for k, v in make_model().named_parameters()}
    results = [torch.load(o) for o in outs]
    for r, res in enumerate(results):
        assert set(res["params"]) == set(want)
        for k, v in want.items():
            torch.testing.assert_close(res["params"][k], v, rtol=0, atol=1e-6, msg=f"rank {r}, {k}")
        # Each rank's stats describe its own shard: half the global batch.
        assert res["residual"].shape == (GLOBAL_BATCH // WORLD,)
        assert res["iterations"] > 0 and res["adjoint_iterations"] > 0
    # The training did move every parameter, so the comparison is not vacuous.
    assert all(float((want[k] - start[k]).abs().max()) > 1e-3 for k in want)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
