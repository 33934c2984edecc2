"""A patched Llama trained 5 steps by 2 processes (gloo, localhost) under DDP and FSDP2 has, step for step, the
loss of one process training on the same global batch."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers", reason="ptm_kernels.hf needs transformers")

import ptm_kernels.hf as hf  # noqa: E402

from tests.hf._common import VOCAB  # noqa: E402
from tests.hf.test_llama import SMALL  # noqa: E402

STEPS, WORLD, B, L = 5, 2, 4, 12


def model_and_batches():
    """The same initial model and global batches in every process."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    model.set_attn_implementation("sdpa")
    gen = torch.Generator().manual_seed(1)
    # no padding: each process's mean loss is over the same number of tokens, so the mean of the two
    # processes' losses (and DDP's mean of their gradients) is the global batch's
    batches = [(torch.randint(0, VOCAB, (B, 1), generator=gen) + torch.arange(L)) % VOCAB for _ in range(STEPS)]
    return hf.apply(model), batches


def train(model, batches, rank=0, world=1):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for ids in batches:
        ids = ids.chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
    return losses


def worker(rank, port, out):
    """Both modes in one pair of processes (starting processes is most of this test's time)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for mode in MODES:
            model, batches = model_and_batches()
            if mode == "ddp":
                model = torch.nn.parallel.DistributedDataParallel(model)
            else:
                from torch.distributed.fsdp import fully_shard
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
            results[mode] = train(model, batches, rank, WORLD)
        if rank == 0:
            torch.save(results, out)
    finally:
        # gloo aborts a process ("terminate called without an active exception") whose group is torn down
        # while the peer is still in its last collective. A barrier alone left a window (the peer may not yet
        # have finished its barrier when this rank tears down: seen once on a loaded 2-core machine), so each
        # rank also says, in a file, that its barrier returned, and waits for the other's before tearing down
        dist.barrier()
        _rendezvous(out, rank)
        dist.destroy_process_group()


def _rendezvous(out, rank, timeout_s=120.0):
    """Block until every rank has called this (files beside `out`); raise after timeout_s."""
    import time

    open(f"{out}.done{rank}", "w").close()
    deadline = time.monotonic() + timeout_s
    while not all(os.path.exists(f"{out}.done{r}") for r in range(WORLD)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: the other ranks did not finish within {timeout_s} s")
        time.sleep(0.01)


MODES = ("ddp", "fsdp2")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_on_two_processes_match_one():
    model, batches = model_and_batches()
    want = torch.tensor(train(model, batches), dtype=torch.float64)
    assert want[-1] < want[0]  # it trains
    out = os.path.join(tempfile.mkdtemp(), "losses.pt")
    mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
    results = torch.load(out)
    for mode in MODES:
        got = torch.tensor(results[mode], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=lambda m: f"{mode}: {m}")
