"""FSDP2 + expert parallelism on the CPU: gloo, 2 and 4 processes started by torchrun.

Every distributed run (`distributed_worker.py`) is checked against single-process training of
the same model on the same global batch (`distributed_cases.reference_run`), in float32:
losses, aux losses, global expert loads and drop counts at every step, the full gradients of
the first step and the parameters after 3 optimiser steps (SGD with momentum, where a wrong
gradient scale shows, and AdamW). Capacity routings choose within each rank's batch, so their
reference accumulates gradients over the ranks' shares.

The two torchrun launches run once per session (module fixtures, ~30 s on 2 cores together).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import upcycle_fx
from upcycle_fx.distributed import ExpertParallelError, ParallelizeError, consolidate
from upcycle_fx.distributed.expert_parallel import check_divisible
from upcycle_fx.distributed.mesh import check_data_mesh, resolve_ep_degree

from distributed_cases import (CASES, FOUR_RANK_CASES, TWO_RANK_CASES, Case, build_model, global_batch,
                               reference_run)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
FP32_TOLERANCE = 1e-5     # relative for losses and gradients, absolute for parameters
BF16_TOLERANCE = 1e-2     # relative, on losses (bf16 has 8 significant bits: eps 7.8e-3)


def torchrun(world: int, out: Path, *args: str) -> None:
    """Run the worker in `world` gloo processes; fail with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               str(TESTS / "distributed_worker.py"), "--out", str(out), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"{world}-process run failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    torchrun(2, out, "--cases", ",".join(TWO_RANK_CASES), "--checkpoint", "ep_adamw")
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory, two_ranks) -> Path:
    out = tmp_path_factory.mktemp("four_ranks")
    torchrun(4, out, "--cases", ",".join(FOUR_RANK_CASES), "--load-checkpoint", str(two_ranks / "ckpt"))
    return out


@functools.lru_cache(maxsize=None)
def reference(name: str, world: int) -> dict:
    return reference_run(CASES[name], world)


def load(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=False)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def assert_matches_single_process(run: dict, ref: dict, tolerance: float = FP32_TOLERANCE) -> None:
    for step, (got, want) in enumerate(zip(run["loss"], ref["loss"])):
        assert relative(got, want) <= tolerance, f"step {step}: loss {got} vs single process {want}"
    for step, (got, want) in enumerate(zip(run["aux"], ref["aux"])):
        assert abs(got - want) <= tolerance * max(abs(want), 1e-3), f"step {step}: aux {got} vs {want}"
    assert all(run["aux_agree"]), "ranks disagree on the aux loss"
    assert run["loads"] == ref["loads"], "global expert loads differ from single process"
    assert run["dropped"] == ref["dropped"]
    assert run["grads"].keys() == ref["grads"].keys()
    for name, want in ref["grads"].items():
        error = float((run["grads"][name] - want).abs().max() / want.abs().max().clamp_min(1e-30))
        assert error <= tolerance, f"first-step gradient of {name}: relative error {error:.2e}"
    want_norm = float(torch.nn.utils.get_total_norm(list(ref["grads"].values())))
    assert relative(run["grad_norm"], want_norm) <= tolerance, "grad_norm across meshes"
    for name, want in ref["params"].items():
        error = float((run["params"][name] - want).abs().max())
        assert error <= tolerance, f"{name} after {len(ref['loss'])} steps: max abs error {error:.2e}"


FP32_TWO_RANK = [name for name in TWO_RANK_CASES if not CASES[name].bf16]


@pytest.mark.slow
@pytest.mark.parametrize("name", FP32_TWO_RANK)
def test_two_ranks_train_like_one_process(two_ranks, name):
    """FSDP2 alone and FSDP2 + EP over 2 ranks: the same losses, aux losses, loads, gradients
    and parameters as one process on the global batch (SGD, AdamW, clipping, expert choice,
    capped top-k with drops, z-loss; GPT-2: biased experts and tied embeddings)."""
    assert_matches_single_process(load(two_ranks, name), reference(name, 2))


@pytest.mark.slow
@pytest.mark.parametrize("name", FOUR_RANK_CASES)
def test_four_ranks_train_like_one_process(four_ranks, name):
    """4 ranks: a 2 x 2 (dp_mod_ep x ep) grid, EP over all 4, and 2 experts on a 2 x 2 grid
    (one expert per rank, FSDP-sharded on a non-expert dim)."""
    assert_matches_single_process(load(four_ranks, name), reference(name, 4))


