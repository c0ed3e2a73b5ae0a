"""`upcycle-fx merge RECIPE.yaml OUT` as a user runs it: real directories, a subprocess."""

from __future__ import annotations

import pytest
import torch
import transformers
import yaml

import upcycle_fx
from upcycle_fx.report import first_tensor, relative_error
from tests.cli_models import add_word_tokenizer, llama_dir, run_cli, snapshot
from tests.helpers import FUNCTION_TOLERANCE

def fine_tune_dir(base_dir, path, seed):
    model = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05 * p.std())
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    base = llama_dir(root / "base", layers=4)
    add_word_tokenizer(base)
    tunes = [fine_tune_dir(base, root / f"tune{i}", seed=i) for i in range(2)]
    return root, base, tunes


def write_recipe(path, **recipe):
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_merge_writes_one_expert_per_fine_tune_and_leaves_the_inputs_alone(directories, tmp_path):
    root, base, tunes = directories
    recipe = write_recipe(tmp_path / "moe.yaml", base_model=str(base), gate_mode="hidden", rest="average",
                          top_k=1, experts=[{"source_model": str(tunes[0]), "positive_prompts": ["def main", "import numpy"]},
                                            {"source_model": "tune1", "positive_prompts": ["solve for x"]}])
    (tmp_path / "tune1").symlink_to(tunes[1])  # relative paths are read from the recipe's directory
    before = {d: snapshot(d) for d in (base, *tunes)}
    done = run_cli("merge", recipe, tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 MoE layers of 2 experts" in done.stdout
    assert {d: snapshot(d) for d in (base, *tunes)} == before
    merged = upcycle_fx.load(tmp_path / "out").eval()
    sources = [transformers.LlamaForCausalLM.from_pretrained(t).eval() for t in tunes]
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    for _, moe in upcycle_fx.moe_layers(merged):
        assert moe.settings.top_k == 1
        for e, source in enumerate(sources):
            with torch.no_grad():
                want = first_tensor(source.get_submodule(moe.source)(x))
                assert relative_error(moe.experts.forward_expert(e, x), want) <= FUNCTION_TOLERANCE
        norms = moe.router.weight.float().norm(dim=-1)  # gate_mode hidden: unit-norm rows
        torch.testing.assert_close(norms, torch.ones_like(norms))


@pytest.mark.parametrize("recipe, message", [
    ({"experts": []}, "base_model must be"),
    ({"base_model": "BASE", "experts": []}, "experts must be a list"),
    ({"base_model": "BASE", "experts": [{"source_model": "TUNE"}], "gate": "x"}, "unknown key"),
    ({"base_model": "BASE", "experts": [{"source_model": "TUNE"}], "gate_mode": "hidden"},
     "needs positive_prompts"),
    ({"base_model": "BASE", "experts": [{"source_model": "TUNE"}], "rest": "median"}, "rest 'median'"),
    ({"base_model": "BASE", "experts": [{"source_model": "TUNE"}, {"source_model": "TUNE"}], "top_k": 3},
     "top_k=3 exceeds"),
    ({"base_model": "BASE", "experts": [{"source_model": "NOPE"}]}, "does not exist"),
])
def test_recipe_mistakes_are_usage_errors_without_output(directories, tmp_path, recipe, message):
    _, base, tunes = directories
    text = yaml.safe_dump(recipe).replace("BASE", str(base)).replace("TUNE", str(tunes[0]))
    (tmp_path / "r.yaml").write_text(text)
    done = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out")
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


def test_a_source_of_another_size_is_refused(directories, tmp_path):
    _, base, _ = directories
    other = llama_dir(tmp_path / "other", hidden=64)
    recipe = write_recipe(tmp_path / "r.yaml", base_model=str(base), experts=[{"source_model": str(other)}])
    done = run_cli("merge", recipe, tmp_path / "out")
    assert done.returncode == 2 and "ExpertSourceError" in done.stdout, done.stdout + done.stderr
    assert not (tmp_path / "out").exists()
