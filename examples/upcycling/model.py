"""The dense Llama-style decoder, its upcycled variants, checkpoints and FLOPs per token.

Sizes (`SPECS["gpu"]`): d=512, 8 layers, 8 heads, SwiGLU d_ff=1536, sequence 512 bytes,
vocabulary 256 (bytes): 27.5 M parameters, almost all non-embedding. Upcycled with every other
MLP as 8 experts, top-2: 93.6 M parameters, 37.0 M active per token.

FLOPs per trained token (forward + backward), as in benchmarks/train_step.py (PaLM's formula):
6 x (active parameters - input embedding) + 12 x layers x d_model x seq. Active parameters
count the experts a token is routed to (k for top-k, C for expert choice) and the router
(d_model x E per MoE layer), and include the output projection; the input embedding is a lookup.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import upcycle_fx
from upcycle_fx.report import active_parameters, count_parameters

from upcycling import data


@dataclass(frozen=True)
class ModelSpec:
    d_model: int = 512
    layers: int = 8
    heads: int = 8
    d_ff: int = 1536
    seq: int = 512
    vocab: int = data.VOCAB_SIZE


SPECS = {
    "gpu": ModelSpec(),
    "smoke": ModelSpec(d_model=64, layers=4, heads=4, d_ff=128, seq=64),
}


@dataclass(frozen=True)
class Variant:
    """How a continuation arm upcycles the dense checkpoint (the `upcycle_fx.rewrite` knobs
    the experiments vary; everything else is the library default: every other MLP, router
    N(0, 0.02) in float32, no noise, no z-loss)."""

    num_experts: int = 8
    top_k: int = 2
    routing: str = "top_k"
    normalize_weights: bool = True
    expert_init: str = "copy"
    aux_loss_weight: float = 0.01

    def label(self) -> str:
        routing = f"top-{self.top_k}" if self.routing == "top_k" else "expert choice C=2"
        extra = [] if self.normalize_weights else ["no renorm"]
        extra += [] if self.expert_init == "copy" else [f"{self.expert_init} experts"]
        return ", ".join([f"E={self.num_experts}", routing, *extra])


def build_dense(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A freshly initialised LlamaForCausalLM of `spec` (float32, on the CPU)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads, max_position_embeddings=spec.seq,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def upcycle(dense: nn.Module, variant: Variant | None, seed: int) -> nn.Module:
    """A copy of `dense`: unchanged for `variant=None`, else upcycled (router init from `seed`).

    Runs in float32 where `dense` is; for function-preserving variants `rewrite` checks the
    copy against the dense model and raises if they differ."""
    if variant is None:
        return copy.deepcopy(dense)
    return upcycle_fx.rewrite(dense, pattern="every_other_mlp", seed=seed, **asdict(variant))


def flops_per_token(model: nn.Module, spec: ModelSpec) -> float:
    """Training FLOPs per token: 6 x active non-embedding parameters + attention (see module doc)."""
    embedding = model.get_input_embeddings().weight.numel()
    return 6.0 * (active_parameters(model) - embedding) + 12.0 * spec.layers * spec.d_model * spec.seq


def describe(model: nn.Module, spec: ModelSpec) -> dict:
    """Parameters, active parameters per token and FLOPs per token."""
    return {"params": count_parameters(model), "active_params": float(active_parameters(model)),
            "moe_layers": len(upcycle_fx.moe_layers(model)),
            "flops_per_token": flops_per_token(model, spec)}


def save_checkpoint(path: Path, model: nn.Module, spec: ModelSpec, meta: dict) -> None:
    """The float32 master weights of a dense model, its spec and how it was trained."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "spec": asdict(spec), "meta": meta}, path)


def load_checkpoint(path: Path) -> tuple[nn.Module, ModelSpec, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec(**blob["spec"])
    model = build_dense(spec)
    model.load_state_dict(blob["state_dict"])
    return model, spec, blob["meta"]
