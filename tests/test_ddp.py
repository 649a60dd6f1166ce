"""A patched model trains under DDP and FSDP2 (2 processes, gloo, CPU): identical parameters on both ranks, equal to one
process stepping on the average of the two ranks' gradients."""
from __future__ import annotations

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist

import h3moe

pytest.importorskip("transformers")

from test_transformers_patch import make_model  # noqa: E402

STEPS = 3
LR = 0.05


def _batch(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + rank)  # different data on each rank
    return torch.randint(2, 64, (2, 8), generator=g)


def _loss(model, ids):
    out = model(ids, labels=ids, output_router_logits=True)
    return out.loss + out.aux_loss


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@contextlib.contextmanager
def _process_group(rank: int, world: int, port: int):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    with _process_group(rank, world, port):
        torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's
        model = make_model("mixtral").train()
        report = h3moe.patch(model, backend="torch")
        assert len(report.routers()) == 2 and len(report.experts()) == 2
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=LR)
        ids = _batch(rank)
        for _ in range(STEPS):
            opt.zero_grad()
            _loss(ddp, ids).backward()
            opt.step()
        flat = _flat(model)
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        if rank == 0:
            torch.save(torch.stack(gathered), out_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_identical_parameters(tmp_path):
    out_path = str(tmp_path / "params.pt")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), out_path), nprocs=2, join=True)
    params = torch.load(out_path)
    assert torch.equal(params[0], params[1]), (params[0] - params[1]).abs().max()

    # One process, same init (rank 0's) and the average of both ranks' gradients, must land on the same point.
    _assert_equals_one_process(params[0])


def _assert_equals_one_process(got: torch.Tensor) -> None:
    """got (the flat parameters after training on 2 ranks from seed 0) equals one process stepping from the
    same init on the average of both ranks' losses, and moved."""
    torch.manual_seed(0)
    model = make_model("mixtral").train()
    init = _flat(model)
    h3moe.patch(model, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        (0.5 * (_loss(model, _batch(0)) + _loss(model, _batch(1)))).backward()
        opt.step()
    assert (got - init).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(got, _flat(model), rtol=1e-4, atol=1e-5)


def _fsdp_worker(rank: int, world: int, port: int, out_path: str) -> None:
    from torch.distributed.fsdp import fully_shard

    with _process_group(rank, world, port):
        torch.manual_seed(0)
        model = make_model("mixtral").train()
        h3moe.patch(model, backend="torch")
        for layer in model.model.layers:  # each decoder layer a unit: its experts sharded over the ranks
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        ids = _batch(rank)
        for _ in range(STEPS):
            opt.zero_grad()
            _loss(model, ids).backward()
            opt.step()
        full = torch.cat([p.full_tensor().detach().flatten() for p in model.parameters()])
        if rank == 0:
            torch.save(full, out_path)


def test_fsdp2_two_ranks_equal_one_process(tmp_path):
    """A patched model trains under FSDP2 (fully_shard per decoder layer, 2 processes, gloo, CPU): the expert
    weights are sharded DTensors, all-gathered for h3moe's ops and their gradients reduce-scattered; the
    result equals one process stepping on the average of the two ranks' gradients."""
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (fully_shard)")
    out_path = str(tmp_path / "params.pt")
    torch.multiprocessing.spawn(_fsdp_worker, args=(2, _free_port(), out_path), nprocs=2, join=True)
    _assert_equals_one_process(torch.load(out_path))
