"""GPT under torch.distributed on CPU: two processes (torch.multiprocessing spawn, gloo on the
loopback interface, a free local port) each take half of a global batch; after one forward + backward the gradients equal
those of one process on the whole batch. Once wrapped in DDP, once sharded with FSDP2
(torch.distributed.fsdp.fully_shard: each block, then the root; gradients are DTensor shards,
gathered with full_tensor()). Both wrappers then take one optimizer step, and the parameters
must equal the single-process step's."""
import datetime
import faulthandler
import os
import socket
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import TINY_GPT_CONFIG, tiny_gpt

WORLD = 2
# A hang must fail this test, not eat the CI run (a CI run was once stopped at 90 minutes inside
# this test, its cause unseen): gloo waits at most GLOO_TIMEOUT (its default is 30 minutes), a
# worker still running at STACK_DUMP_S prints its stack to stderr, and the workers are killed and
# the test fails at DEADLINE_S. A pass takes about 6 s here.
GLOO_TIMEOUT = datetime.timedelta(seconds=120)
STACK_DUMP_S = 170
DEADLINE_S = 180

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this build")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch():
    """4 sequences of 9 tokens (targets as nanoGPT's: the next tokens), the last two left-padded
    differently so that each rank's half holds a padding mask."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_GPT_CONFIG["vocab_size"], (4, 9), generator=g)
    targets = torch.randint(0, TINY_GPT_CONFIG["vocab_size"], (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, :2] = 0
    mask[3, :5] = 0
    targets = targets.masked_fill(mask == 0, -100)
    # every sequence keeps 7 or 4 targets, so the mean over each half differs from the global
    # mean: the loss below is normalized by the global count to make the halves add up exactly
    return ids, targets, mask


def loss_of(model, ids, targets, mask, total_targets):
    """Sum of token losses / the global number of targets: the global mean loss, split into
    per-rank parts whose gradients add up (DDP averages over ranks, hence * WORLD there)."""
    logits, _ = model(ids, attention_mask=mask)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=-100, reduction="sum") / total_targets


def loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else None


def _worker(rank: int, port: int, kind: str, out_path: str) -> None:
    faulthandler.dump_traceback_later(STACK_DUMP_S)
    # Both ranks are on this machine: name the loopback interface. Without one, gloo uses the
    # address the hostname resolves to, which some machines do not route back to themselves.
    interface = loopback_interface()
    if interface:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=GLOO_TIMEOUT)
    try:
        model = tiny_gpt()
        ids, targets, mask = global_batch()
        total = int((targets != -100).sum())
        part = slice(rank * 2, rank * 2 + 2)
        if kind == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            # DDP averages gradients over ranks: scale each part by WORLD so the average is the sum
            (loss_of(wrapped, ids[part], targets[part], mask[part], total) * WORLD).backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            optimizer.step()
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "returned a view tensor": logits are a view
                (loss_of(model, ids[part], targets[part], mask[part], total) * WORLD).backward()
            # FSDP2 reduce-scatters with an average over ranks too
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            optimizer.step()
            params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "params": params}, out_path)
        # Tear down together: a rank that destroys the group while its peer still has gloo work
        # in flight aborted once (SIGABRT, "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def single_process_reference():
    model = tiny_gpt()
    ids, targets, mask = global_batch()
    loss_of(model, ids, targets, mask, int((targets != -100).sum())).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return grads, params


def run_two_processes(kind: str, tmp_path) -> dict:
    out = os.path.join(tmp_path, f"{kind}.pt")
    workers = mp.spawn(_worker, args=(free_port(), kind, out), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail(f"{kind}: the {WORLD} worker processes were still running after {DEADLINE_S} s "
                        f"(their stacks are printed above, on stderr); killed")
    return torch.load(out, weights_only=True)


def _fsdp2_unavailable() -> str:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        return f"torch.distributed.fsdp.fully_shard does not import: {error}"
    return ""


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_process_gradients_equal_single_process(kind, tmp_path):
    if kind == "fsdp2" and _fsdp2_unavailable():
        pytest.skip(_fsdp2_unavailable())
    result = run_two_processes(kind, tmp_path)
    grads, params = single_process_reference()
    assert set(result["grads"]) == set(grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=f"grad {name}")
        torch.testing.assert_close(result["params"][name], params[name], rtol=1e-5, atol=1e-7,
                                   msg=f"param {name}")
