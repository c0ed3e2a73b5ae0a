"""`upcycle-fx merge RECIPE.yaml OUT`: one MoE model from a base and several fine-tunes."""

from __future__ import annotations

import time

from ..config import UpcycleConfig
from ..merge import REST, ROUTER_INITS, merge_experts
from ..report import moe_layers
from ..sources import load_pretrained, model_directory
from .commands import IN_MEMORY_SHARD_SIZE, output_dtype
from .display import console, step
from .errors import RecipeError
from .merge_recipe import read_merge_recipe
from .parser import DTYPES
from .safety import check_output_directory, shard_size


def cmd_merge(args) -> int:
    from ..exporters import save

    recipe = read_merge_recipe(args.recipe_file)
    for name, value, choices in (("rest", recipe.rest, REST), ("gate_mode", recipe.router_init, ROUTER_INITS),
                                 ("dtype", recipe.dtype, DTYPES)):
        if value not in choices:
            raise RecipeError(f"{args.recipe_file}: {name} {value!r} is unknown; choose one of {choices}")
    UpcycleConfig(**{"top_k": min(2, len(recipe.experts)), **recipe.options,
                     "num_experts": len(recipe.experts)})  # named errors before loading anything
    directories = [model_directory(d) for d in recipe.directories]
    out = directories[0]
    for directory in directories:
        out = check_output_directory(directory, args.out)
    max_bytes = shard_size(args.max_shard_size) or IN_MEMORY_SHARD_SIZE
    dtype = output_dtype(recipe.dtype)
    with step(f"loading the base and {len(recipe.experts)} expert sources"):
        base, *sources = [load_pretrained(d, dtype=dtype).model for d in directories]
    prompts = negatives = None
    if recipe.router_init == "hidden":
        tokenize = _tokenizer(directories[0])
        prompts = [[tokenize(p) for p in s.positive] for s in recipe.experts]
        negatives = [[tokenize(p) for p in s.negative] for s in recipe.experts]
    with step("merging the experts"):
        model = merge_experts(base, sources, rest=recipe.rest, router_init=recipe.router_init,
                              prompts=prompts, negative_prompts=negatives if any(negatives or []) else None,
                              **recipe.options)
    args.outcome.target = out
    start = time.perf_counter()
    save(model.eval(), out, format=args.format, hf_target=args.hf_target, max_shard_size=max_bytes,
         overwrite=args.overwrite)
    args.outcome.written = True
    layers = moe_layers(model)
    console.print(f"[green]✓[/] wrote {out} ({args.format}, {time.perf_counter() - start:.1f} s): "
                  f"{len(layers)} MoE layers of {len(sources)} experts (expert e = experts[e] of the "
                  f"recipe), routers {recipe.router_init}, other weights from "
                  f"{'the base' if recipe.rest == 'base' else 'the mean of the sources'}")
    return 0


def _tokenizer(directory):
    """tokenize(text) -> the base model's tokenizer output for one prompt (a dict of tensors)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any failure means: no usable tokenizer there
        raise RecipeError(f"gate_mode hidden tokenizes the prompts with the base model's tokenizer, "
                          f"and {directory} has none that loads ({type(error).__name__}: {error}); "
                          "add its tokenizer files or use gate_mode random") from None
    return lambda text: dict(tokenizer(text, return_tensors="pt"))
