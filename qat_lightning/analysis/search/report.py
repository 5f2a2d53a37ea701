"""Files of a mixed-precision search, written apart from the search itself.

The searches return a frozen :class:`~qat_lightning.analysis.search.result.MixedPrecisionPlan` and write
nothing. :class:`SearchReporter` is what callers hand them to keep a progress file
(``<stem>_probes.json`` after every probe: ``on_probe=reporter.probe``) and to write the plan at the end
(:meth:`SearchReporter.write`, or :func:`write_plan` alone).
"""

from __future__ import annotations

import os
from pathlib import Path

from qat_lightning.analysis.reports import plan_text, probes_csv, to_json, write_atomic
from qat_lightning.analysis.reports.plots import search_png
from qat_lightning.analysis.search.result import MixedPrecisionPlan, Probe

__all__ = ["SearchReporter", "write_plan"]


def write_plan(plan: MixedPrecisionPlan, out_dir: str | os.PathLike, stem: str = "mixed_precision") -> None:
    """Write ``<stem>.txt``, ``<stem>_probes.csv``, ``<stem>.json`` and ``<stem>.png`` for a plan."""
    out = Path(out_dir)
    write_atomic(out / f"{stem}.txt", plan_text(plan))
    write_atomic(out / f"{stem}_probes.csv", probes_csv(plan.probes))
    write_atomic(out / f"{stem}.json", to_json({k: v for k, v in vars(plan).items() if k != "setter"}))
    write_atomic(out / f"{stem}.png", search_png(plan.probes, plan.target))


class SearchReporter:
    """Writes a search's progress and its plan under ``out_dir`` (files named ``<stem>...``).

    Args:
        out_dir: the report folder (created when the first file is written).
        stem: the file stem, ``mixed_precision`` by default (``fp16_topk`` for the fp16 step).
    """

    def __init__(self, out_dir: str | os.PathLike, stem: str = "mixed_precision") -> None:
        self.out_dir = Path(out_dir)
        self.stem = stem
        self.probes: list[Probe] = []

    def probe(self, probe: Probe) -> None:
        """Record one evaluation and rewrite ``<stem>_probes.json`` (pass as ``on_probe``)."""
        self.probes.append(probe)
        write_atomic(self.out_dir / f"{self.stem}_probes.json", to_json(self.probes))

    def write(self, plan: MixedPrecisionPlan) -> MixedPrecisionPlan:
        """Write the plan's files (see :func:`write_plan`) and return the plan."""
        write_plan(plan, self.out_dir, self.stem)
        return plan
