"""export_onnx's own guards, raised before any export work: a directory as the file, a dtype the
target cannot run; an export that fails leaves no file; output names are the model's."""

from __future__ import annotations

import pytest
import torch

from upcycle_fx.exporters import export_onnx
from upcycle_fx.exporters.onnx import export as export_module
from upcycle_fx.exporters.onnx.errors import OnnxDestinationError, OnnxDtypeError, OnnxExportError

from onnx_helpers import Block, make_moe, ort_session, tokens


def test_directory_is_refused(tmp_path):
    with pytest.raises(OnnxDestinationError, match="is a directory"):
        export_onnx(Block(make_moe()), tmp_path, args=(tokens(2, 3),))
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_for_cpu_is_refused_before_exporting(tmp_path, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported although the dtype was known to fail")

    monkeypatch.setattr(export_module, "_torch_export", no_export)
    block = Block(make_moe(dtype=torch.bfloat16))
    with pytest.raises(OnnxDtypeError, match="bfloat16.*cpu execution provider cannot run"):
        export_onnx(block, tmp_path / "m.onnx", args=(tokens(2, 3).to(torch.bfloat16),), target="cpu")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def failing_check(path):
        raise OnnxExportError("simulated checker failure")

    monkeypatch.setattr(export_module, "_check_file", failing_check)
    (tmp_path / "m.onnx").write_bytes(b"previous")
    with pytest.raises(OnnxExportError, match="simulated"):
        export_onnx(Block(make_moe()), tmp_path / "m.onnx", args=(tokens(2, 3),))
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"previous"


def test_single_tensor_output_is_named_output(tmp_path):
    path = export_onnx(Block(make_moe()), tmp_path / "m.onnx", args=(tokens(2, 3),))
    assert [o.name for o in ort_session(path).get_outputs()] == ["output"]


@pytest.mark.slow
def test_hf_model_outputs_keep_their_names(tmp_path):
    """A BERT encoder's file has outputs last_hidden_state and pooler_output (not linear_N), and
    they hold what the model returns under those names."""
    import numpy as np
    import transformers

    import upcycle_fx

    config = transformers.BertConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    model = upcycle_fx.rewrite(transformers.BertModel(config).eval(), num_experts=4)
    path = export_onnx(model, tmp_path / "bert.onnx", optimize=False)
    session = ort_session(path)
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    ids = torch.randint(1, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    feeds = {i.name: (ids if i.name == "input_ids" else torch.ones_like(ids)).numpy()
             for i in session.get_inputs()}
    results = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for name in ("last_hidden_state", "pooler_output"):
        assert np.allclose(results[name], expected[name].numpy(), rtol=1e-4, atol=1e-5), name
