"""Recipe files: a conversion's options in one reviewed YAML file (`--recipe recipe.yaml`).

The keys are the options' names (`num_experts` or `experts`, `top_k`, `expert_noise_std`,
`format`, ... ; `-` and `_` alike), i.e. the `UpcycleConfig` fields plus the output options.
Flags given on the command line override the file. An unknown key or a value of the wrong type
is a RecipeError that lists the valid keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import RecipeError

# Options that name files or say what to do with them: given on the command line, never in a recipe.
NOT_IN_RECIPES = {"help", "recipe", "out", "overwrite", "version", "traceback", "model", "out_onnx",
                  "native"}


def read_recipe(path: str) -> dict[str, Any]:
    """The mapping in the YAML file `path`."""
    try:
        import yaml
    except ImportError:
        raise RecipeError("--recipe needs PyYAML: pip install pyyaml") from None
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise RecipeError(f"--recipe {path}: cannot read it ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"--recipe {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"--recipe {path} must be a mapping of option names to values "
                          f"(e.g. num_experts: 8), not a {type(data).__name__}")
    return data


def recipe_actions(commands: dict[str, argparse.ArgumentParser]) -> dict[str, dict[str, argparse.Action]]:
    """Per command, its options a recipe may set, by every accepted key."""
    table = {}
    for name, parser in commands.items():
        keys = {}
        for action in parser._actions:   # argparse has no public list of a parser's actions
            if not action.option_strings or action.dest in NOT_IN_RECIPES:
                continue
            keys[action.dest] = action
            for option in action.option_strings:
                if option.startswith("--") and not option.startswith("--no-"):
                    keys[option[2:].replace("-", "_")] = action
        table[name] = keys
    return table


def recipe_defaults(path: str, command: str, commands: dict[str, argparse.ArgumentParser]) -> tuple[dict, list]:
    """(defaults for `command`'s parser from the recipe, keys the recipe sets for other commands)."""
    recipe = read_recipe(path)
    table = recipe_actions(commands)
    known = {key for keys in table.values() for key in keys}
    defaults, unused = {}, []
    for raw_key, value in recipe.items():
        key = str(raw_key).replace("-", "_")
        if key not in known:
            raise RecipeError(f"--recipe {path}: unknown key {raw_key!r}; the valid keys are "
                              f"{', '.join(sorted(known))}")
        action = table[command].get(key)
        if action is None:
            unused.append(str(raw_key))
            continue
        if action.dest in defaults:
            raise RecipeError(f"--recipe {path}: {raw_key!r} sets {action.dest} a second time")
        defaults[action.dest] = _value(path, raw_key, value, action)
    return defaults, unused


def _value(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    """`value` as the option would have parsed it, or RecipeError."""
    where = f"--recipe {path}: {key}: {value!r}"
    if action.nargs == 0:   # flags: store_true, --x/--no-x
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false")
        return value if not isinstance(action, argparse._StoreFalseAction) else not value
    if isinstance(value, bool) or value is None and action.default is not None:
        raise RecipeError(f"{where} is not a valid value for {action.dest}")
    if value is not None and action.type is not None:
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        try:
            value = action.type(value if isinstance(value, (str, dict)) else str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise RecipeError(f"{where} is not a valid value for {action.dest} ({error})") from None
    elif isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if action.choices is not None and value not in action.choices:
        raise RecipeError(f"{where} is not one of {', '.join(map(str, action.choices))}")
    return value
