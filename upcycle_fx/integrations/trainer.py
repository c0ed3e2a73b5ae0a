"""`MoETrainerCallback`: the MoE layers' router statistics in the Trainer's own logs.

    trainer = Trainer(model, args, ..., callbacks=[upcycle_fx.MoECallback()])

After every training forward it reads what each `MoE` layer kept (`last_expert_load`,
`last_dropped`, `last_aux_loss`); at each logging step it adds the averages since the last log
to the Trainer's log entry (`trainer.state.log_history`, the console, and the integrations
that come after it in the callback list):

    moe/aux_loss                  weighted aux losses of all layers (what the loss includes)
    moe/<layer>/aux_loss          that layer's weighted aux loss
    moe/<layer>/drop_rate         assignments dropped by the capacity limit / all assignments
    moe/<layer>/load_imbalance    max expert load / mean expert load (1.0 is balanced)
    moe/<layer>/load/<e>          fraction of the layer's kept assignments expert e took
    moe/<layer>/global_balance_loss  balance_scope="global_batch": E·Σ f_e·P_e over the whole
                                  batch of the last optimizer step (all micro-batches, all ranks)
    moe/<layer>/bias_spread       balancing="bias": max − min of the experts' selection biases

At the end of each optimizer step it also calls `upcycle_fx.after_optimizer_step(model)` (bias
updates, a new global batch); the optimizer step hook of `upcycle_fx.moe.balancing` has then
usually done it already, and a second call does nothing.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from transformers import TrainerCallback

from ..moe.balancing import after_optimizer_step
from ..report import moe_layers


class MoETrainerCallback(TrainerCallback):
    """Logs expert loads, drop rates and aux losses of an upcycled model (see module doc).

    `per_expert=False` leaves out the per-expert load fractions (one value per expert and layer).
    """

    def __init__(self, per_expert: bool = True) -> None:
        self.per_expert = per_expert
        self._sums: dict[str, float] = defaultdict(float)
        self._count = 0
        self._step_sums: dict[str, float] = defaultdict(float)  # once per optimizer step
        self._steps = 0

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._collect(model)
        if model is not None:
            after_optimizer_step(model)
            self._collect_step(model)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "loss" not in logs or not self._count:
            return
        metrics = {name: total / self._count for name, total in self._sums.items()}
        metrics.update({name: total / self._steps for name, total in self._step_sums.items()})
        self._sums.clear()
        self._step_sums.clear()
        self._count = self._steps = 0
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def _collect(self, model) -> None:
        layers = [] if model is None else moe_layers(model)
        if not layers or layers[0][1].last_expert_load is None:
            return
        for name, moe in layers:
            metrics = _layer_metrics(moe, self.per_expert)
            for key, value in metrics.items():
                self._sums[f"moe/{name}/{key}"] += value
            self._sums["moe/aux_loss"] += metrics.get("aux_loss", 0.0)
        self._count += 1

    def _collect_step(self, model) -> None:
        """The balancing statistics of the optimizer step that just ended."""
        found = [(name, _step_metrics(moe)) for name, moe in moe_layers(model)]
        for name, metrics in found:
            for key, value in metrics.items():
                self._step_sums[f"moe/{name}/{key}"] += value
        if any(metrics for _, metrics in found):
            self._steps += 1


def _layer_metrics(moe, per_expert: bool) -> dict[str, float]:
    """One layer's statistics of its last forward, as plain floats."""
    load = moe.last_expert_load.detach().float()
    zero = load.new_zeros(())
    dropped = zero if moe.last_dropped is None else moe.last_dropped.detach().float()
    aux = zero if moe.last_aux_loss is None else moe.last_aux_loss.detach().float()
    kept = load.sum()
    summary = torch.stack([dropped / (kept + dropped).clamp_min(1.0),
                           load.max() / load.mean().clamp_min(torch.finfo(load.dtype).tiny), aux])
    values = torch.cat([summary, load / kept.clamp_min(1.0)]).tolist()  # one device sync
    metrics = dict(zip(("drop_rate", "load_imbalance", "aux_loss"), values[:3]))
    if per_expert:
        metrics.update({f"load/{e}": f for e, f in enumerate(values[3:])})
    return metrics


def _step_metrics(moe) -> dict[str, float]:
    """A layer's balancing statistics at the end of an optimizer step (where it has them)."""
    values = {}
    if moe.step_totals.last_step_balance_loss is not None:
        values["global_balance_loss"] = moe.step_totals.last_step_balance_loss.float()
    bias = moe._buffers.get("expert_bias")
    if bias is not None:
        values["bias_spread"] = (bias.max() - bias.min()).float()
    if not values:
        return {}
    return dict(zip(values, torch.stack(list(values.values())).tolist()))  # one device sync
