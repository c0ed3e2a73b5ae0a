"""upcycle_fx: turn a trained dense transformer into a sparse Mixture-of-Experts model.

    moe_model = upcycle_fx.rewrite(model, pattern="every_other_mlp", num_experts=8, top_k=2)
"""

from .api import UpcycleResult, aux_loss, find_mlps, moe_layers, rewrite, upcycle
from .config import UpcycleConfig
from .errors import (AlreadyMoEError, CaptureError, NoMLPFoundError, NoMLPSelectedError,
                     RewriteError, UpcycleConfigError, UpcycleError)
from .moe import MoE
from .moe.balancing import after_optimizer_step, register_balancer
from .moe.scoring import register_scorer
from .passes import FoldedIntoMoE, MLPMatch
from .passes.decisions import Decision
from .moe.expert_init import register_expert_init
from .passes.stack_routing import NonCausalRoutingWarning
from .patterns import register_activation
from .exporters.checkpoint import load, save
from .exporters.errors import (CheckpointError, CheckpointMismatchError, HFFormatError,
                               MissingShardError, OutputExistsError, TruncatedShardError)
from .exporters.errors import (CheckpointDtypeError, CheckpointWriteError, InterruptedReplaceError,
                               LeftoverOutputWarning, ManifestError, NotACheckpointError,
                               OutputOverlapsInputError, ShardSizeError, TerminatedDuringWriteError)
from .exporters.streaming import ConversionReport, convert_checkpoint
from .exporters.onnx import OnnxExportError, export_onnx
from .merge import ExpertSourceError, merge_experts
from .integrations import aux_loss_in_output, register_with_transformers, set_aux_loss_in_output

__version__ = "0.1.0"

__all__ = [
    "rewrite", "upcycle", "find_mlps", "moe_layers", "aux_loss", "UpcycleConfig", "UpcycleResult",
    "MoE", "MLPMatch", "FoldedIntoMoE", "register_activation", "UpcycleError", "UpcycleConfigError",
    "CaptureError", "AlreadyMoEError", "NoMLPFoundError", "NoMLPSelectedError", "RewriteError", "__version__",
    "save", "load", "convert_checkpoint", "ConversionReport", "CheckpointError",
    "CheckpointMismatchError", "HFFormatError", "MissingShardError", "OutputExistsError",
    "TruncatedShardError", "export_onnx", "OnnxExportError", "distributed",
    "set_aux_loss_in_output", "aux_loss_in_output", "MoECallback",
    "CheckpointDtypeError", "CheckpointWriteError", "InterruptedReplaceError", "LeftoverOutputWarning",
    "ManifestError", "NotACheckpointError", "OutputOverlapsInputError", "ShardSizeError",
    "TerminatedDuringWriteError", "merge_experts", "ExpertSourceError", "Decision", "NonCausalRoutingWarning",
    "after_optimizer_step", "register_scorer", "register_balancer", "register_expert_init",
]

register_with_transformers()  # from_pretrained of saved upcycled models; transformers stays unimported


def __getattr__(name: str):
    """`upcycle_fx.distributed` (FSDP2 + expert parallelism) is imported on first use: it pulls in
    torch.distributed.checkpoint, which single-process users need not pay for."""
    if name == "MoECallback":  # a transformers.TrainerCallback: imports transformers
        from .integrations.trainer import MoETrainerCallback

        return MoETrainerCallback
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
