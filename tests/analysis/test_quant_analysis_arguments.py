"""QuantAnalysis refuses bad arguments where they arrive; a refused call keeps earlier results and files."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from analysis_toys import calibrated, data

from qat_lightning.analysis import QuantAnalysis


def _batches(n: int = 3) -> list[torch.Tensor]:
    return [data(8, seed) for seed in range(n)]


@pytest.fixture
def analysed(tmp_path):
    qa = QuantAnalysis(calibrated(), out_dir=tmp_path)
    qa.auto_find_bad_case(_batches())
    qa.run(_batches())
    return qa, qa.compare_per_layer(plot=False)


def _files(out_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def test_run_on_an_empty_dataloader_keeps_the_recorded_layers_and_files(analysed, tmp_path) -> None:
    qa, before = analysed
    files = _files(tmp_path)
    for empty in ([], iter(()), (b for b in [])):
        with pytest.raises(ValueError, match="the dataloader gave no batches"):
            qa.run(empty)
    assert qa.comparison is before
    after = qa.compare_per_layer(plot=False)  # the earlier run's records are still there
    assert after.rows == before.rows and after.not_run == before.not_run and len(after.rows) > 0
    assert _files(tmp_path) == files


def test_run_reads_a_lazy_dataloader_once(analysed) -> None:
    qa, before = analysed
    qa.run(b for b in _batches())  # a generator: the first batch is peeked, not lost
    assert qa.compare_per_layer(plot=False).rows == before.rows


def test_run_with_a_bad_num_steps_keeps_the_records(analysed) -> None:
    qa, before = analysed
    with pytest.raises(ValueError, match="num_steps"):
        qa.run(_batches(), num_steps=0)
    with pytest.raises(TypeError, match="num_steps"):
        qa.run(_batches(), num_steps=1.5)
    assert qa.compare_per_layer(plot=False).rows == before.rows


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"range_factor": -1.0}, ValueError),
        ({"range_factor": 0.0}, ValueError),
        ({"range_factor": math.nan}, ValueError),
        ({"range_factor": math.inf}, ValueError),
        ({"range_factor": "2"}, TypeError),
        ({"int8_limit": -1.0}, ValueError),
        ({"int8_limit": math.nan}, ValueError),
        ({"int8_limit": True}, TypeError),
        ({"plot": "no"}, TypeError),
    ],
)
def test_compare_per_layer_refuses_out_of_range_arguments(analysed, tmp_path, kwargs, error) -> None:
    qa, before = analysed
    files = _files(tmp_path)
    name = next(iter(kwargs))
    with pytest.raises(error, match=rf"{name} must be"):
        qa.compare_per_layer(**kwargs)
    assert qa.comparison is before and _files(tmp_path) == files


def test_compare_per_layer_accepts_positive_limits(analysed) -> None:
    qa, _ = analysed
    assert qa.compare_per_layer(range_factor=2, int8_limit=0.5, plot=False).advice


@pytest.mark.parametrize("probes", [0, 1, 3])
def test_num_probes_with_the_exact_method_is_refused(analysed, probes) -> None:
    qa, _ = analysed
    with pytest.raises(ValueError, match='num_probes applies to method="approximate" only'):
        qa.sensitivity(method="exact", num_probes=probes, plot=False)


@pytest.mark.parametrize(("probes", "error"), [(0, ValueError), (-2, ValueError), (1.5, TypeError)])
def test_num_probes_of_the_approximate_method_is_a_positive_int(analysed, probes, error) -> None:
    qa, _ = analysed
    with pytest.raises(error, match="num_probes must be a positive int"):
        qa.sensitivity(method="approximate", num_probes=probes, plot=False)
    (table,) = qa.sensitivity(method="approximate", num_probes=2, plot=False)
    assert table.rows and table.method == "approximate"


def test_sensitivity_plot_must_be_a_bool(analysed, tmp_path) -> None:
    qa, _ = analysed
    with pytest.raises(TypeError, match="plot must be True or False"):
        qa.sensitivity(plot="no")
    assert not list(tmp_path.glob("sensitivity_*"))


def test_load_bad_cases_refuses_a_file_that_is_not_a_bad_case_file(analysed, tmp_path) -> None:
    qa, _ = analysed
    good = qa.bad_cases
    text = tmp_path / "notes.txt"
    text.write_text("not a bad-case file\n")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    pickled = tmp_path / "list.pkl"
    pickled.write_bytes(pickle.dumps([1, 2, 3]))
    for path in (text, other, pickled):
        with pytest.raises(ValueError, match=rf"{path.name}.*not a bad-case file"):
            qa.load_bad_cases(path)
        assert qa.bad_cases is good
    with pytest.raises(FileNotFoundError, match="auto_find_bad_case"):
        qa.load_bad_cases(tmp_path / "missing.pt")
    assert qa.load_bad_cases().rows == good.rows  # the real one still loads


def test_constructor_strict_must_be_a_bool(tmp_path) -> None:
    with pytest.raises(TypeError, match="strict must be True or False"):
        QuantAnalysis(calibrated(), out_dir=tmp_path, strict="no")


def test_out_dir_that_is_a_file_is_refused_at_construction(tmp_path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for out_dir in (taken, taken / "below"):
        with pytest.raises(ValueError, match=r"QuantAnalysis: out_dir .*taken.* is a file, not a folder"):
            QuantAnalysis(calibrated(), out_dir=out_dir)
    assert taken.read_text() == "keep me"