def test_find_blocks_finds_the_transformer_blocks():
    """FSDP's units: the repeated blocks of each stack (T5: encoder and decoder apart)."""
    from upcycle_fx.distributed import find_blocks

    from helpers import build

    for name, expected in [("llama", [f"model.layers.{i}" for i in range(4)]),
                           ("t5", [f"{s}.block.{i}" for s in ("encoder", "decoder") for i in range(4)]),
                           ("gpt2", [f"transformer.h.{i}" for i in range(4)])]:
        model = upcycle_fx.rewrite(build(name), seed=0)
        paths = {id(module): path for path, module in model.named_modules()}
        assert [paths[id(block)] for block in find_blocks(model)] == expected, name


def test_the_cases_exercise_what_they_claim():
    """The comparisons have power: routing matters (experts differ), the capped case drops
    assignments, and the global load-balancing loss differs from the mean of per-rank ones (so
    averaging local aux losses would fail the aux comparison)."""
    capped = reference("ep_capacity", 2)
    assert min(capped["dropped"]) > 0
    model = build_model(CASES["ep_sgd"])
    with torch.no_grad():
        experts = upcycle_fx.moe_layers(model)[0][1].experts
        assert float((experts.up_proj[0] - experts.up_proj[1]).abs().max()) > 1e-3
        ids = global_batch(0)
        model(input_ids=ids)
        global_aux = float(upcycle_fx.aux_loss(model))
        per_rank = []
        for shard in ids.chunk(2):
            model(input_ids=shard)
            per_rank.append(float(upcycle_fx.aux_loss(model)))
    assert abs(global_aux - sum(per_rank) / 2) > 100 * FP32_TOLERANCE * global_aux
    assert relative(global_aux, reference("ep_sgd", 2)["aux"][0]) <= FP32_TOLERANCE


@pytest.mark.slow
def test_expert_weights_are_dtensors_sharded_on_the_expert_dim(two_ranks, four_ranks):
    """EP: every stacked expert parameter is a DTensor sharded Shard(0) over `ep` (its last mesh
    dim), each rank holding E / (ep · replicas) experts, or, when the local experts do not split
    over the replicas, 1 expert sharded by FSDP on another dim."""
    def experts(placements: dict) -> dict:
        return {name: value for name, value in placements.items() if ".experts." in name}

    two = experts(load(two_ranks, "ep_sgd")["placements"])
    assert set(two) == {f"model.layers.{i}.mlp.experts.{p}" for i in (1, 3) for p in ("up_proj", "down_proj")}
    for name, (placements, local_shape) in two.items():
        assert placements.endswith("Shard(dim=0))") and local_shape[0] == 2, (name, placements)
    grid = experts(load(four_ranks, "grid_sgd")["placements"])
    assert all(placements.endswith("Shard(dim=0))") and shape[0] == 1 for placements, shape in grid.values())
    e2 = experts(load(four_ranks, "grid_e2_sgd")["placements"])
    up = e2["model.layers.1.mlp.experts.up_proj"]
    assert up == ("(Shard(dim=1), Shard(dim=0))", (1, 64, 32)), up   # [2, 128, 32] split 2 x 2
    # FSDP alone: every parameter, experts included, is one Shard(0) DTensor over the 2 ranks.
    fsdp = load(two_ranks, "fsdp_sgd")["placements"]
    assert len(fsdp) == len(load(two_ranks, "fsdp_sgd")["params"])
    assert {placements for placements, _ in fsdp.values()} == {"(Shard(dim=0),)"}


@pytest.mark.slow
def test_bf16_mixed_precision_matches_at_bf16_level(two_ranks):
    """FSDP2 + EP with bf16 parameters and float32 reduction against float32 single-process
    training: losses within bf16 resolution; routers compute from float32 weights while the rest
    of the block computes in bf16."""
    run, ref = load(two_ranks, "ep_bf16"), reference("ep_bf16", 2)
    for got, want in zip(run["loss"], ref["loss"]):
        assert relative(got, want) <= BF16_TOLERANCE, (got, want)
    assert all(run["aux_agree"])
    checks = torch.load(two_ranks / "checks.pt", weights_only=False)
    assert checks["compute_dtypes"] == {"router": "torch.float32", "attention": "torch.bfloat16"}


