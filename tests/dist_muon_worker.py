"""Worker for tests/test_optim.py::test_distributed_muon_equals_single_process (launched with 2 gloo processes):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_muon_worker.py OUT_JSON

Every rank runs a few steps of the distributed Muon (each rank orthogonalises its share, then all_gather) and,
on copies of the same parameters, the single-process Muon; rank 0 writes the largest difference to OUT_JSON.
Shape groups of 5, 2 and 1 matrices exercise the padding (5 and 1 do not divide by 2 ranks).
"""
import json
import sys

import torch
import torch.distributed as dist

from nanochat.optim import Muon

SHAPES = [(16, 32)] * 5 + [(48, 16)] * 2 + [(8, 8)]
STEPS = 3


def main(out_path: str):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # same parameters and gradients on every rank, as after DDP's all-reduce
    init = [torch.randn(s) for s in SHAPES]
    grads = [[torch.randn(s) for s in SHAPES] for _ in range(STEPS)]
    sharded = [torch.nn.Parameter(t.clone()) for t in init]
    single = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float32)
    opt_sharded = Muon(sharded, distributed=True, **kw)
    opt_single = Muon(single, distributed=False, **kw)
    for step_grads in grads:
        for p, q, g in zip(sharded, single, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_sharded.step()
        opt_single.step()
    param_diff = max((p - q).abs().max().item() for p, q in zip(sharded, single))
    moved = min((p - t).abs().max().item() for p, t in zip(sharded, init))  # every matrix was updated
    buf_diff = max((opt_sharded.state[p]["momentum_buffer"] - opt_single.state[q]["momentum_buffer"]).abs().max()
                   .item() for p, q in zip(sharded, single))
    # the ranks must agree with each other too (rank 1's parameters against rank 0's)
    flat = torch.cat([p.detach().flatten() for p in sharded])
    other = flat.clone()
    dist.broadcast(other, src=0)
    rank_diff = (flat - other).abs().max()
    dist.all_reduce(rank_diff, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(param_diff=param_diff, buf_diff=buf_diff, rank_diff=rank_diff.item(), moved=moved,
                           world_size=dist.get_world_size()), f)
    dist.barrier()  # nobody tears down while the other rank is still in a collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
