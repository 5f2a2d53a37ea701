"""auto_find_bad_case: the right sample, the seed's tables, multi/dict outputs, saved inputs, index ops."""

from __future__ import annotations

import pytest
import torch
from analysis_toys import BAD_INDEX, IndexNet, bad_batch, calibrate, calibrated, data
from qat_lightning.analysis.compare.metrics import Metric

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis


def test_bad_case_is_the_clipped_sample_and_files_are_written(tmp_path) -> None:
    model = calibrated()
    states = [n.state for _, n in ql.iter_fake_quantize(model)]
    model.train()
    qa = QuantAnalysis(model, out_dir=tmp_path)
    # the bad sample sits in the second batch: its index counts samples over the traversal
    result = qa.auto_find_bad_case([data(8, 7), bad_batch(), data(8, 9)])
    assert result.num_samples == 24
    assert result.index("0", "L1") == 8 + BAD_INDEX
    assert result.index("0", "ATOL") == 8 + BAD_INDEX
    assert {w.metric: w.index for w in result.worst}["L1"] == 8 + BAD_INDEX
    text = (tmp_path / "badcase.txt").read_text()
    for header in (
        "The bad case input index of each output:",
        "The metric results of each badcase:",
        "The bad case input index of the worst output:",
        "Name/Index",
        "dataloader index",
    ):
        assert header in text
    # nothing changed on the model: training flag and node states restored
    assert model.training and [n.state for _, n in ql.iter_fake_quantize(model)] == states
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporary files


def test_saved_bad_case_inputs_rerun_to_the_same_metric(tmp_path) -> None:
    model = calibrated()
    qa = QuantAnalysis(model, out_dir=tmp_path)
    result = qa.auto_find_bad_case([bad_batch()], metrics=("L1",))
    saved = torch.load(tmp_path / "badcase.pt", weights_only=False)
    (x,) = saved["samples"][BAD_INDEX]
    assert torch.equal(x, bad_batch()[BAD_INDEX : BAD_INDEX + 1])
    model.eval()
    with torch.no_grad():
        with ql.fake_quant_disabled(model):
            ref = model(x)
        with ql.fake_quant_state(model, ql.FakeQuantState.VALIDATION):
            out = model(x)
    assert (ref.double() - out.double()).abs().mean().item() == pytest.approx(result.rows[0].value, rel=1e-6)
    again = QuantAnalysis(model, out_dir=tmp_path).load_bad_cases()
    assert again.rows == result.rows and sorted(again.samples) == sorted(result.samples)


@pytest.mark.parametrize("outputs", ["multi", "dict"])
def test_multi_and_dict_outputs_are_named_like_the_seed(tmp_path, outputs: str) -> None:
    model = calibrated(outputs=outputs)
    qa = QuantAnalysis(model, out_dir=tmp_path)
    result = qa.auto_find_bad_case(
        [bad_batch(), data(8, 2)], metrics=("COSINE", "L1", "ATOL", "MSE", "SQNR", "KL")
    )
    expected = ("0-0", "0-1-0", "0-1-1") if outputs == "multi" else ("cls", "box")
    assert result.outputs == expected
    assert len(result.rows) == len(expected) * 6
    first = "0-0" if outputs == "multi" else "cls"
    assert result.index(first, "L1") == BAD_INDEX
    tables = qa.sensitivity(metric="COSINE", types=("activation",), plot=False)
    assert [t.output_name for t in tables] == list(expected)
    assert all(t.metric_name == "1-COSINE" for t in tables)


def test_custom_metric_callable(tmp_path) -> None:
    def max_rel(base: torch.Tensor, analy: torch.Tensor) -> float:
        return float(((base - analy).abs() / (base.abs() + 1.0)).max())

    qa = QuantAnalysis(calibrated(), out_dir=tmp_path)
    result = qa.auto_find_bad_case([bad_batch()], metrics=(max_rel, Metric("neg", lambda a, b: 0.0, True)))
    assert result.metrics == ("max_rel", "neg")
    assert result.index("0", "max_rel") == BAD_INDEX


def test_dict_batches_with_input_fn_and_num_steps(tmp_path) -> None:
    qa = QuantAnalysis(calibrated(), out_dir=tmp_path)
    loader = [{"image": bad_batch(), "label": 0}, {"image": data(8, 3), "label": 1}]
    result = qa.auto_find_bad_case(loader, num_steps=1, input_fn=lambda b: (b["image"],))
    assert result.num_samples == 8 and result.index("0", "L1") == BAD_INDEX
    with pytest.raises(ValueError, match="no batches"):
        qa.auto_find_bad_case([])


def test_index_ops_reuse_float_indices(tmp_path) -> None:
    model = calibrate(IndexNet(), [data(64)])
    x = data(32, 5)
    model.eval()
    with torch.no_grad():
        with ql.fake_quant_disabled(model):
            ref = model(x)
        out = model(x)
    assert not torch.equal(ref[1], out[1])  # without replacement quantization flips some selections
    qa = QuantAnalysis(model, out_dir=tmp_path)
    result = qa.auto_find_bad_case([x], metrics=("L1", "ATOL"))
    assert result.replayed_index_ops == 4
    for name in ("0-1", "0-2", "0-3"):  # topk indices, argsort, argmax: identical to the float run
        assert result.rows[result.outputs.index(name) * 2].value == 0.0
    # the per-layer comparison replays them too: fc2 reads a gather at the float indices
    qa.run([x])
    comparison = qa.compare_per_layer(plot=False)
    assert comparison.row("fc2").cosine > 0.9
