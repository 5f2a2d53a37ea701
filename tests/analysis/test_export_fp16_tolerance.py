"""The deployed per-layer comparison on the j6p recipe (gemms int16, other ops float16).

An int16 point fed by a float16 cast may differ by one float16 ulp of the upstream value (many int16 steps)
without anything being wrong; a wrong scale or dtype in the graph is still named.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qat_lightning as ql
from qat_lightning.analysis import QuantAnalysis
from qat_lightning.analysis.export_layers import compare_export_per_layer, first_export_mismatch
from qat_lightning.analysis.ort_sessions import ort_session
from qat_lightning.quant.calibrate import calibrate
from qat_lightning.quant.export import export_onnx
from tests.analysis.test_export_check import _tamper_scale
from tests.models import TinyResNet

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

POINT = "layer1.0.conv1.input_quant.0"  # int16, fed by maxpool's float16 Cast pair


@pytest.fixture
def j6p(tmp_path):
    torch.manual_seed(0)
    xs = [TinyResNet.example_inputs(8)[0] for _ in range(3)]
    setter = ql.QconfigSetter(
        reference_qconfig=ql.get_qconfig(),
        templates=[
            ql.ModuleNameTemplate({"": ql.float16}),
            ql.ConvDtypeTemplate(input_dtype=ql.qint16, weight_dtype=ql.qint16),
            ql.MatmulDtypeTemplate(input_dtypes=ql.qint16),
        ],
    )
    model = ql.prepare(TinyResNet().eval(), example_inputs=(xs[0],), qconfig_setter=setter).eval()
    calibrate(model, xs)
    result = export_onnx(model, (xs[0],), tmp_path / "j6p.onnx")
    return model, result, xs


def test_fp16_ulp():
    from qat_lightning.analysis.export_noise import fp16_ulp

    assert fp16_ulp(1.0) == 2.0**-10 and fp16_ulp(1.5) == 2.0**-10 and fp16_ulp(0.9) == 2.0**-11
    assert fp16_ulp(-300.0) == 0.25 and fp16_ulp(0.0) == 0.0 and fp16_ulp(1e-9) == 2.0**-24
    assert fp16_ulp(1e6) == 32.0  # saturated at 65504


def test_faithful_j6p_export_names_no_mismatch(j6p, tmp_path):
    model, result, xs = j6p
    session = ort_session(result.path, "disabled")
    with torch.no_grad():
        ref = torch.cat([model(x) for x in xs]).double()
    got = torch.cat([torch.from_numpy(session.run(None, {"x": x.numpy()})[0]) for x in xs]).double()
    sqnr = 10 * torch.log10(ref.square().sum() / (got - ref).square().sum())
    assert sqnr > 60  # the export is faithful

    rows = compare_export_per_layer(model, result.path, xs, num_batches=None, optimization="disabled")
    assert first_export_mismatch(rows) is None
    beyond = [r for r in rows if r.max_steps > 1.5]  # float16 flips upstream: several int16 steps ...
    assert beyond and all(r.fp16_steps >= r.max_steps - 1 for r in beyond)  # ... within one float16 ulp
    assert all(r.fp16_steps == 0 for r in rows if r.role == "weight")

    qa = QuantAnalysis(model, out_dir=tmp_path / "qa", reference="onnxruntime", onnx_path=result.path)
    qa.run(xs[:2])
    assert qa.compare_per_layer(plot=False).first_mismatch is None


def _to_int8(path, tensor):
    """Make the QDQ pair producing ``tensor`` int8 (same scale): the deployed dtype is wrong."""
    proto = onnx.load(str(path))
    dq = next(n for n in proto.graph.node if n.output[0] == tensor)
    q = next(n for n in proto.graph.node if n.output[0] == dq.input[0])
    zp = numpy_helper.from_array(np.zeros((), np.int8), f"{dq.input[2]}/int8")
    proto.graph.initializer.append(zp)
    q.input[2] = dq.input[2] = zp.name
    onnx.save(proto, str(path))


@pytest.mark.parametrize("tamper", ["scale", "dtype"])
def test_wrong_scale_or_dtype_behind_a_float16_cast_is_still_named(j6p, tamper):
    model, result, xs = j6p
    tensor = {e.node: e for e in result.encodings}[POINT].onnx_tensors[0]
    if tamper == "scale":
        _tamper_scale(result.path, tensor, 1.5, False)
    else:
        _to_int8(result.path, tensor)
    rows = compare_export_per_layer(model, result.path, xs, optimization="disabled")
    bad = first_export_mismatch(rows)
    assert bad is not None and bad.node == POINT and bad.fp16_steps > 0
    assert bad.max_steps > 10 * bad.fp16_steps
