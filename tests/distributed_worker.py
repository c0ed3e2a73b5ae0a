"""Runs `distributed_cases` cases in W gloo processes (started by torchrun from
tests/test_distributed.py) and writes what rank 0 saw to --out/<case>.pt.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py \
        --out DIR --cases fsdp_sgd,ep_sgd [--checkpoint ep_adamw] [--load-checkpoint DIR/ckpt]

Per case: losses (mean over ranks), aux losses (and whether all ranks agree), global expert
loads and drop counts per step, the full gradients of the first step, the full parameters at
the end. Extra checks whose outcome the tests assert are written to --out/checks.pt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import upcycle_fx  # noqa: E402
from upcycle_fx import distributed as ud  # noqa: E402

from distributed_cases import (CASES, Case, biases, build_model, dropped, global_batch,  # noqa: E402
                               loads, make_optimizer, step_loss)


def full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


def parallel_model(case: Case, mesh) -> torch.nn.Module:
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if case.bf16 else None
    return ud.parallelize(build_model(case), mesh, expert_parallel=case.expert_parallel,
                          ep_degree=case.ep_degree, mp_policy=policy)


def mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


def same_on_all_ranks(value: torch.Tensor) -> bool:
    gathered = [torch.zeros_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value.detach().clone())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def train(case: Case, model, optimizer, mesh, steps: range) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict = {"loss": [], "aux": [], "aux_agree": [], "loads": [], "dropped": [], "grads": None}
    for step in steps:
        optimizer.zero_grad()
        ids = global_batch(step).chunk(world)[rank]
        total, aux_total, agree = 0.0, 0.0, True
        for micro in ids.chunk(case.accumulation):  # gradient accumulation (1: the whole share)
            loss, aux = step_loss(model, micro)
            (loss / case.accumulation).backward()
            total += mean_over_ranks(loss.float()) / case.accumulation
            aux_total += float(aux.detach()) / case.accumulation
            agree = agree and same_on_all_ranks(aux.detach().float())
        record["loss"].append(total)
        record["aux"].append(aux_total)
        record["aux_agree"].append(agree)
        record["loads"].append(loads(model))
        record["dropped"].append(dropped(model))
        if step == 0:
            record["grads"] = {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
            record["grad_norm"] = float(ud.grad_norm(model.parameters()))
        if case.clip is not None:
            ud.clip_grad_norm_(model.parameters(), case.clip)
        optimizer.step()
    record["params"] = {n: full(p) for n, p in model.named_parameters()}
    record["biases"] = biases(model)
    record["placements"] = {n: (str(p.placements), tuple(p.to_local().shape))
                            for n, p in model.named_parameters() if isinstance(p, DTensor)}
    return record


def compute_dtypes(model) -> dict[str, str]:
    """The dtype of the first MoE router's and first attention projection's weights while they
    compute (read by a forward pre-hook, which runs after FSDP has gathered and cast them)."""
    seen: dict[str, str] = {}
    path, moe = upcycle_fx.moe_layers(model)[0]
    attention = model.get_submodule(path.rsplit(".", 1)[0]).self_attn.q_proj

    def recorder(key: str):
        def hook(module, args) -> None:
            seen.setdefault(key, str(module.weight.dtype))
        return hook

    hooks = [module.register_forward_pre_hook(recorder(key))
             for key, module in (("router", moe.router), ("attention", attention))]
    with torch.no_grad():
        model(input_ids=global_batch(0).chunk(dist.get_world_size())[dist.get_rank()])
    for hook in hooks:
        hook.remove()
    return seen


def expect_error(fn, error: type) -> str:
    try:
        fn()
    except error as caught:
        return f"{type(caught).__name__}: {caught}"
    return "no error"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", default="")
    parser.add_argument("--checkpoint", default=None, help="case whose final state is saved to OUT/ckpt")
    parser.add_argument("--load-checkpoint", type=Path, default=None)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    checks: dict = {}
    for name in filter(None, args.cases.split(",")):
        case = CASES[name]
        model = parallel_model(case, mesh)
        optimizer = make_optimizer(case, model)
        record = train(case, model, optimizer, mesh, range(case.steps))
        if name == args.checkpoint:
            ud.save_sharded(model, args.out / "ckpt", optimizer=optimizer)
            resumed = parallel_model(case, mesh)
            resumed_optimizer = make_optimizer(case, resumed)
            ud.load_sharded(resumed, args.out / "ckpt", optimizer=resumed_optimizer)
            checks["resume_params_equal"] = all(
                torch.equal(full(p), record["params"][n]) for n, p in resumed.named_parameters())
            # One more step from the original and from the resumed model: same loss, same params.
            after = train(case, model, optimizer, mesh, range(case.steps, case.steps + 1))
            after_resumed = train(case, resumed, resumed_optimizer, mesh, range(case.steps, case.steps + 1))
            checks["resume_next_loss"] = (after["loss"][0], after_resumed["loss"][0])
            checks["resume_next_params_equal"] = all(
                torch.equal(after["params"][n], after_resumed["params"][n]) for n in after["params"])
        if case.bf16:
            checks["compute_dtypes"] = compute_dtypes(model)
        if rank == 0:
            torch.save(record, args.out / f"{name}.pt")
    if args.load_checkpoint is not None:  # a checkpoint written by another number of ranks
        case = CASES["ep_adamw"]
        model = parallel_model(case, mesh)
        ud.load_sharded(model, args.load_checkpoint)
        checks["loaded_params"] = {n: full(p) for n, p in model.named_parameters()}
    if world == 4:
        odd = Case("odd", expert_parallel=True, num_experts=6)
        checks["indivisible"] = expect_error(lambda: parallel_model(odd, mesh), ud.ExpertParallelError)
        checks["bad_degree"] = expect_error(
            lambda: parallel_model(Case("deg", expert_parallel=True, ep_degree=3), mesh), ud.ExpertParallelError)
    if world == 2:
        case = Case("errors", expert_parallel=True)
        model = parallel_model(case, mesh)
        checks["twice"] = expect_error(lambda: ud.parallelize(model, mesh), ud.ParallelizeError)
        for _, moe in upcycle_fx.moe_layers(model):
            moe.dispatch_impl = "loop"
        checks["loop"] = expect_error(lambda: model(input_ids=global_batch(0).chunk(world)[rank]),
                                      ud.ExpertParallelError)
        checks["degree_without_ep"] = expect_error(
            lambda: ud.parallelize(build_model(Case("fsdp", expert_parallel=False)), mesh, ep_degree=2),
            ud.ParallelizeError)
        dense = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        checks["dense"] = expect_error(lambda: ud.parallelize(dense, mesh), ud.ParallelizeError)
        two_d = init_device_mesh("cpu", (1, world), mesh_dim_names=("a", "b"))
        checks["two_d_mesh"] = expect_error(lambda: ud.parallelize(build_model(case), two_d), ud.ParallelizeError)
    if rank == 0:
        torch.save(checks, args.out / "checks.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
