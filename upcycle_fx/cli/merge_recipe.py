"""The recipe of `upcycle-fx merge`: a base model, one source per expert, and how to mix them.

The same shape as mergekit-moe's files, so those carry over:

    base_model: ./base                # dense Hugging Face model directory
    experts:
      - source_model: ./fine-tune-code
        positive_prompts: ["def main():", "import numpy as np"]
        negative_prompts: []          # optional
      - source_model: ./fine-tune-math
        positive_prompts: ["Solve for x:"]
    gate_mode: hidden                 # hidden | random   (router_init)
    rest: base                        # base | average    (non-expert weights)
    top_k: 2                          # and any other rewrite option: pattern, routing, seed, ...
    dtype: auto                       # output dtype: auto | float32 | bfloat16 | float16
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import UpcycleConfig
from .errors import RecipeError
from .recipe import read_recipe

FILE_KEYS = {"base_model", "experts", "gate_mode", "router_init", "rest", "dtype"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts"}
OPTION_KEYS = set(UpcycleConfig.__dataclass_fields__) - {"num_experts", "expert_init", "expert_noise_std"}


@dataclass
class ExpertSource:
    model: Path
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)


@dataclass
class MergeRecipe:
    base: Path
    experts: list[ExpertSource]
    router_init: str = "random"
    rest: str = "base"
    dtype: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def directories(self) -> list[Path]:
        return [self.base, *(e.model for e in self.experts)]


def read_merge_recipe(path: str) -> MergeRecipe:
    """The merge recipe in the YAML file `path`; RecipeError naming the key that is wrong.
    Relative model paths are taken from the recipe's own directory."""
    data = read_recipe(path)
    where = Path(path).resolve().parent
    unknown = sorted(set(data) - FILE_KEYS - OPTION_KEYS)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {unknown}; the keys are "
                          f"{', '.join(sorted(FILE_KEYS | OPTION_KEYS))}")
    if "gate_mode" in data and "router_init" in data:
        raise RecipeError(f"{path}: give gate_mode or router_init, not both (they are one setting)")
    base = _model_path(path, where, data.get("base_model"), "base_model")
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise RecipeError(f"{path}: experts must be a list with one entry per expert "
                          "(each with source_model and, for gate_mode hidden, positive_prompts)")
    sources = []
    for i, entry in enumerate(experts):
        if not isinstance(entry, dict) or "source_model" not in entry:
            raise RecipeError(f"{path}: experts[{i}] must be a mapping with source_model")
        extra = sorted(set(entry) - EXPERT_KEYS)
        if extra:
            raise RecipeError(f"{path}: experts[{i}] has unknown key(s) {extra}; the keys are "
                              f"{', '.join(sorted(EXPERT_KEYS))}")
        sources.append(ExpertSource(_model_path(path, where, entry["source_model"], f"experts[{i}].source_model"),
                                    _prompts(path, entry, "positive_prompts", i),
                                    _prompts(path, entry, "negative_prompts", i)))
    router_init = data.get("gate_mode", data.get("router_init", "random"))
    options = {k: v for k, v in data.items() if k in OPTION_KEYS}
    recipe = MergeRecipe(base, sources, router_init, data.get("rest", "base"), data.get("dtype", "auto"), options)
    if recipe.router_init == "hidden" and not all(s.positive for s in sources):
        missing = [i for i, s in enumerate(sources) if not s.positive]
        raise RecipeError(f"{path}: gate_mode hidden needs positive_prompts for every expert; "
                          f"experts {missing} have none")
    return recipe


def _model_path(path: str, where: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise RecipeError(f"{path}: {key} must be the path of a local model directory")
    model = Path(value)
    return model if model.is_absolute() else where / model


def _prompts(path: str, entry: dict, key: str, i: int) -> list[str]:
    value = entry.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise RecipeError(f"{path}: experts[{i}].{key} must be a list of non-empty strings")
    return value
