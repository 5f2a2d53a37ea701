"""``Pipeline``: the state one ``stage=...`` run shares (session, steps, results, decisions, ``summary.md``).

The runners of each stage are in :mod:`qat_lightning.app.stage_runners`; ``run`` (the dispatcher) is in
:mod:`qat_lightning.app.runner`.

Pipeline for j6e / j6m (the seed's "J6E/M Mixed Precision Tuning" flow):

1. float training (or ``ckpt=`` a float checkpoint) -> the target (``target.ratio_of_float`` x float);
2. all-int16 calibration (int16 activations, int8 weights: the upper bound the chip can run);
3. if below target: int16/fp16 — the ops most sensitive under int16 go to fp16, the fewest that reach the
   target (the fp16 ops are then kept in every later step);
4. all-int8 calibration; if below target and ``ptq=`` names post-training algorithms (equalization before
   prepare, AdaRound / bias correction after calibration), all-int8 again with them, kept if better (the
   cheaper fix first: the int16 search below then runs on the improved model);
5. if below target: bad cases + layer-by-layer comparison + sensitivity on the int8 model, then the minimal
   int16 ratio by ``search_mixed_precision``, and a calibration of that mixed recipe;
6. QAT of the chosen recipe (no-warmup LR);
7. both sanity checks (lr0: QAT with LR 0 = calibration model; float: fake quant off = float model);
8. the summary table, printed and written to ``summary.md``.

On j6p (the seed's "J6P Mixed Precision Tuning"): step 2 is gemm double-int16 + other ops fp16 (a miss is
analysed and reported; the seed's fixes for non-gemm ops are manual), step 3 is skipped, step 4 is gemm
int8 + other fp16 and step 5 tunes the gemm int8/int16 ratio (gemm rows only).

Every decision is logged (``qat_lightning.log``) with the numbers behind it and listed in ``summary.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qat_lightning.app.checkpoints import calibration_record, is_rank_zero, read_checkpoint_info
from qat_lightning.app.recipes import Recipe, load_recipe_conf, recipe_from_conf
from qat_lightning.app.schema import AppConfig, RecipeConf
from qat_lightning.app.session import Session, StageResult
from qat_lightning.app.summary import Summary, render_markdown, render_table
from qat_lightning.app.tuning import fp16_search, int16_search
from qat_lightning.files import write_atomic

__all__ = ["FILES", "Pipeline", "existing_files"]

log = logging.getLogger("qat_lightning")

FILES = {
    "summary.md": "this summary",
    "qat_lightning.log": "the full log, every decision with its numbers",
    "checkpoints/": "float.ckpt, calibration*.ckpt, qat.ckpt (each records its recipe)",
    "model_check_result.txt": "prepare's structure and qconfig check (per quantized step)",
    "quant_analysis/": "bad cases, compare_per_layer, sensitivity tables and plots; dual_int16.txt (ops "
    "needing int16 on both inputs vs single-type suspects), shared_modules.txt (cases B / C), "
    "fp16_diagnosis.txt (j6p)",
    "*_lr_probe/lr_probe.md": "the QAT LR probe table (qat.lr_probe.lrs=[...])",
    "sanity_check.txt": "the lr0 / float sanity check verdicts",
    "troubleshoot.md": "stage=troubleshoot: the three checks, expected vs got, the part at fault",
    "*_export/model.onnx": "the chosen model as QDQ ONNX, with model.encodings.json and export_check.txt "
    "(onnxruntime vs fake quant)",
    "events.out.tfevents.*": "TensorBoard: `tensorboard --logdir <run dir>`",
}


def _used(state: dict[str, Any]) -> int | None:
    """Return a ``Calibration`` state's ``batches_used`` (``None``: the callback keeps no such count)."""
    used = state.get("batches_used")
    return used if isinstance(used, int) and not isinstance(used, bool) else None


def _calibration_text(recipe: Recipe | None, batches: int | None, loader: str | None, unknown: str) -> str:
    """Return ``mse (weights minmax), 4 batches of the train data``; what is not known is ``unknown``."""
    observers = f"observer {unknown}"
    if recipe is not None:
        kwargs = f" {dict(recipe.observer_kwargs)}" if recipe.observer_kwargs else ""
        observers = f"{recipe.observer}{kwargs} (weights {recipe.weight_observer})"
    count = f"batches {unknown}" if batches is None else f"{batches} batches"
    return f"{observers}, {count}" + (f" of the {loader} data" if loader and batches is not None else "")


