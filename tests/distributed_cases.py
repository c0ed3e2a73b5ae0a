"""The training runs compared by tests/test_distributed.py: one `Case` per configuration, the
tiny upcycled Llama they train, and the single-process reference they must reproduce.

Shared by the test module (which computes the reference in its own process) and
`distributed_worker.py` (which torchrun starts in several gloo processes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import upcycle_fx

VOCAB, D_MODEL, D_FF, LAYERS, HEADS = 64, 32, 64, 4, 4
BATCH, SEQ = 4, 16  # global batch; rank r of W takes rows r·B/W … (r+1)·B/W − 1


@dataclass(frozen=True)
class Case:
    name: str
    expert_parallel: bool
    ep_degree: int | None = None
    num_experts: int = 4
    routing: str = "top_k"
    capacity_factor: float | None = None
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    optimizer: str = "sgd"           # "sgd" (gradient scale errors show) or "adamw"
    steps: int = 3
    clip: float | None = None
    bf16: bool = False                # FSDP MixedPrecisionPolicy(bf16 params, fp32 reduce)
    router_std: float = 0.2
    family: str = "llama"             # or "gpt2": biased, non-gated GELU experts, tied embeddings
    accumulation: int = 1             # micro-batches per optimizer step (gradient accumulation)
    scoring: str = "softmax"
    balancing: str = "loss"
    bias_update_speed: float = 0.001
    balance_scope: str = "micro_batch"
    granularity: int = 1              # fine-grained experts of d_ff / granularity hidden units
    num_shared_experts: int = 0
    top_k: int = 2

    @property
    def per_rank_routing(self) -> bool:
        """Capacity routings choose within each rank's batch (the routing group)."""
        return self.routing == "expert_choice" or self.capacity_factor is not None

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(case: Case) -> torch.nn.Module:
    """The same upcycled Llama (float32, CPU) in every process: fixed seeds."""
    import transformers

    if case.family == "gpt2":  # dropout off: the processes' random streams differ from one process's
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_inner=D_FF, n_layer=LAYERS,
                                         n_head=HEADS, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)
        model_class = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=64,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model_class = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    dense = model_class(config)
    model = upcycle_fx.rewrite(dense, num_experts=case.num_experts, top_k=case.top_k, routing=case.routing,
                               capacity_factor=case.capacity_factor, aux_loss_weight=case.aux_loss_weight,
                               z_loss_weight=case.z_loss_weight, router_init_std=case.router_std,
                               scoring=case.scoring, balancing=case.balancing,
                               bias_update_speed=case.bias_update_speed, balance_scope=case.balance_scope,
                               granularity=case.granularity, num_shared_experts=case.num_shared_experts,
                               shared_expert_gate=case.num_shared_experts > 0,
                               expert_noise_std=0.01, seed=0, verify=False)
    return model.train()


def global_batch(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)


def make_optimizer(case: Case, model: torch.nn.Module) -> torch.optim.Optimizer:
    if case.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)


