"""Rewrite pass: each selected FFN becomes one `MoE`, swapped in by module path.

The graph tells us *what* to replace; the swap happens on the module tree, so the result keeps
the input's class and code (HF `generate()`, `.train()`/`.eval()`, functional dropout all keep
working) and nothing is frozen at capture time (research/anchors-fx-and-style.md §1.10).

Where to put the MoE: the outermost module whose call consumes exactly the FFN input and
creates only FFN nodes (Llama's `mlp`, BERT's `intermediate`, T5's `DenseReluDense`). FFN
modules after it on a straight chain (BERT's `output.dense`, GPT-2's `act`/`c_proj`, OPT's
`activation_fn`/`fc2`) become `FoldedIntoMoE` identities.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..capture.leaves import is_projection_module
from ..config import UpcycleConfig
from ..errors import RewriteError, UpcycleConfigError
from ..moe import MoE, Router
from ..moe.channels import on_channels
from ..moe.expert_init import InitContext, initialize_experts
from ..moe.experts import Experts, FFNWeights
from ..moe.segments import expert_layout, layout_problem, tie_router_groups
from ..moe.shared import SharedExperts
from ..patterns import FFNSite
from ..patterns.plain import module_problem
from .find_mlps import MLPMatch
from .splice import SplicePlan, check_spliceable, enclosing_module, splice
from .stack_routing import settings_for


class FoldedModuleError(RewriteError, AttributeError):
    """Code read an attribute (a weight) of a dense FFN module that the rewrite folded into an MoE."""


class FoldedIntoMoE(nn.Identity):
    """Stands where a dense FFN module was; its work now happens in the MoE at `moe_path`.

    Reading what the dense module had (`.weight`, `.bias`, ...) raises `FoldedModuleError`,
    which names the MoE: such a read sits in code the capture could not see."""

    def __init__(self, moe_path: str, replaced: str) -> None:
        super().__init__()
        self.moe_path, self.replaced = moe_path, replaced

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("moe_path", "replaced"):
                raise
            raise FoldedModuleError(
                f"this {self.replaced} was folded into the MoE at {self.moe_path!r} by the rewrite, so "
                f"its {name!r} no longer exists. Code outside the FFN reads it (code the capture "
                "could not trace); change that code, or leave this FFN dense (pattern=[...]).") from None

    def extra_repr(self) -> str:
        return f"was {self.replaced}, now inside {self.moe_path!r}"


@dataclass(frozen=True)
class SwapPlan:
    """Swap `host` for the MoE and every module in `folded` for an identity; the functional ops
    in `inline` then run on the MoE's output and must become identities (see `inline_ffn`)."""

    host: str
    folded: tuple[str, ...]
    inline: tuple[fx.Node, ...] = ()


def plan_swap(match: MLPMatch) -> SwapPlan | None:
    """The module that will hold the MoE, or None if no module holds exactly this FFN. A
    weight-shared FFN needs one module that holds exactly it in each of its calls."""
    site = match.site
    plans = {_plan_call(call, len(site.every_call)) for call in site.every_call}
    return plans.pop() if len(plans) == 1 else None


def _plan_call(site: FFNSite, calls: int) -> SwapPlan | None:
    region = site.region
    best: tuple[int, SwapPlan] | None = None
    for span in region.spans:
        path = region.absolute(span.path)
        if span.inputs != [site.x] or len(span.outputs) != 1 or region.call_counts[path] != calls:
            continue
        created = [n for n in region.graph.nodes if span.created(n)]
        if any(n not in site.members and n.users for n in created):
            continue
        folded = _straight_tail(span.outputs[0], site, region, calls)
        if folded is None:
            continue
        inline = tuple(n for n, m in folded if m is None)
        folded = [(n, m) for n, m in folded if m is not None]
        covered = set(created) | {n for n, _ in folded} | set(inline)
        if not all(n in covered or n.op == "get_attr" for n in site.members):
            continue
        plan = SwapPlan(path, tuple(region.absolute(n.target) for n, _ in folded), inline)
        if best is None or len(created) > best[0]:
            best = (len(created), plan)
    return None if best is None else best[1]