def existing_files(run_dir: Path, files: dict[str, str]) -> dict[str, str]:
    """Keep the entries of ``files`` (glob patterns under ``run_dir``, at any depth) that exist.

    ``summary.md`` is always kept (it is being written); a pattern ending in ``/`` names a directory.
    """
    kept = {}
    for pattern, meaning in files.items():
        if pattern == "summary.md" or any(True for _ in run_dir.rglob(pattern.rstrip("/"))):
            kept[pattern] = meaning
    return kept


@dataclass
class Pipeline:
    """One run: the session, the summary rows, the decisions and the step directories.

    Args:
        session: the stage runners.
        conf_dir: the config tree (the pipeline reads its recipes from ``<conf_dir>/recipe``).

    Attributes:
        source_ckpt: the checkpoint the stage started from (:meth:`resolve_ckpt`), ``None`` until resolved.
    """

    session: Session
    conf_dir: Path
    rows: list[StageResult] = field(default_factory=list)
    decisions: list[str] = field(default_factory=list)
    step_no: int = 0
    current_dir: Path = Path(".")
    started: float = field(default_factory=time.perf_counter)
    console: Any = None
    source_ckpt: Path | None = None

    def __post_init__(self) -> None:
        import sys

        from rich.console import Console

        self.console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def cfg(self) -> AppConfig:
        """The configuration."""
        return self.session.cfg

    @property
    def chip(self) -> str:
        """The chip name."""
        return self.cfg.chip.name.value

    def step(self, name: str, title: str, own_dir: bool = True) -> Path:
        """Start a step: print its header, return its directory."""
        self.step_no += 1
        elapsed = time.perf_counter() - self.started
        self.console.rule(f"[bold]step {self.step_no}: {title}[/bold]  ({elapsed:.0f} s)")
        log.info("step %d: %s", self.step_no, title)
        self.current_dir = self.session.run_dir
        if own_dir:
            self.current_dir = self.session.run_dir / f"{self.step_no:02d}_{name}"
        return self.current_dir

    def decide(self, message: str) -> None:
        """Record and log a decision."""
        self.decisions.append(message)
        log.info("DECISION: %s", message)

    def add(self, row: StageResult) -> StageResult:
        """Add a summary row (and log it)."""
        self.rows.append(row)
        metric = "-" if row.metric is None else f"{row.metric:.4f}"
        log.info("result %s (%s): %s %s", row.step, row.recipe, self.session.monitor, metric)
        return row

    def result(
        self,
        step: str,
        recipe: Recipe | None,
        metric: float | None,
        float_metric: float | None,
        lit: Any = None,
        ckpt: Path | None = None,
        out_dir: Path | None = None,
        note: str = "",
    ) -> StageResult:
        """Add a row with the int16/fp16 ratios and the chip cost of ``lit``'s network."""
        from qat_lightning.app.costs import quant_stats
        from qat_lightning.quant import not_quantized_share

        int16 = fp16 = cost = fp32 = None
        if lit is not None and recipe is not None and recipe.quantize:
            net = getattr(lit, self.cfg.prepare.submodule)
            int16, fp16, cost = quant_stats(net, self.chip)
            fp32 = not_quantized_share(net)[1]
        name = "float" if recipe is None else recipe.name
        row = StageResult(step, name, metric, float_metric, int16, fp16, cost, ckpt, out_dir, note, fp32)
        return self.add(row)

    def resolve_ckpt(self, kind: str) -> Path:
        """``ckpt=`` or ``<run dir>/checkpoints/<kind>.ckpt``; a clear error when neither exists."""
        if self.cfg.ckpt:
            path = Path(self.cfg.ckpt).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"ckpt={self.cfg.ckpt} does not exist")
            self.source_ckpt = path
            return path
        path = self.session.ckpt_dir / f"{kind}.ckpt"
        if path.is_file():
            log.info("using %s found in the run dir", path)
            self.source_ckpt = path
            return path
        producer = {"float": "stage=float", "calibration": "stage=calibration"}[kind]
        raise FileNotFoundError(
            f"stage={self.cfg.stage.name.value} needs a {kind} checkpoint: pass ckpt=path/to/{kind}.ckpt "
            f"(written by {producer} or stage=pipeline under <run dir>/checkpoints/), or run in that run dir "
            f"with hydra.run.dir=<run dir>; not found: {path}"
        )

    def float_metric_of(self, float_ckpt: Path, out_dir: Path) -> float:
        """Return the float model's metric: recorded in the checkpoint, else measured."""
        _, info = read_checkpoint_info(float_ckpt)
        if info is not None and info.metric is not None:
            return float(info.metric)
        lit, _ = self.session.load_float(float_ckpt)
        return self.session.validate(lit, out_dir)

    def base_recipe(self, name: str, fp16_ops: tuple[str, ...] = ()) -> tuple[RecipeConf, Recipe]:
        """Return a recipe of the config tree with this run's chip, calibration, ``recipe.module_names``."""
        conf = load_recipe_conf(self.conf_dir, name)
        recipe = recipe_from_conf(conf, self.cfg.chip, self.cfg.calibration)
        names = {**recipe.module_names, **self.cfg.recipe.module_names}  # the user's name rules: every step
        fp16 = tuple(dict.fromkeys((*recipe.fp16_ops, *fp16_ops)))
        return conf, recipe.replace(fp16_ops=fp16, module_names=names)

    # ------------------------------------------------------------------------------------------- steps
    def calibrate(
        self,
        name: str,
        title: str,
        float_ckpt: Path,
        recipe: Recipe,
        float_metric: float,
        ckpt_name: str,
        own_dir: bool = True,
        ptq: bool = False,
    ) -> tuple[Any, float, Path, Path]:
        """Calibrate ``recipe`` (``ptq``: with the ``ptq=`` callbacks).

        Returns:
            ``(module, metric, checkpoint, step dir)``.
        """
        out = self.step(name, title, own_dir)
        log.info("recipe: %s", recipe.describe())
        lit, metric, ckpt = self.session.calibrate(float_ckpt, recipe, out, ckpt_name, float_metric, ptq)
        self.result(title, recipe, metric, float_metric, lit, ckpt, out)
        return lit, metric, ckpt, out

    def analyze(self, lit: Any, name: str, title: str, own_dir: bool = True) -> list[Any]:
        """Bad cases + per-layer comparison + sensitivity; returns the tables."""
        out = self.step(name, title, own_dir)
        return self.session.analyze(lit, out)

    def fp16_step(
        self, lit: Any, tables: list[Any], target: float, conf: RecipeConf, out: Path
    ) -> tuple[str, ...]:
        """Run the int16/fp16 search on a calibrated int16 module; return the fp16 op names."""
        s = self.session
        if conf.fp16_topk is None and self.cfg.pipeline.fp16_max < 1:
            self.decide("int16/fp16: pipeline.fp16_max=0: no op moved to fp16 (no search)")
            return ()
        outcome = fp16_search(
            getattr(lit, self.cfg.prepare.submodule),
            tables,
            s.evaluator(lit, out),
            target,
            self.chip,
            self.cfg.pipeline.fp16_max,
            s.higher_is_better,
            conf.fp16_topk,
            out / "quant_analysis",
        )
        ops = ", ".join(outcome.chosen) or "none"
        if conf.fp16_topk is not None:
            self.decide(
                f"int16/fp16: top-{conf.fp16_topk} int16-sensitive op(s) to fp16 (fixed by the recipe): {ops}"
            )
            return tuple(outcome.chosen)
        probes = ", ".join(f"top-{int(k)}: {m:.4f}" for k, m in outcome.probes)
        verdict = "reaches" if outcome.reached else "does not reach (best kept)"
        self.decide(
            f"int16/fp16: {len(outcome.chosen)} op(s) in fp16 ({ops}) {verdict} the target {target:.4f} "
            f"(probes {probes or 'none'})"
        )
        return tuple(outcome.chosen)

    def int16_step(
        self, lit: Any, tables: list[Any], target: float, conf: RecipeConf, gemm_only: bool, out: Path
    ) -> Any:
        """Run the int8/int16 search on a calibrated low-precision module; return the outcome."""
        s = self.session
        kind = None if conf.sensitive_type is None else conf.sensitive_type.value
        model = None if lit is None else getattr(lit, self.cfg.prepare.submodule)
        evaluate = None if lit is None or conf.int16_ratio is not None else s.evaluator(lit, out)
        outcome = int16_search(
            model,
            tables,
            evaluate,
            target,
            self.chip,
            gemm_only,
            kind,
            self.cfg.search.cost_aware,
            s.higher_is_better,
            conf.int16_ratio,
            conf.sensitive_dtype.value,
            out / "quant_analysis",
            self.cfg.search.reuse_activations,
            self.cfg.search.cache_budget_mb,
        )
        ops = ", ".join(f"{op}/{t}" for op, t in outcome.chosen) or "none"
        if conf.int16_ratio is not None:
            self.decide(f"int16 ratio fixed by the recipe at {conf.int16_ratio}: raise {ops}")
            return outcome
        probes = ", ".join(f"{r:.0%}: {m:.4f}" for r, m in outcome.probes)
        metric = "-" if outcome.metric is None else f"{outcome.metric:.4f}"
        cost = "" if outcome.cost is None else f", est. cost {outcome.cost:.2f} x all-low"
        what = "gemm int16 ratio" if gemm_only else "int16 ratio"
        n = len(outcome.chosen)  # the count to paste back: the printed ratio is rounded for display
        if outcome.reached:
            self.decide(
                f"minimal {what} {outcome.ratio:.1%} ({n} row(s): recipe.int16_ratio={n} raises the same) "
                f"reaches the target {target:.4f} with {metric}{cost}; "
                f"raise {ops} (probes ratio: metric {probes or 'none'})"
            )
        else:
            self.decide(
                f"no {what} reaches the target {target:.4f} (probes ratio: metric {probes or 'none'}); "
                f"keeping the best probe: {len(outcome.chosen)} row(s) raised ({ops}), {metric}{cost}"
            )
        return outcome

    # ------------------------------------------------------------------------------------------- finish
    def calibration_fact(self) -> str:
        """Return the summary's calibration line: how the model this run reports on was calibrated.

        Stages that calibrate (``calibration`` / ``pipeline`` / ``troubleshoot``) report what their
        ``Calibration`` callbacks did (the built ``callbacks.calibration``, whatever ``calibration.*`` says):
        the observers of the calibrated recipe, the batches the callback used and its data loader (one
        entry per different calibration). Stages that start from a calibrated checkpoint (``stage.needs ==
        calibration``: ``qat``, ``analysis``, ``export``) report what the checkpoint records; what it does
        not record is "unknown", never this run's config (which those stages do not use).
        """
        if self.cfg.stage.needs != "calibration":
            runs = [
                _calibration_text(recipe, _used(state), state.get("dataloader"), "unknown (not counted)")
                for recipe, state in self.session.calibrations
            ]
            return "; ".join(dict.fromkeys(runs)) or "none (this stage does not calibrate)"
        unknown = "unknown (not recorded in the checkpoint)"
        path = self.source_ckpt
        if path is None or not path.is_file():
            return f"{unknown} (no checkpoint resolved)"
        ckpt, info = read_checkpoint_info(path)
        recipe = None if info is None else info.recipe
        record = calibration_record(ckpt, self.cfg.prepare.submodule)
        if recipe is None and record is None:
            return f"{unknown} (from ckpt={path})"
        batches, loader = (None, None) if record is None else record
        return f"{_calibration_text(recipe, batches, loader, unknown)} (from ckpt={path})"

    def finish(self, title: str, extra_facts: dict[str, str] | None = None) -> Summary:
        """Write ``summary.md``, print the table, return the summary."""
        cfg = self.cfg
        facts = {
            "stage": cfg.stage.name.value,
            "chip": self.chip,
            "target": f"{cfg.target.metric} ({cfg.target.mode.value}), "
            + (
                f"{cfg.target.value}"
                if cfg.target.value is not None
                else f"{cfg.target.ratio_of_float:g} x float"
            ),
            "calibration": self.calibration_fact(),
            "wall time": f"{time.perf_counter() - self.started:.1f} s",
            **(extra_facts or {}),
        }
        files = existing_files(self.session.run_dir, FILES)
        summary = Summary(title, facts, tuple(self.rows), tuple(self.decisions), files)
        path = self.session.run_dir / "summary.md"
        if not is_rank_zero():
            return summary
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, render_markdown(summary))
        self.console.print(render_table(summary))
        self.console.print(f"summary: {path}")
        log.info("summary written to %s\n%s", path, render_markdown(summary))
        return summary