def step_loss(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(task + aux loss, aux loss) of one forward on `ids`: in training mode `outputs.loss` already
    holds the aux losses."""
    out = model(input_ids=ids, labels=ids)
    return out.loss, upcycle_fx.aux_loss(model)


def loads(model: torch.nn.Module) -> list[list[int]]:
    return [m.last_expert_load.tolist() for _, m in upcycle_fx.moe_layers(model)]


def dropped(model: torch.nn.Module) -> int:
    return sum(int(m.last_dropped) for _, m in upcycle_fx.moe_layers(model))


def micro_batches(ids: torch.Tensor, world: int, accumulation: int) -> list[torch.Tensor]:
    """The single-process micro-batches of a data-parallel step with gradient accumulation:
    micro-batch m holds every rank's m-th micro-batch (rank r's rows are ids.chunk(world)[r])."""
    shards = [shard.chunk(accumulation) for shard in ids.chunk(world)]
    return [torch.cat([shard[m] for shard in shards]) for m in range(accumulation)]


def biases(model: torch.nn.Module) -> list[list[float]]:
    return [m.expert_bias.tolist() for _, m in upcycle_fx.moe_layers(model) if "expert_bias" in m._buffers]


def reference_run(case: Case, world: int) -> dict:
    """Single-process training on the global batch: one forward for dropless top-k; for capacity
    routings one forward per rank's share with the gradients accumulated (what routing within
    each rank's batch means), the loss being the mean over the shares."""
    model = build_model(case)
    optimizer = make_optimizer(case, model)
    record: dict = {"loss": [], "aux": [], "loads": [], "dropped": [], "grads": None}
    for step in range(case.steps):
        optimizer.zero_grad()
        ids = global_batch(step)
        if case.accumulation > 1:
            total, aux_total = 0.0, 0.0
            for micro in micro_batches(ids, world, case.accumulation):
                loss, aux = step_loss(model, micro)
                (loss / case.accumulation).backward()
                total += float(loss.detach()) / case.accumulation
                aux_total += float(aux.detach()) / case.accumulation
            record["loss"].append(total)
            record["aux"].append(aux_total)
            record["loads"].append(loads(model))
            record["dropped"].append(dropped(model))
        elif case.per_rank_routing:
            total, aux_total, step_loads, step_dropped = 0.0, 0.0, None, 0
            for shard in ids.chunk(world):
                loss, aux = step_loss(model, shard)
                (loss / world).backward()
                total += float(loss.detach()) / world
                aux_total += float(aux.detach()) / world
                shard_loads = torch.tensor(loads(model))
                step_loads = shard_loads if step_loads is None else step_loads + shard_loads
                step_dropped += dropped(model)
            record["loss"].append(total)
            record["aux"].append(aux_total)
            record["loads"].append(step_loads.tolist())
            record["dropped"].append(step_dropped)
        else:
            loss, aux = step_loss(model, ids)
            loss.backward()
            record["loss"].append(float(loss.detach()))
            record["aux"].append(float(aux.detach()))
            record["loads"].append(loads(model))
            record["dropped"].append(dropped(model))
        if step == 0:
            record["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        if case.clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip)
        optimizer.step()
    record["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    record["biases"] = biases(model)
    record["model"] = model
    return record


CASES = {case.name: case for case in [
    # 2 ranks
    Case("fsdp_sgd", expert_parallel=False, clip=0.5),
    Case("ep_sgd", expert_parallel=True, clip=0.5, z_loss_weight=1e-3),
    Case("fsdp_adamw", expert_parallel=False, optimizer="adamw"),
    Case("ep_adamw", expert_parallel=True, optimizer="adamw"),
    Case("ep_expert_choice", expert_parallel=True, routing="expert_choice", z_loss_weight=1e-3),
    Case("fsdp_expert_choice", expert_parallel=False, routing="expert_choice"),
    Case("ep_capacity", expert_parallel=True, capacity_factor=1.0, aux_loss_weight=0.0, z_loss_weight=1e-3),
    Case("ep_bf16", expert_parallel=True, optimizer="adamw", bf16=True),
    Case("ep_gpt2", expert_parallel=True, family="gpt2", clip=0.5),
    # 4 ranks: a 2 x 2 grid (2 experts per rank, FSDP over 2 replicas), EP over all 4, and
    # 1 expert per rank sharded by FSDP on another dim (2 experts, ep 2, 2 replicas)
    Case("grid_sgd", expert_parallel=True, ep_degree=2),
    Case("ep4_sgd", expert_parallel=True, ep_degree=4),
    Case("grid_e2_sgd", expert_parallel=True, ep_degree=2, num_experts=2),
]}
TWO_RANK_CASES = ["fsdp_sgd", "ep_sgd", "fsdp_adamw", "ep_adamw", "ep_expert_choice", "fsdp_expert_choice",
                  "ep_capacity", "ep_bf16", "ep_gpt2"]
FOUR_RANK_CASES = ["grid_sgd", "ep4_sgd", "grid_e2_sgd"]
# Gradient accumulation over 2 micro-batches on 2 ranks, the load-balancing loss over the global
# batch and sigmoid scores with bias balancing (run by tests/test_global_batch_balance.py).
BALANCE_CASES = {case.name: case for case in [
    Case("fsdp_global_bias", expert_parallel=False, accumulation=2, balance_scope="global_batch",
         scoring="sigmoid", balancing="bias", bias_update_speed=0.01, aux_loss_weight=0.1),
    Case("ep_global_batch", expert_parallel=True, accumulation=2, balance_scope="global_batch",
         aux_loss_weight=0.1),
]}
CASES.update(BALANCE_CASES)
# Fine-grained experts (8 of d_ff/4, top-4) beside one gated shared expert, on 2 ranks.
RECIPE_CASES = {case.name: case for case in [
    Case("fsdp_granular_shared", expert_parallel=False, num_experts=6, top_k=3, granularity=4,
         num_shared_experts=1),
    Case("ep_granular_shared", expert_parallel=True, num_experts=6, top_k=3, granularity=4,
         num_shared_experts=1),
]}
CASES.update(RECIPE_CASES)
