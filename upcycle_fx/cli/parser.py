"""The argument parser: commands, their options with help and shown defaults, and recipes."""

from __future__ import annotations

import argparse

from .. import __version__
from ..config import ROUTINGS, UpcycleConfig
from ..moe.balancing import BALANCERS
from ..moe.expert_init import DEFAULT_DROP_RATIO, expert_init_names
from ..moe.options import BALANCE_SCOPES
from ..moe.scoring import SCORERS
from .display import console
from .recipe import recipe_defaults

DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMATS = ("native", "hf")
HF_TARGETS = ("auto", "mixtral", "qwen2_moe", "qwen3_moe")
ONNX_TARGETS = ("cpu", "cuda")
DEFAULTS = UpcycleConfig()
MODEL_HELP = "local Hugging Face model directory (default: the built-in all-MiniLM-L6-v2)"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (where it has one) and keeps the description's line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upcycle-fx", description=description,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--traceback", action="store_true",
                        help="on an unexpected error, print the Python traceback (for bug reports)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = _command(sub, "inspect", "list the FFNs found (dry run)")
    inspect.add_argument("model", nargs="?", help=MODEL_HELP)
    _add_pattern(inspect)
    _add_routing(inspect)
    _add_recipe(inspect)

    rewrite = _command(sub, "rewrite", "convert FFNs to MoE and report; with --out, write the model")
    rewrite.add_argument("model", nargs="?", help=MODEL_HELP)
    _add_upcycle_options(rewrite)
    _add_dtype(rewrite)
    rewrite.add_argument("--device", default="cpu",
                         help="where the in-memory rewrite and the check of the result run: cpu, cuda, "
                              "cuda:N")
    rewrite.add_argument("--out", metavar="DIR",
                         help="write the upcycled model to DIR (new or empty; never the input)")
    _add_output_options(rewrite, default_format="native")
    rewrite.add_argument("--no-check", action="store_true",
                         help="with --out: do not load the written model back to measure its error")
    _add_recipe(rewrite)

    onnx = _command(sub, "export-onnx", "upcycle, then export to ONNX (fused com.microsoft::MoE nodes)")
    onnx.add_argument("model", nargs="?", help=MODEL_HELP)
    onnx.add_argument("out_onnx", metavar="OUT.onnx", help="the ONNX file to write (not a directory)")
    _add_upcycle_options(onnx)
    _add_dtype(onnx)
    onnx.add_argument("--portable", action="store_true",
                      help="standard ONNX operators only (no com.microsoft::MoE nodes)")
    onnx.add_argument("--target", choices=ONNX_TARGETS, default="cpu",
                      help="the onnxruntime execution provider the file is for (cpu runs float32 and "
                           "float16, cuda also bfloat16)")
    onnx.add_argument("--overwrite", action="store_true", help="replace an existing OUT.onnx")
    _add_recipe(onnx)

    convert = _command(sub, "convert", "write an upcycle_fx checkpoint in a stock format")
    convert.add_argument("native", metavar="NATIVE_DIR", help="a checkpoint written by rewrite --out "
                                                              "or upcycle_fx.save")
    convert.add_argument("out", metavar="OUT", help="the directory to write (new or empty; never the input)")
    _add_dtype(convert)
    _add_output_options(convert, default_format="hf")
    _add_recipe(convert)
    merge = _command(sub, "merge", "one MoE model from a base and several fine-tunes (one expert each)")
    merge.add_argument("recipe_file", metavar="RECIPE.yaml",
                       help="base_model, experts (source_model, positive_prompts), gate_mode, rest, "
                            "and rewrite options such as top_k (mergekit-moe's layout)")
    merge.add_argument("out", metavar="OUT", help="the directory to write (new or empty; never an input)")
    _add_output_options(merge, default_format="native")
    parser.commands = sub.choices
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; a --recipe's values become the command's defaults, so flags override them."""
    args = parser.parse_args(argv)
    if getattr(args, "recipe", None):
        defaults, unused = recipe_defaults(args.recipe, args.command, parser.commands)
        parser.commands[args.command].set_defaults(**defaults)
        args = parser.parse_args(argv)
        if unused:
            console.print(f"recipe keys not used by {args.command}: {', '.join(unused)}", soft_wrap=True)
    return args


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


def _add_pattern(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pattern", type=str, default=DEFAULTS.pattern,
                        help="which FFNs to convert: every_other_mlp | all | indices like 1,3,5 "
                             "(execution order, see inspect)")


def parse_routing(value):
    """--routing: a name (top_k, expert_choice), or per stack / FFN index: encoder=expert_choice,
    decoder=top_k or 0=top_k,1=expert_choice (a recipe may give a mapping). Whether the stacks
    exist is checked once the model is loaded."""
    if isinstance(value, dict):
        routing = dict(value)
    elif "=" not in value:
        routing = {None: value}
    else:
        routing = {}
        for item in value.split(","):
            key, sep, name = (part.strip() for part in item.partition("="))
            if not sep or not key or not name or "=" in name:
                raise argparse.ArgumentTypeError(
                    f"{value!r}: write STACK=ROUTING pairs separated by commas, e.g. "
                    "encoder=expert_choice,decoder=top_k")
            routing[int(key) if key.isdigit() else key] = name
    for name in routing.values():
        if name not in ROUTINGS:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(ROUTINGS)}")
    return routing.get(None, value) if None in routing else routing


def _add_routing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--routing", type=parse_routing, default=DEFAULTS.routing, metavar="ROUTING",
                        help=f"{' or '.join(ROUTINGS)} for every FFN (top_k for decoders; expert_choice "
                             "for encoders and vision), or per stack of blocks / FFN index, e.g. "
                             "encoder=expert_choice,decoder=top_k (stacks: see inspect)")


def _add_upcycle_options(parser: argparse.ArgumentParser) -> None:
    """The options of the rewrite itself: one per UpcycleConfig field, same name and default."""
    _add_pattern(parser)
    parser.add_argument("--experts", "--num-experts", dest="num_experts", type=int, metavar="E",
                        default=DEFAULTS.num_experts, help="experts per MoE layer")
    parser.add_argument("--top-k", type=int, metavar="K", default=DEFAULTS.top_k, help="experts each token uses")
    _add_routing(parser)
    parser.add_argument("--capacity-factor", type=float, metavar="C", default=DEFAULTS.capacity_factor,
                        help="per-expert token capacity (drops tokens: not function-preserving) "
                             "(default: dropless)")
    parser.add_argument("--normalize", dest="normalize_weights", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS.normalize_weights,
                        help="renormalise the k routing weights to sum to 1 (with copies and no noise "
                             "the model computes exactly the dense function); --no-normalize keeps "
                             "softmax-then-top-k weights")
    parser.add_argument("--router-init-std", type=float, metavar="X", default=DEFAULTS.router_init_std,
                        help="std of the router weights' normal initialisation")
    parser.add_argument("--expert-noise-std", type=float, metavar="X", default=DEFAULTS.expert_noise_std,
                        help="relative std of noise added to each expert copy (breaks symmetry; not "
                             "function-preserving)")
    parser.add_argument("--expert-init", choices=expert_init_names(), default=DEFAULTS.expert_init,
                        help="copy: sparse upcycling; random: re-initialise every expert (ablation); "
                             "drop: Drop-Upcycling, each expert re-draws a share of its hidden units "
                             "(not function-preserving)")
    parser.add_argument("--drop-ratio", type=float, metavar="R", default=DEFAULTS.drop_ratio,
                        help=f"with --expert-init drop: the share of hidden units each expert re-draws "
                             f"(default: {DEFAULT_DROP_RATIO})")
    parser.add_argument("--granularity", type=int, metavar="G", default=DEFAULTS.granularity,
                        help="fine-grained experts: split each FFN into G segments; --experts and --top-k "
                             "count these d_ff/G-wide experts (function-preserving when --top-k is a "
                             "multiple of G, or of G minus the shared experts)")
    parser.add_argument("--shared-experts", dest="num_shared_experts", type=int, metavar="N",
                        default=DEFAULTS.num_shared_experts,
                        help="always-active experts beside the routed ones (segments of the FFN, or copies "
                             "with --granularity 1)")
    parser.add_argument("--shared-expert-gate", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS.shared_expert_gate,
                        help="multiply the shared experts by a sigmoid gate, as Qwen2-MoE does (needed for "
                             "--format hf)")
    parser.add_argument("--aux-loss-weight", type=float, metavar="X", default=DEFAULTS.aux_loss_weight,
                        help="weight of the load-balancing loss recorded for training")
    parser.add_argument("--z-loss-weight", type=float, metavar="X", default=DEFAULTS.z_loss_weight,
                        help="weight of the router z-loss recorded for training")
    _add_routing_options(parser)
    parser.add_argument("--seed", type=int, metavar="N", default=0, help="seed of the router and noise initialisation")


def _add_routing_options(parser: argparse.ArgumentParser) -> None:
    """Scorer, balancer and weight scaling (UpcycleConfig fields of the same names)."""
    parser.add_argument("--scoring", choices=sorted(SCORERS), default=DEFAULTS.scoring,
                        help="router scores: softmax over the experts, or sigmoid per expert "
                             "(DeepSeek-V3; function-preserving with --normalize)")
    parser.add_argument("--balancing", choices=sorted(BALANCERS), default=DEFAULTS.balancing,
                        help="loss: the load-balancing loss; bias: a per-expert selection bias "
                             "updated after each optimizer step (DeepSeek-V3; the loss is still "
                             "added unless --aux-loss-weight 0)")
    parser.add_argument("--bias-update-speed", type=float, metavar="X", default=DEFAULTS.bias_update_speed,
                        help="step of the bias update with --balancing bias")
    parser.add_argument("--balance-scope", choices=BALANCE_SCOPES, default=DEFAULTS.balance_scope,
                        help="global_batch: the load-balancing loss counts expert loads over all "
                             "micro-batches and ranks of an optimizer step")
    parser.add_argument("--routed-scaling-factor", type=float, metavar="X",
                        default=DEFAULTS.routed_scaling_factor,
                        help="factor on the combine weights (not function-preserving unless 1)")
    parser.add_argument("--weight-scaling", action=argparse.BooleanOptionalAction,
                        default=DEFAULTS.weight_scaling,
                        help="with --no-normalize: scale the top-k weights by E/k (softmax) or 2/k "
                             "(sigmoid) so that uniform routing computes the dense function")


def _add_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="dtype of the output weights; auto keeps the input's")


def _add_output_options(parser: argparse.ArgumentParser, *, default_format: str) -> None:
    parser.add_argument("--format", choices=FORMATS, default=default_format,
                        help="native: read back with upcycle_fx.load; hf: a stock transformers MoE "
                             "checkpoint (from Llama/Mistral/Qwen2/Qwen3)")
    parser.add_argument("--hf-target", choices=HF_TARGETS, default="auto",
                        help="with --format hf: the stock architecture (auto picks by family and layers)")
    parser.add_argument("--max-shard-size", default=None,
                        help="output shard limit, e.g. 2GB (default: the largest input shard; 5GB "
                             "when converting in memory)", metavar="SIZE")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a model already in the output directory, once the new one is "
                             "complete (never the input)")


def _add_recipe(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", metavar="YAML",
                        help="read options from this YAML file (keys as the options, e.g. num_experts, "
                             "expert_noise_std); flags given here override it")
