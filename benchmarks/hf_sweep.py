"""Which Hugging Face architectures does upcycle_fx convert? A sweep of every model type the
installed transformers registers.

Each architecture is built from its default configuration shrunk to tiny size (2 layers, width 64,
FFN 128, 4 heads, vocabulary 256, small images; nested text / vision / encoder / decoder configs
alike), with random weights (seed 0), float32, eval mode, on CPU, and nothing downloaded. Then
`upcycle_fx.upcycle(model, UpcycleConfig(pattern="every_other_mlp", num_experts=4, top_k=2,
seed=0))` runs on it: the call `upcycle_fx.rewrite` makes, so the upcycled model is checked
against the dense one (1e-5) and anything else is a named `RewriteError`. The outcome of each:

    converted                    MoE layers made; the verified error (or why it was not verified)
    named error                  an upcycle_fx error class and the first line of its message
    raw exception                any other exception: a bug to report
    does not build at tiny size  the configuration or the model could not be made
    already MoE                  the config has experts, or upcycle_fx says AlreadyMoEError
    not a transformer            no attention module in the tiny model, and upcycle_fx refuses it
                                 (one without attention that converts counts as converted)
    no model class               the model type has no class in the auto mappings
    timeout                      the child process took longer than --timeout-per-model

The models run in a child process (spawned, so a hang or a crash ends only that model; a killed
child is replaced). The table is rewritten after every model, marked partial until the end.

    python benchmarks/hf_sweep.py                         # all architectures -> docs/coverage.md
    python benchmarks/hf_sweep.py --only llama,gpt2,bert --out /tmp/c.md --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import re
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

NUM_EXPERTS, TOP_K, PATTERN, SEED = 4, 2, "every_other_mlp", 0

# Tiny sizes, set on every attribute of these names that a (sub-)config has as an integer.
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
          "num_encoder_layers", "num_decoder_layers", "n_layers")
WIDTH = ("hidden_size", "d_model", "n_embd", "dim", "embedding_size",
         # the width of another (shrunk) tower that this one reads: cross-attention keys, pooled features
         "encoder_hidden_size", "cross_attention_hidden_size", "pooler_output_size")
FFN = ("intermediate_size", "ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim")
HEADS = ("num_attention_heads", "encoder_attention_heads", "decoder_attention_heads", "n_head",
         "num_heads", "n_heads")
TINY = {**dict.fromkeys(LAYERS, 2), **dict.fromkeys(WIDTH, 64), **dict.fromkeys(FFN, 128),
        **dict.fromkeys(HEADS, 4), "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256}
MAX_POSITIONS = 128
POSITION_NAMES = ("max_position_embeddings", "n_positions", "n_ctx", "max_source_positions",
                  "max_target_positions")
IMAGE_SIZE, PATCH_SIZE, WINDOW = 32, 8, 2
UNSET_IS_DEFAULT = ("head_dim", "num_key_value_heads", "vocab_size")  # None: derived or required
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

# Where a task head is looked for, in order; the base model class is the fallback.
TASK_MAPPINGS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                 "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                 "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "MODEL_MAPPING_NAMES")

RESULTS = ("converted", "named error", "raw exception", "does not build at tiny size", "already MoE",
           "not a transformer", "no model class", "timeout")

READY, STARTUP_TIMEOUT = "ready", 600.0  # the child's message once imported; seconds to wait for it
ATTENTION = re.compile(r"attention|attn", re.IGNORECASE)


# --------------------------------------------------------------------------- what to sweep


def model_types() -> list[str]:
    """Every model type the installed transformers registers, sorted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def model_class_name(model_type: str) -> str | None:
    """The class with a task head for `model_type` (seq2seq LM, masked LM, causal LM, sequence or
    image classification), else its base model class, else the model class named after its config
    class (sub-models such as `blip_2_vision_model`); None when there is none."""
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    for mapping in TASK_MAPPINGS:
        name = getattr(modeling_auto, mapping).get(model_type)
        if isinstance(name, (tuple, list)):
            name = name[0] if name else None
        if name:
            return name
    named_after_config = re.sub(r"Config$", "Model", CONFIG_MAPPING_NAMES.get(model_type, ""))
    return named_after_config if named_after_config and hasattr(transformers, named_after_config) else None


