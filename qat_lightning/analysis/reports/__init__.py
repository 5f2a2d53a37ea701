"""Rendering of finished analysis results; nothing here computes a result.

Text in the seed's layout, CSV, JSON (``render``) and PNG plots (``plots``), plus atomic file writes.
"""

from qat_lightning.analysis.reports.plots import export_layers_png, layer_png, search_png, sensitivity_png
from qat_lightning.analysis.reports.render import (
    bad_case_csv,
    bad_case_text,
    layer_csv,
    layer_text,
    plan_text,
    probes_csv,
    safe_filename,
    save_torch_atomic,
    sensitivity_csv,
    sensitivity_text,
    to_json,
    to_jsonable,
    write_atomic,
)

__all__ = [
    "bad_case_csv",
    "bad_case_text",
    "export_layers_png",
    "layer_csv",
    "layer_png",
    "layer_text",
    "plan_text",
    "probes_csv",
    "safe_filename",
    "save_torch_atomic",
    "search_png",
    "sensitivity_csv",
    "sensitivity_png",
    "sensitivity_text",
    "to_json",
    "to_jsonable",
    "write_atomic",
]