@pytest.mark.slow
def test_resume_from_a_sharded_checkpoint(two_ranks):
    """save_sharded then load_sharded into a fresh parallelized model (with the AdamW state):
    identical parameters, and the next step gives the same loss and parameters."""
    checks = torch.load(two_ranks / "checks.pt", weights_only=False)
    assert checks["resume_params_equal"]
    original, resumed = checks["resume_next_loss"]
    assert original == resumed
    assert checks["resume_next_params_equal"]


@pytest.mark.slow
def test_checkpoint_from_two_ranks_loads_on_four(two_ranks, four_ranks):
    """DCP reshards: the 2-rank EP checkpoint loads into a 4-rank (2 x 2 grid) model exactly."""
    loaded = torch.load(four_ranks / "checks.pt", weights_only=False)["loaded_params"]
    saved = load(two_ranks, "ep_adamw")["params"]
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)


@pytest.mark.slow
def test_consolidate_gives_the_single_process_model(two_ranks, tmp_path):
    """The sharded checkpoint becomes an ordinary upcycled model in this process: the trained
    parameters exactly, the single-process model's logits, and upcycle_fx.save / load work."""
    model = consolidate(two_ranks / "ckpt")
    assert type(model).__name__ == "LlamaForCausalLM" and model.training
    assert all(moe.parallel is None and type(moe.experts).__name__ == "Experts"
               for _, moe in upcycle_fx.moe_layers(model))
    trained = load(two_ranks, "ep_adamw")["params"]
    params = dict(model.named_parameters())
    assert params.keys() == trained.keys()
    assert all(torch.equal(params[name], trained[name]) for name in trained)
    ids = global_batch(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = reference("ep_adamw", 2)["model"](input_ids=ids).logits
    assert float((logits - expected).abs().max() / expected.abs().max()) <= FP32_TOLERANCE
    upcycle_fx.save(model, tmp_path / "native")
    again = upcycle_fx.load(tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)


@pytest.mark.slow
def test_named_errors_in_processes(two_ranks, four_ranks):
    two = torch.load(two_ranks / "checks.pt", weights_only=False)
    four = torch.load(four_ranks / "checks.pt", weights_only=False)
    assert two["twice"].startswith("ParallelizeError") and "already parallelized" in two["twice"]
    assert two["loop"].startswith("ExpertParallelError") and "'loop'" in two["loop"]
    assert two["two_d_mesh"].startswith("ParallelizeError") and "1-D mesh" in two["two_d_mesh"]
    assert two["degree_without_ep"].startswith("ParallelizeError") and "expert_parallel=True" in two["degree_without_ep"]
    assert two["dense"].startswith("ParallelizeError") and "no upcycle_fx.MoE layer" in two["dense"]
    assert four["indivisible"].startswith("ExpertParallelError")
    assert "6 experts" in four["indivisible"] and "divisible by 4" in four["indivisible"]
    assert four["bad_degree"].startswith("ExpertParallelError") and "ep_degree=3" in four["bad_degree"]


def test_errors_raised_before_any_collective():
    """The checks that need no process group raise the named errors directly."""
    with pytest.raises(ExpertParallelError, match="does not divide the 4 ranks"):
        resolve_ep_degree(4, 3)
    assert resolve_ep_degree(8, None) == 8 and resolve_ep_degree(8, 2) == 2
    with pytest.raises(ExpertParallelError, match=r"model\.layers\.1\.mlp \(6 experts\)"):
        check_divisible(build_model(Case("six", expert_parallel=True, num_experts=6)), 4)
    with pytest.raises(ParallelizeError, match="DeviceMesh"):
        check_data_mesh("cuda")


def test_single_process_path_is_untouched():
    """Without parallelize, MoE layers have no hook and compute their statistics locally."""
    model = build_model(CASES["ep_sgd"])
    ids = global_batch(0)
    model(input_ids=ids)
    for _, moe in upcycle_fx.moe_layers(model):
        assert moe.parallel is None
        assert int(moe.last_expert_load.sum()) == ids.numel() * 2