def _straight_tail(start: fx.Node, site: FFNSite, region,
                   calls: int) -> list[tuple[fx.Node, nn.Module | None]] | None:
    """Leaf modules (and functional dropouts and activations, module None) from `start` to the
    FFN output on a single-user chain, each called once per call of the FFN, or None."""
    from .inline_ffn import is_inline_op  # it builds on this module's FoldedIntoMoE

    tail: list[tuple[fx.Node, nn.Module | None]] = []
    node = start
    while node is not site.y:
        if node not in site.members or len(node.users) != 1:
            return None
        (node,) = node.users
        if is_inline_op(node, site.activation_nodes):
            tail.append((node, None))
            continue
        if node.op != "call_module" or node.all_input_nodes != [node.args[0]] or node.kwargs:
            return None
        module = region.module(node.target)
        if region.call_counts[region.absolute(node.target)] != calls:
            return None
        tail.append((node, module))
    if any(is_projection_module(m) and n is not site.y for n, m in tail):
        return None
    return tail


def _check_replaceable(model: nn.Module, match: MLPMatch, plan: SwapPlan | None) -> None:
    """RewriteError if replacing this FFN would drop something: a use of its weights outside it,
    or a hook / patched forward / parametrization on a module the swap removes."""
    where = f"FFN #{match.index} ({', '.join(match.paths)})"
    uses = [str(u) for u in match.outside_uses if not _inside_host(u.node, match, plan)]
    if uses:
        raise RewriteError(
            f"{where}: its weights are also used outside it ({'; '.join(uses[:3])}), "
            "and the MoE replaces them. Untie them before the rewrite (e.g. give the other use its "
            "own copy of the weight), or leave this FFN dense (pattern=[...] without it).")
    if plan is None:
        return
    removed = [(".".join(q for q in (plan.host, p) if q), m)
               for p, m in model.get_submodule(plan.host).named_modules()]
    removed += [(path, model.get_submodule(path)) for path in plan.folded]
    for path, module in removed:
        problem = module_problem(module, path or "<model>")
        if problem is not None:
            raise RewriteError(f"{where}: the MoE replaces {path or '<model>'}, but: {problem}.")


def _inside_host(node: fx.Node | None, match: MLPMatch, plan: SwapPlan | None) -> bool:
    """Whether a read of the FFN's weight happens inside the module the MoE replaces (T5's
    DenseReluDense reads `self.wo.weight.dtype`): it goes away with that module."""
    if node is None or plan is None:
        return False
    region = match.site.region
    spans = [s for s in region.spans if region.absolute(s.path) == plan.host]
    return node.graph is region.graph and any(s.created(node) for s in spans)


def dense_weights(site: FFNSite, model: nn.Module) -> FFNWeights:
    """The FFN's weights read from `model`, as its family stacks them (`FFNPattern.dense_weights`)."""
    return site.dense_weights(model)


def extract_activation(site: FFNSite) -> nn.Module:
    """The FFN's own activation as a module: a copy of it, or its ops as a small GraphModule."""
    nodes = site.activation_nodes
    region = site.region
    if len(nodes) == 1 and nodes[0].op == "call_module":
        return copy.deepcopy(region.module(nodes[0].target))
    graph = fx.Graph()
    x = graph.placeholder("x")
    env: dict[fx.Node, fx.Node] = {}
    modules: dict[str, nn.Module] = {}
    for node in nodes:
        env[node] = graph.node_copy(node, lambda a: env.get(a, x))
        if node.op == "call_module":
            modules[node.target] = copy.deepcopy(region.module(node.target))
    graph.output(env[nodes[-1]])
    return fx.GraphModule(modules, graph, class_name="Activation")