# --------------------------------------------------------------------------- tiny configs


def _sub_configs(config) -> list:
    """Every nested configuration (text_config, vision_config, encoder, decoder, ...)."""
    from transformers import PretrainedConfig

    return [value for value in vars(config).values() if isinstance(value, PretrainedConfig)]


def expert_count(config) -> int:
    """The largest expert count the config or one of its sub-configs declares (0 when none)."""
    counts = [_read(config, name) for name in EXPERT_COUNTS]
    counts = [c for c in counts if _is_int(c)]
    return max(counts + [expert_count(sub) for sub in _sub_configs(config)] + [0])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _read(config, name: str):
    """`config.name`, or, for a per-layer attribute that refuses a global read, its largest
    per-layer value; None when absent."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - e.g. transformers' AmbiguousGlobalPerLayerAttributeError
        values = [_read(layer, name) for layer in getattr(config, "per_layer_config", None) or []]
        return max((v for v in values if _is_int(v)), default=None)


def _small_token_ids(config, vocab: int) -> None:
    """Special token ids (pad, bos, eos, image token...) inside a shrunk vocabulary."""
    spare = vocab - 1
    for name in list(vars(config)):
        if not (name.endswith("_token_id") or name.endswith("_token_index") or name.endswith("_token_ids")):
            continue
        value = getattr(config, name)
        if _is_int(value) and value >= vocab:
            setattr(config, name, spare)
            spare -= 1
        elif isinstance(value, list) and any(_is_int(v) and v >= vocab for v in value):
            fixed = []
            for v in value:
                if _is_int(v) and v >= vocab:
                    v, spare = spare, spare - 1
                fixed.append(v)
            setattr(config, name, fixed)


def _set(config, name: str, value) -> None:
    """`config.name = value`, unless the config refuses it (a derived property, a per-layer
    attribute, a count set through other fields): then its own value stays."""
    try:
        setattr(config, name, value)
    except Exception:  # noqa: BLE001 - AttributeError, NotImplementedError, transformers' own errors
        pass


def _reads_mrope_sections(config) -> bool:
    """Whether the model code of `config` splits its rotary frequencies into multimodal sections
    (`rope_parameters["mrope_section"]`, with a default sized for the full head)."""
    import importlib
    import inspect

    module = type(config).__module__.replace(".configuration_", ".modeling_")
    try:
        return "mrope_section" in inspect.getsource(importlib.import_module(module))
    except Exception:  # noqa: BLE001 - no modeling module, no sections
        return False


def _shrink_mrope_sections(config) -> None:
    """Multimodal rotary sections that fit the tiny head: (t, h, w) summing to head_dim / 2."""
    rope = getattr(config, "rope_parameters", None)
    head_dim = _read(config, "head_dim")
    if not _is_int(head_dim) and _is_int(_read(config, "hidden_size")) and _is_int(_read(config, "num_attention_heads")):
        head_dim = config.hidden_size // config.num_attention_heads
    if isinstance(rope, dict) and _is_int(head_dim) and _reads_mrope_sections(config):
        half = head_dim // 2
        rope["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]


def _fold_layer_indices(config, layers: int) -> None:
    """Lists of layer indices (`intermediate_layers_indices`, `fullatt_block_indexes`...) folded
    into the tiny depth, their length kept: the widths that depend on their count stay valid.
    A backbone's `out_indices` count stages, not layers, and must stay distinct."""
    for name, value in list(vars(config).items()):
        if name.endswith(("_indices", "_indexes")) and not name.endswith("out_indices") and isinstance(value, list) and value \
                and all(_is_int(v) and v >= 0 for v in value) and max(value) >= layers:
            _set(config, name, [v % layers for v in value])


