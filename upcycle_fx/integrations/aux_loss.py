"""The auxiliary losses in `outputs.loss`: a forward hook on the model's root module.

Training loops built on `transformers` (`Trainer`, TRL, accelerate scripts) backpropagate
`outputs.loss`. Without the router losses in it, the routers train without load balancing and
nobody notices, so an upcycled model adds `upcycle_fx.aux_loss(model)` to the loss it returns,
in training mode only and only when the output carries a loss (a dict or `ModelOutput` with a
`"loss"` entry that is not None). The hook is an object stored on the module, so it survives
`copy.deepcopy` and pickling; `from_pretrained` re-installs it (see `hf_quantizer.py`).

With gradient accumulation, the `Trainer` normalises a model's loss by the label tokens of
the whole accumulated batch (`num_items_in_batch`) and then sums the micro-batches; the aux term
is weighted the same way (this micro-batch's share of those tokens), so its weight per optimizer
step does not grow with the number of accumulation steps. With `balance_scope="global_batch"`
each micro-batch's load-balancing loss already counts the expert loads of the step's earlier
micro-batches (see `upcycle_fx.moe.balancing`); the weighting is the same.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from torch import nn


class AuxLossInOutput:
    """Forward hook adding the MoE layers' weighted auxiliary losses to `output["loss"]`."""

    def __init__(self, enabled: bool = True, shifts_labels: bool = False) -> None:
        self.enabled = enabled
        self.shifts_labels = shifts_labels  # causal LM: position 0 of each row is no target

    def __call__(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        if not (self.enabled and module.training and isinstance(output, MutableMapping)):
            return None
        loss = output.get("loss")
        if loss is None:
            return None
        from ..api import aux_loss

        output["loss"] = loss + (aux_loss(module) * self.share(kwargs)).to(loss.dtype)
        return output

    def share(self, kwargs: dict[str, Any]) -> Any:
        """This forward's share of the accumulated batch's label tokens, counted as the Trainer
        counts them; 1 when the loss is not normalised over an accumulated batch."""
        total = kwargs.get("num_items_in_batch")
        labels = kwargs.get("shift_labels")
        if labels is None:
            labels = kwargs.get("labels")
            if labels is not None and self.shifts_labels:
                labels = labels[..., 1:]
        if total is None or labels is None or not hasattr(labels, "ne"):
            return 1.0
        return labels.ne(-100).sum() / total


def installed_hook(model: nn.Module) -> AuxLossInOutput | None:
    return next((h for h in model._forward_hooks.values() if isinstance(h, AuxLossInOutput)), None)


def set_aux_loss_in_output(model: nn.Module, enabled: bool = True) -> None:
    """Add (default) or stop adding `upcycle_fx.aux_loss(model)` to the training loss that
    `model` returns. The choice is saved with `save_pretrained` and comes back with
    `from_pretrained`."""
    hook = installed_hook(model)
    if hook is None:
        model.register_forward_hook(AuxLossInOutput(enabled), with_kwargs=True)
    else:
        hook.enabled = enabled
    record = getattr(getattr(getattr(model, "config", None), "quantization_config", None),
                     "aux_loss_in_output", None)
    if record is not None:
        model.config.quantization_config.aux_loss_in_output = enabled


def aux_loss_in_output(model: nn.Module) -> bool:
    """Whether `model`'s returned training loss includes the auxiliary losses."""
    hook = installed_hook(model)
    return hook is not None and hook.enabled