def build_moe(match: MLPMatch, model: nn.Module, config: UpcycleConfig,
              generator: torch.Generator | None) -> MoE:
    """The MoE for one FFN: experts laid out from its hidden units (copies, segments, shared
    experts: `moe.segments`), initialised by the registered `expert_init` method, and a router
    whose rows are equal within each virtual group of segments."""
    site = match.site
    weights = dense_weights(site, model)
    layout = expert_layout(weights.d_ff, config.num_experts, config.granularity,
                           config.num_shared_experts, config.shared_expert_gate)
    parts = {"activation_name": site.activation, "hidden_dropout": site.hidden_dropout}
    experts = Experts.from_units(weights, layout.routed_units, down_scale=layout.routed_scale,
                                 activation=extract_activation(site), **parts)
    if config.expert_noise_std > 0:
        experts.add_noise(config.expert_noise_std, generator)
    initialize_experts(experts, InitContext(weights, config, generator))
    shared = None
    if layout.shared_units is not None:
        shared = SharedExperts.build(weights, layout.shared_units, config.num_shared_experts,
                                     scale=layout.shared_scale, gated=config.shared_expert_gate,
                                     activation=extract_activation(site), **parts)
    router = Router(site.d_model, config.num_experts, init_std=config.router_init_std,
                    generator=generator, device=weights.up.device, dtype=weights.up.dtype)
    tie_router_groups(router.weight, layout.group_size)
    settings = settings_for(config, match)
    return MoE(router, experts, settings, source=match.path, mlp_index=match.index, shared=shared)


def check_layouts(matches: list[MLPMatch], config: UpcycleConfig) -> None:
    """UpcycleConfigError, before any work, for an FFN the granularity cannot split."""
    for m in matches:
        problem = layout_problem(m.d_ff, config.granularity)
        if problem:
            raise UpcycleConfigError(f"FFN #{m.index} ({m.path}): {problem}, or leave this FFN dense "
                                     "(pattern=[...] without it).")


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put `module` at `path` in `model`; returns the (possibly new) root."""
    if not path:
        return module
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)
    return model


def swap_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put `module` at `path` and at every other path the module there is registered under (a
    module shared by several blocks stays shared); returns the (possibly new) root."""
    old = model.get_submodule(path)
    aliases = [p for p, m in model.named_modules(remove_duplicate=False) if m is old and p != path]
    for alias in [path, *aliases]:
        model = set_submodule(model, alias, module)
    return model


def upcycle_matches(model: nn.Module, matches: list[MLPMatch], config: UpcycleConfig) -> nn.Module:
    """Swap each match for an MoE in `model` (which the caller has already copied if needed).

    Module swaps first; FFNs that no module holds alone are spliced into a re-traced graph of
    their enclosing module afterwards (which then sees the new MoE modules as leaves). Functional
    ops between the swapped modules (BART's activation dropout) become identities through the
    attributes that feed them (`inline_ffn`); an FFN where that is not possible is spliced.
    """
    from .inline_ffn import inline_attributes, neutralize  # it builds on this module's FoldedIntoMoE

    check_layouts(matches, config)
    swaps = {m.index: plan_swap(m) for m in matches}  # plan everything before touching the model
    inline = inline_attributes(model, [(m, swaps[m.index].host, swaps[m.index].inline) for m in matches
                                       if swaps[m.index] is not None and swaps[m.index].inline])
    splices: dict[str, list[MLPMatch]] = {}
    for m in matches:
        if m.index in inline.refused:  # its module is re-traced instead
            swaps[m.index] = None
        _check_replaceable(model, m, swaps[m.index])
        if swaps[m.index] is None:
            splices.setdefault(enclosing_module(m), []).append(m)
    for path in splices:
        check_spliceable(model, path)
    generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
    moes = {m.index: on_channels(build_moe(m, model, config, generator), m.site.channel_dim)
            for m in matches}
    for m in matches:
        plan = swaps[m.index]
        if plan is None:
            continue
        for path in plan.folded:
            replaced = model.get_submodule(path)
            folded = FoldedIntoMoE(plan.host, type(replaced).__name__).train(replaced.training)
            model = swap_module(model, path, folded)
        moe = moes[m.index].train(model.get_submodule(plan.host).training)  # keep the mode it replaces
        model = swap_module(model, plan.host, moe)
    neutralize(model, inline.attributes)
    for path, group in splices.items():
        refused = tuple(inline.refused[m.index] for m in group if m.index in inline.refused)
        model = splice(model, SplicePlan(path, tuple(group), refused), [moes[m.index] for m in group])
    return model
