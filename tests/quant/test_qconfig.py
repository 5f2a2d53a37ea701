"""qat_lightning.quant.qconfig.qconfig: QConfig validation and the quant nodes it builds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import qat_lightning as ql
from qat_lightning.quant.dtypes import float16, qint8, qint16
from qat_lightning.quant.nodes.fake_quantize import FakeQuantize, set_fake_quantize
from qat_lightning.quant.nodes.functional import fake_quantize
from qat_lightning.quant.observers import OBSERVER_NAMES
from qat_lightning.quant.qconfig.qconfig import QConfig, get_qconfig


def test_defaults() -> None:
    q = QConfig()
    assert q.input_dtype is None
    assert q.weight_dtype is qint8 and q.output_dtype is qint8
    assert q.observer == "mse" and q.weight_observer == "minmax"
    assert q.fixed_threshold is None and q.ch_axis is None  # None: the op's own weight axis


def test_is_frozen() -> None:
    q = QConfig()
    assert dataclasses.is_dataclass(q)
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.output_dtype = qint16  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        q.observer = "kl"  # type: ignore[misc]


def test_is_hashable_and_hash_agrees_with_equality() -> None:
    a = get_qconfig(observer="percentile", percentile=99)
    b = get_qconfig(observer="percentile", percentile=99.0)
    c = get_qconfig(observer="percentile", percentile=99.9)
    assert a == b and hash(a) == hash(b)
    assert a != c
    assert len({a, b, c, QConfig(), QConfig()}) == 3
    assert {QConfig(input_dtype=("qint16", None)): 1}[QConfig(input_dtype=(qint16, None))] == 1
    fixed = QConfig(observer_kwargs={"bins": 512, "max_samples": 8192})  # unknown options are refused now
    assert hash(fixed) == hash(QConfig(observer_kwargs={"max_samples": 8192, "bins": 512}))


def test_dtypes_parsed_from_strings() -> None:
    q = QConfig(input_dtype="int16", weight_dtype="qint8", output_dtype="fp16")
    assert q.input_dtype is qint16 and q.weight_dtype is qint8 and q.output_dtype is float16
    q2 = QConfig(input_dtype=("qint16", None, torch.float16), weight_dtype=None, output_dtype=None)
    assert q2.input_dtype == (qint16, None, float16)
    assert q2.weight_dtype is None and q2.output_dtype is None


def test_input_dtype_at() -> None:
    q = QConfig(input_dtype=("qint16", "qint8"))
    assert [q.input_dtype_at(i) for i in range(3)] == [qint16, qint8, qint8]
    assert QConfig(input_dtype="qint16").input_dtype_at(5) is qint16
    assert QConfig(input_dtype=()).input_dtype_at(0) is None


def test_unknown_dtype_raises() -> None:
    with pytest.raises(ValueError, match="allowed"):
        QConfig(output_dtype="int4")


@pytest.mark.parametrize("field", ["observer", "weight_observer"])
def test_unknown_observer_lists_allowed(field) -> None:
    with pytest.raises(ValueError) as info:
        QConfig(**{field: "entropy"})
    message = str(info.value)
    assert "entropy" in message
    for name in OBSERVER_NAMES:
        if name != "fixed":
            assert name in message


def test_fixed_is_not_an_observer_name_in_a_qconfig() -> None:
    with pytest.raises(ValueError, match="allowed"):
        QConfig(observer="fixed")


@pytest.mark.parametrize("bad", [-1.0, -1e-9, float("nan")])
def test_negative_threshold_raises(bad) -> None:
    with pytest.raises(ValueError, match="fixed_threshold"):
        QConfig(fixed_threshold=bad)


def test_replace_validates_again() -> None:
    q = QConfig()
    assert q.replace(output_dtype="qint16").output_dtype is qint16
    assert q.output_dtype is qint8
    with pytest.raises(ValueError):
        q.replace(observer="bogus")


def test_observer_kwargs_are_copied() -> None:
    kwargs = {"percentile": 99.9}
    q = QConfig(observer="percentile", observer_kwargs=kwargs)
    kwargs["percentile"] = 50.0
    assert q.observer_kwargs == {"percentile": 99.9}


# ------------------------------------------------------------------------------------------- get_qconfig
def test_get_qconfig_defaults_match_the_design() -> None:
    q = get_qconfig()
    assert (q.input_dtype, q.weight_dtype, q.output_dtype) == (None, qint8, qint8)
    assert q.observer == "mse" and q.fixed_threshold is None
    assert ql.get_qconfig is get_qconfig


def test_get_qconfig_passes_observer_kwargs() -> None:
    q = get_qconfig(observer="percentile", percentile=99.5)
    assert q.observer_kwargs == {"percentile": 99.5}
    fq = q.activation_fake_quant(qint8)
    assert fq.observer.percentile == 99.5


@pytest.mark.parametrize("scale", [0.05, 1.0 / 127, 3.0])
def test_fixed_scale_is_stored_as_threshold_and_builds_a_fixed_node(scale) -> None:
    q = get_qconfig(fixed_scale=scale, out_dtype=qint8)
    assert q.fixed_threshold == pytest.approx(scale * 127, rel=1e-12)
    node = q.activation_fake_quant(q.output_dtype, name="speed")
    assert isinstance(node, FakeQuantize)
    assert node.is_fixed and node.observer_name == "fixed"
    assert float(node.scale) == pytest.approx(scale, rel=1e-6)
    set_fake_quantize(node, "calibration")
    node(torch.randn(100) * 1000)
    set_fake_quantize(node, "qat")
    x = torch.linspace(-1000, 1000, 101)
    out = node(x)
    assert float(node.scale) == pytest.approx(scale, rel=1e-6)
    assert torch.equal(out, fake_quantize(x, node.scale, qint8))
    # the range is kept when the node moves to int16: scale = threshold / 32767
    node.dtype = qint16
    assert float(node.scale) == pytest.approx(scale * 127 / 32767, rel=1e-6)


def test_fixed_scale_for_int16_output() -> None:
    q = get_qconfig(fixed_scale=0.01, out_dtype="qint16")
    assert q.fixed_threshold == pytest.approx(0.01 * 32767)
    assert float(q.activation_fake_quant(qint16).scale) == pytest.approx(0.01, rel=1e-6)


def test_threshold_directly() -> None:
    q = get_qconfig(threshold=200.0)
    assert q.fixed_threshold == 200.0
    node = q.activation_fake_quant(qint8)
    assert torch.equal(node.scale, torch.tensor(200.0 / 127, dtype=torch.float32))


def test_get_qconfig_errors() -> None:
    with pytest.raises(ValueError, match="either"):
        get_qconfig(fixed_scale=0.1, threshold=10.0)
    with pytest.raises(ValueError, match="fixed_scale"):
        get_qconfig(fixed_scale=-0.1)
    with pytest.raises(ValueError, match="integer"):
        get_qconfig(fixed_scale=0.1, out_dtype=float16)
    with pytest.raises(ValueError, match="integer"):
        get_qconfig(fixed_scale=0.1, out_dtype=None)
    with pytest.raises(ValueError, match="fixed_threshold"):
        get_qconfig(threshold=-5.0)
    with pytest.raises(ValueError, match="allowed"):
        get_qconfig(observer="nope")


# ---------------------------------------------------------------------------------- nodes it builds
def test_activation_fake_quant_uses_the_observer_and_dtype() -> None:
    q = get_qconfig(observer="kl")
    node = q.activation_fake_quant(qint16, name="layer1.add")
    assert node.dtype is qint16 and node.observer_name == "kl"
    assert node.ch_axis is None and node.scale.shape == ()
    assert node.name == "layer1.add" and not node.is_fixed


def test_weight_fake_quant_is_per_channel() -> None:
    q = get_qconfig(weight_dtype="qint16")
    node = q.weight_fake_quant(8, name="conv1")
    assert node.dtype is qint16
    assert node.ch_axis == 0 and node.scale.shape == (8,)
    assert node.observer_name == "minmax"
    w = torch.randn(8, 3, 3, 3) * torch.arange(1, 9).view(-1, 1, 1, 1)
    node(w)  # QAT: per-channel |w| max
    torch.testing.assert_close(node.scale, w.abs().amax(dim=(1, 2, 3)) / 32767, rtol=1e-6, atol=0)


def test_weight_fake_quant_without_weight_dtype_raises() -> None:
    with pytest.raises(ValueError, match="conv9"):
        get_qconfig(weight_dtype=None).weight_fake_quant(4, name="conv9")


def test_ignore_nonfinite_reaches_the_observer_through_get_qconfig() -> None:
    qconfig = get_qconfig(observer="minmax", ignore_nonfinite=True)
    node = qconfig.activation_fake_quant(qint8, name="x")
    assert node.observer.ignore_nonfinite
    node.observer(torch.tensor([1.0, float("nan"), -2.0, float("inf")]))  # dropped, not raised
    node.observer.check_finite()
    plain = get_qconfig(observer="minmax").activation_fake_quant(qint8, name="x")
    plain.observer(torch.tensor([1.0, float("nan")]))  # counted on the device, no host sync in the forward
    with pytest.raises(ValueError, match="ignore_nonfinite"):
        plain.observer.check_finite()


# ---------------------------------------------------------------------------------- checked on arrival
@pytest.mark.parametrize("scale", [0.0, -0.0, float("inf"), float("nan")])
def test_fixed_scale_must_be_positive_and_finite(scale: float) -> None:
    with pytest.raises(ValueError, match="fixed_scale must be a finite number > 0"):
        get_qconfig(fixed_scale=scale)


@pytest.mark.parametrize("threshold", [0.0, float("inf"), float("nan")])
def test_threshold_must_be_positive_and_finite(threshold: float) -> None:
    with pytest.raises(ValueError, match="fixed_threshold must be a finite number > 0"):
        get_qconfig(threshold=threshold)
    with pytest.raises(ValueError, match="'fc': threshold must be a finite number > 0"):
        ql.ModuleNameTemplate({"fc": {"threshold": threshold}})
    with pytest.raises(TypeError, match="fixed_threshold must be a finite number > 0"):
        QConfig(fixed_threshold="10")  # type: ignore[arg-type]


def test_zero_fixed_scale_in_a_template_is_refused() -> None:
    with pytest.raises(ValueError, match="'fc': fixed_scale must be a finite number > 0"):
        ql.ModuleNameTemplate({"fc": {"dtype": "qint8", "fixed_scale": 0.0}})


def test_unknown_observer_kwargs_are_refused_where_they_arrive() -> None:
    with pytest.raises(
        ValueError, match=r"percentil.*observer 'mse'.*allowed: bins, max_samples.*ignore_nonfinite"
    ):
        get_qconfig(percentil=99.9)
    with pytest.raises(ValueError, match=r"foo.*allowed"):
        QConfig(observer_kwargs={"foo": 1})
    with pytest.raises(ValueError, match="percentile must be a number in"):
        get_qconfig(observer="percentile", percentile=200)
    with pytest.raises(ValueError, match="averaging_constant"):
        QConfig().replace(observer_kwargs={"averaging_constant": 0.5})  # a moving_minmax option
    with pytest.raises(TypeError, match="observer_kwargs must be a mapping"):
        QConfig(observer_kwargs=[("bins", 512)])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"observer_kwargs\['ignore_nonfinite'\] must be True or False"):
        get_qconfig(ignore_nonfinite="no")
    assert get_qconfig(observer="percentile", percentile=99.9, bins=512).observer_kwargs["bins"] == 512
    assert get_qconfig(observer="moving_minmax", averaging_constant=0.5, ignore_nonfinite=True)