def _fit_head_parts(config) -> None:
    """Sizes that must fit inside the tiny head or width: a partial rotary dimension (GPT-J) at
    half the head, the rotary head of multi-head latent attention as the head_dim its rotary
    embedding reads (and as many key/value heads as heads), and LayoutLMv3's 2-D position parts (4 coordinates + 2 shapes = width)."""
    heads, width = _read(config, "num_attention_heads") or _read(config, "n_head"), _read(config, "hidden_size") \
        or _read(config, "n_embd")
    if _is_int(_read(config, "rotary_dim")) and _is_int(heads) and _is_int(width):
        _set(config, "rotary_dim", min(config.rotary_dim, width // heads // 2))
    if _is_int(_read(config, "qk_rope_head_dim")) and _is_int(_read(config, "head_dim")):
        _set(config, "head_dim", config.qk_rope_head_dim)
        if _is_int(_read(config, "num_key_value_heads")) and _is_int(heads):
            _set(config, "num_key_value_heads", heads)  # latent keys and values: one per head
    if _is_int(_read(config, "coordinate_size")) and _is_int(_read(config, "shape_size")) and _is_int(width):
        _set(config, "coordinate_size", width // 6)
        _set(config, "shape_size", (width - 4 * (width // 6)) // 2)


def _tiny_image_size(config) -> int:
    """IMAGE_SIZE, or for a windowed hierarchical model (Swin: `window_size`, `depths`) windows of
    2 x 2 patches and the smallest size whose last stage still holds one whole window."""
    window, depths, patch = (getattr(config, n, None) for n in ("window_size", "depths", "patch_size"))
    if _is_int(window) and isinstance(depths, (list, tuple)) and depths and _is_int(patch):
        config.window_size = min(window, WINDOW)
        return max(IMAGE_SIZE, patch * config.window_size * 2 ** (len(depths) - 1))
    return IMAGE_SIZE


def shrink(config) -> None:
    """Set the tiny sizes on `config` and its nested sub-configs, in place."""
    for name, value in TINY.items():
        current = _read(config, name)
        if _is_int(current) or (current is None and name in UNSET_IS_DEFAULT and name in vars(config)):
            _set(config, name, value)
    for name in POSITION_NAMES:
        if _is_int(_read(config, name)) and _read(config, name) > MAX_POSITIONS:
            _set(config, name, MAX_POSITIONS)
    layers = next((getattr(config, n) for n in LAYERS if _is_int(_read(config, n))), None)
    if layers:
        _fold_layer_indices(config, layers)
    for name in ("layer_types", "block_types", "layers_block_type"):
        value = _read(config, name)
        if layers and isinstance(value, list) and len(value) > layers:
            _set(config, name, value[:layers])
    if _is_int(getattr(config, "patch_size", None)) and config.patch_size > PATCH_SIZE:
        config.patch_size = PATCH_SIZE
    if _is_int(getattr(config, "image_size", None)):
        config.image_size = _tiny_image_size(config)
    if _is_int(getattr(config, "vocab_size", None)):
        _small_token_ids(config, config.vocab_size)
    _shrink_mrope_sections(config)
    _fit_head_parts(config)
    for sub in _sub_configs(config):
        shrink(sub)


def tiny_config(model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    shrink(config)
    return config


# --------------------------------------------------------------------------- one architecture


def _config_for(cls, config):
    """The (sub-)config `cls` takes: a text model class mapped to a composite config takes its
    text config, as the Auto classes do."""
    expected = getattr(cls, "config_class", None)
    if not isinstance(expected, type) or isinstance(config, expected):
        return config
    return next((sub for sub in _sub_configs(config) if isinstance(sub, expected)), config)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _has_attention(model) -> bool:
    return any(ATTENTION.search(type(m).__name__) or ATTENTION.search(name.rsplit(".", 1)[-1])
               for name, m in model.named_modules())


def sweep_one(model_type: str) -> dict:
    """Build `model_type` at tiny size and upcycle it; the record of what happened."""
    import warnings

    import torch
    import transformers

    import upcycle_fx

    start = time.perf_counter()
    record = {"architecture": model_type, "class": None, "result": None, "moe_layers": None,
              "ffns_found": None, "verified_error": None, "unverified_reason": None,
              "params_before": None, "params_after": None, "error": None, "seconds": None}

    def done(result: str, error: str | None = None) -> dict:
        record.update(result=result, error=error, seconds=round(time.perf_counter() - start, 2))
        return record

    record["class"] = model_class_name(model_type)
    if record["class"] is None:
        return done("no model class", "no auto mapping names a model class for this type")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = tiny_config(model_type)
        except Exception as e:  # noqa: BLE001 - any failure to configure is the finding
            return done("does not build at tiny size", f"config: {type(e).__name__}: {_first_line(e)}")
        experts = expert_count(config)
        if experts > 1:
            return done("already MoE", f"config declares {experts} experts")
        try:
            cls = getattr(transformers, record["class"])
            torch.manual_seed(SEED)
            model = cls(_config_for(cls, config)).float().eval()
        except Exception as e:  # noqa: BLE001
            return done("does not build at tiny size", f"model: {type(e).__name__}: {_first_line(e)}")
        attention = _has_attention(model)
        config_ = upcycle_fx.UpcycleConfig(pattern=PATTERN, num_experts=NUM_EXPERTS, top_k=TOP_K, seed=SEED)
        try:
            result = upcycle_fx.upcycle(model, config_)
        except upcycle_fx.AlreadyMoEError as e:
            return done("already MoE", f"AlreadyMoEError: {_first_line(e)}")
        except upcycle_fx.UpcycleError as e:
            if not attention:  # e.g. a state-space or convolutional model: not a failure of ours
                return done("not a transformer", f"no attention module (no module or class named "
                                                 f"*attn*/*attention*); {type(e).__name__}: {_first_line(e)}")
            return done("named error", f"{type(e).__name__}: {_first_line(e)}")
        except Exception as e:  # noqa: BLE001
            where = traceback.extract_tb(e.__traceback__)[-1]
            return done("raw exception", f"{type(e).__name__}: {_first_line(e)} "
                                         f"({Path(where.filename).name}:{where.lineno})")
    record.update(moe_layers=len(upcycle_fx.moe_layers(result.model)), ffns_found=len(result.mlps),
                  verified_error=result.verified_error, unverified_reason=result.unverified_reason,
                  params_before=result.params_before,
                  params_after=sum(p.numel() for p in result.model.parameters()))
    return done("converted")


# --------------------------------------------------------------------------- child processes


def _worker(connection) -> None:
    """Child process: sweep each model type received, send back its record."""
    import logging

    logging.disable(logging.WARNING)
    try:
        import transformers
        from transformers.models.auto import configuration_auto, modeling_auto  # noqa: F401

        import upcycle_fx  # noqa: F401  (all imported before the first model's clock starts)

        transformers.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - the records say what fails
        pass
    connection.send(READY)
    while True:
        model_type = connection.recv()
        if model_type is None:
            return
        try:
            record = sweep_one(model_type)
        except BaseException as e:  # noqa: BLE001 - reported, never fatal to the sweep
            record = {"architecture": model_type, "result": "raw exception",
                      "error": f"{type(e).__name__}: {_first_line(e)} (outside the upcycle call)"}
        connection.send(record)


class Worker:
    """A spawned child process that sweeps one model type at a time, with a timeout."""

    def __init__(self):
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child,), daemon=True)
        self.process.start()
        child.close()
        # The imports (torch, transformers) are not the first model's time: wait for them here.
        try:
            if self.connection.poll(STARTUP_TIMEOUT):
                self.connection.recv()
        except (EOFError, OSError):  # died while importing: its first model reports it
            pass

    def run(self, model_type: str, timeout: float) -> dict | None:
        """The record, or None when the child did not answer in time or died."""
        self.connection.send(model_type)
        try:
            if self.connection.poll(timeout):
                return self.connection.recv()
        except (EOFError, OSError):
            pass
        return None

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def run_sweep(types: list[str], timeout: float, on_record=None) -> list[dict]:
    """Sweep `types` in a child process; a timeout or a crash replaces the child."""
    records, worker = [], None
    try:
        for model_type in types:
            worker = worker or Worker()
            start = time.perf_counter()
            record = worker.run(model_type, timeout)
            seconds = round(time.perf_counter() - start, 2)
            if record is None:
                alive = worker.process.is_alive()
                worker.stop()
                code = worker.process.exitcode
                worker = None
                record = {"architecture": model_type, "class": model_class_name(model_type),
                          "result": "timeout" if alive else "raw exception",
                          "error": (f"no answer within {timeout:g} s" if alive
                                    else f"child process died (exit code {code})")}
            record["seconds"] = seconds
            records.append(record)
            if on_record:
                on_record(records)
    finally:
        if worker:
            worker.connection.send(None)
            worker.process.join(10)
            worker.stop()
    return records


# --------------------------------------------------------------------------- the table


def totals(records: list[dict]) -> dict[str, int]:
    counts = {result: sum(r["result"] == result for r in records) for result in RESULTS}
    counts["converted, verified at 1e-5"] = sum(r["result"] == "converted" and r.get("verified_error") is not None
                                                for r in records)
    counts["buildable non-MoE transformers"] = sum(counts[k] for k in ("converted", "named error", "raw exception",
                                                                       "timeout"))
    return counts


def _cell(text) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def _detail(record: dict) -> str:
    if record["result"] != "converted":
        return _cell(record.get("error"))
    if record.get("verified_error") is not None:
        return f"verified error {record['verified_error']:.1e}; params {record['params_before']:,} -> " \
               f"{record['params_after']:,}"
    return _cell(f"unverified: {record.get('unverified_reason')}")


def markdown(records: list[dict], command: str, missing: list[str]) -> str:
    import torch
    import transformers

    lines = ["# Hugging Face architecture coverage", ""]
    if missing:
        lines += [f"**PARTIAL**: {len(missing)} architectures not swept yet: {', '.join(missing)}", ""]
    lines += [
        "Every model type the installed transformers registers, built from its default configuration "
        "shrunk to tiny size (random weights, float32, CPU) and upcycled with "
        f"`pattern=\"{PATTERN}\", num_experts={NUM_EXPERTS}, top_k={TOP_K}, seed={SEED}` "
        "(the upcycled model is checked against the dense one at 1e-5). "
        "Written by `benchmarks/hf_sweep.py`; see its docstring for what each result means.",
        "",
        f"- transformers {transformers.__version__}, torch {torch.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- command: `{command}`",
        "",
        "| total | count |",
        "|---|---|",
        f"| architectures swept | {len(records)} |",
    ]
    lines += [f"| {name} | {count} |" for name, count in totals(records).items()]
    lines += ["", "| architecture | class | result | MoE layers / FFNs found | error or reason | seconds |",
              "|---|---|---|---|---|---|"]
    for r in records:
        layers = f"{r['moe_layers']} / {r['ffns_found']}" if r.get("moe_layers") is not None else ""
        lines.append(f"| {r['architecture']} | {_cell(r.get('class'))} | {r['result']} | {layers} | "
                     f"{_detail(r)} | {_cell(r.get('seconds'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model types (default: all registered)")
    parser.add_argument("--out", default="docs/coverage.md", help="markdown table to write")
    parser.add_argument("--json", help="also write the records as JSON here")
    parser.add_argument("--timeout-per-model", type=float, default=60.0, help="seconds (default 60)")
    args = parser.parse_args(argv)
    types = [t.strip() for t in args.only.split(",") if t.strip()] if args.only else model_types()
    command = "python benchmarks/hf_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(records: list[dict]) -> None:
        swept = {r["architecture"] for r in records}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(records, command.strip(), [t for t in types if t not in swept]))
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1))

    records = run_sweep(types, args.timeout_per_model, on_record=write)
    for name, count in totals(records).items():
        print(f"{name}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
