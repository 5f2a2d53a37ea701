"""The Session: one Trainer each for float training, calibration, QAT, analysis and the sanity checks.

Each runner writes into its own output directory (a standalone ``stage=...`` run: the Hydra run dir; the
pipeline: one numbered sub-directory per step): the TensorBoard events (the logger's ``save_dir``),
``model_check_result.txt`` (prepare), ``quant_analysis/`` (analysis), ``sanity_check.txt`` (sanity
checks). Checkpoints go to ``<run dir>/checkpoints/<name>.ckpt`` and carry the decided recipe under
``checkpoint["qat_lightning"]`` so that a later stage rebuilds the same qconfig.

Nothing here imports hydra: ``qat_lightning.cli`` instantiates the user's classes and hands the runners
plain factories (:class:`Factories`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from qat_lightning.app.checkpoints import CheckpointInfo, Record, read_checkpoint_info, restore_float_records
from qat_lightning.app.config_checks import qat_scales
from qat_lightning.app.qat_optimizers import qat_optimizers
from qat_lightning.app.recipes import Recipe
from qat_lightning.app.schema import AppConfig
from qat_lightning.app.summary import StageResult
from qat_lightning.app.trainer_args import run_length

__all__ = ["Factories", "Session", "StageResult"]

log = logging.getLogger("qat_lightning")


@dataclass(frozen=True)
class Factories:
    """How to build the user's objects (``qat_lightning.cli`` makes these with ``hydra.utils.instantiate``).

    Attributes:
        model: a fresh LightningModule.
        datamodule: a fresh LightningDataModule.
        logger: a logger writing into the given directory, or ``None`` for no logger.
        callback: ``callback(name, **runtime)`` builds ``callbacks.<name>`` of the config
            (``conf/callbacks/<name>.yaml``) with the stage's run-time arguments added; one the YAML sets to
            another value is a ``ConfigError``, never a silent override.
        ptq: fresh ``ptq=`` callbacks: the ``Equalization`` (or ``None``) and those run after calibration.
    """

    model: Callable[[], L.LightningModule]
    datamodule: Callable[[], L.LightningDataModule]
    logger: Callable[[Path], Any] = lambda _dir: None
    callback: Callable[..., Callback] | None = None
    ptq: Callable[[], tuple[Callback | None, list[Callback]]] = lambda: (None, [])


@dataclass
class Session:
    """Runs stages for one ``qat-lightning`` invocation.

    Args:
        cfg: the composed configuration.
        run_dir: the Hydra run dir.
        factories: how to build the model, datamodule and logger.
    """

    cfg: AppConfig
    run_dir: Path
    factories: Factories
    _datamodule: L.LightningDataModule | None = field(default=None, init=False, repr=False)
    calibrations: list[tuple[Recipe, dict[str, Any]]] = field(default_factory=list, init=False, repr=False)
    """Each :meth:`calibrate` of this run: the recipe and the built Calibration callback's ``state_dict``."""

    # ------------------------------------------------------------------------------------------- plumbing
    @property
    def ckpt_dir(self) -> Path:
        """``<run dir>/checkpoints``."""
        return self.run_dir / "checkpoints"

    @property
    def monitor(self) -> str:
        """The target metric's name."""
        return self.cfg.target.metric

    def datamodule(self) -> L.LightningDataModule:
        """Return the run's datamodule (built once)."""
        if self._datamodule is None:
            self._datamodule = self.factories.datamodule()
        return self._datamodule

    def new_model(self) -> L.LightningModule:
        """Build a fresh LightningModule (seeded)."""
        L.seed_everything(self.cfg.seed, workers=True, verbose=False)
        return self.factories.model()

    def trainer(
        self, out_dir: Path, callbacks: list[Callback] | None = None, logger: bool = True, **kw: Any
    ) -> L.Trainer:
        """Build a Trainer from ``cfg.trainer`` writing into ``out_dir`` (stage settings in ``kw`` win)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        args: dict[str, Any] = dict(self.cfg.trainer)
        args.update(
            default_root_dir=str(out_dir),
            logger=(self.factories.logger(out_dir) or False) if logger else False,
            callbacks=callbacks or [],
            enable_checkpointing=False,
            enable_progress_bar=self.cfg.progress,
            num_sanity_val_steps=0,
        )
        args.update(kw)
        return L.Trainer(**args)

    def _metric(self, results: list[dict[str, float]], trainer: L.Trainer) -> float:
        values = results[0] if results else {}
        if self.monitor in values:
            return float(values[self.monitor])
        if self.monitor in trainer.callback_metrics:
            return float(trainer.callback_metrics[self.monitor])
        logged = ", ".join(sorted({*values, *trainer.callback_metrics})) or "(none)"
        raise ValueError(
            f"target.metric={self.monitor!r} is not logged by the model's validation_step; logged: {logged}. "
            f"Set target.metric=<one of them> (and target.mode=min for a loss)"
        )

    def validate(
        self,
        lit: L.LightningModule,
        out_dir: Path,
        callbacks: list[Callback] | None = None,
        logger: bool = False,
    ) -> float:
        """Run ``trainer.validate`` and return the target metric."""
        trainer = self.trainer(out_dir, callbacks, logger=logger, limit_val_batches=self._val_limit())
        return self._metric(trainer.validate(lit, datamodule=self.datamodule(), verbose=False), trainer)

    def _val_limit(self) -> Any:
        return self.cfg.train.limit_val_batches  # None: Lightning's default (all batches)

    def evaluator(self, lit: L.LightningModule, out_dir: Path) -> Callable[[Any], float]:
        """Build a plain ``eval_fn(model) -> float`` for the search (``lit`` holds the probed model)."""
        limit = self.cfg.search.eval_batches
        trainer = self.trainer(
            out_dir,
            logger=False,
            enable_progress_bar=False,
            limit_val_batches=self._val_limit() if limit is None else limit,
        )

        def eval_fn(_model: Any) -> float:
            return self._metric(trainer.validate(lit, datamodule=self.datamodule(), verbose=False), trainer)

        return eval_fn

    def example_inputs(self, lit: L.LightningModule) -> Any:
        """Return the module's ``example_input_array``, else the inputs of the first training batch."""
        example = getattr(lit, "example_input_array", None)
        if example is not None:
            return example
        from qat_lightning.analysis.inputs import default_input_fn

        dm = self.datamodule()
        dm.setup("fit")
        return default_input_fn(next(iter(dm.train_dataloader())))

    def save(self, trainer: L.Trainer, record: Record, name: str) -> Path:
        """Save the trainer's model as ``checkpoints/<name>.ckpt``."""
        path = self.ckpt_dir / f"{name}.ckpt"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(path))
        log.info("saved %s (%s)", path, record.info.kind)
        return path

    # ------------------------------------------------------------------------------------------- float
    def train_float(self, out_dir: Path) -> tuple[L.LightningModule, float, Path, int]:
        """Train the float model; returns ``(module, metric, checkpoint, optimizer steps)``."""
        t = self.cfg.train
        lit = self.new_model()
        record = Record(CheckpointInfo("float"))
        limits = {} if t.limit_train_batches is None else {"limit_train_batches": t.limit_train_batches}
        trainer = self.trainer(
            out_dir,
            [record],
            **run_length(t.max_epochs, t.max_steps),  # max_steps > 0 wins
            limit_val_batches=self._val_limit(),
            **limits,
        )
        trainer.fit(lit, datamodule=self.datamodule())
        metric = self._metric(trainer.validate(lit, datamodule=self.datamodule(), verbose=False), trainer)
        steps = int(trainer.global_step)
        record.info = CheckpointInfo("float", metric=metric, float_metric=metric, float_steps=steps)
        return lit, metric, self.save(trainer, record, "float"), steps

    def load_float(self, path: Path) -> tuple[L.LightningModule, CheckpointInfo]:
        """Build a fresh module with the float weights of ``path`` (an app or any Lightning checkpoint)."""
        ckpt, info = read_checkpoint_info(path)
        if info is not None and info.kind != "float":
            raise ValueError(
                f"{path} is a {info.kind} checkpoint; this step needs a float one (checkpoints/float.ckpt)"
            )
        lit = self.new_model()
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        lit.load_state_dict(state, strict=True)
        steps = int(ckpt.get("global_step", 0)) if isinstance(ckpt, dict) else 0
        return lit, info or CheckpointInfo("float", float_steps=steps or None)

    # ------------------------------------------------------------------------------------------- quantized
    def callback(self, name: str, **runtime: Any) -> Callback:
        """Build ``callbacks.<name>`` (``conf/callbacks/<name>.yaml``) with ``runtime`` arguments on top."""
        if self.factories.callback is None:
            raise ValueError("Factories.callback is not set: qat_lightning.cli.make_factories builds it")
        return self.factories.callback(name, **runtime)

    def _prepare_callbacks(
        self, recipe: Recipe | None, ptq: bool = False, calibration: Callback | None = None
    ) -> list[Callback]:
        setter = None if recipe is None else recipe.setter()
        equalization, after = self.factories.ptq() if ptq else (None, [])
        return [
            *([equalization] if equalization is not None else []),
            self.callback("prepare", qconfig_setter=setter),
            self.callback("calibration") if calibration is None else calibration,
            *after,
        ]

    def calibrate(
        self,
        float_ckpt: Path,
        recipe: Recipe,
        out_dir: Path,
        name: str,
        float_metric: float | None,
        ptq: bool = False,
    ) -> tuple[L.LightningModule, float, Path]:
        """Prepare the float model with ``recipe``, calibrate, validate, save ``checkpoints/<name>.ckpt``.

        With ``ptq`` the ``ptq=`` callbacks run too: equalization before prepare, the rest after calibration.
        """
        lit, info = self.load_float(float_ckpt)
        record = Record(
            CheckpointInfo("calibration", recipe, float_metric=float_metric, float_steps=info.float_steps)
        )
        calibration = self.callback("calibration")  # its state (batches used, loader) goes to the summary
        callbacks = [*self._prepare_callbacks(recipe, ptq, calibration), record]
        trainer = self.trainer(out_dir, callbacks, limit_val_batches=self._val_limit())
        metric = self._metric(trainer.validate(lit, datamodule=self.datamodule(), verbose=False), trainer)
        self.calibrations.append((recipe, dict(calibration.state_dict())))
        record.info = CheckpointInfo("calibration", recipe, metric, float_metric, info.float_steps)
        changelog = out_dir / "qconfig_changelog.txt"
        if changelog.is_file():
            log.warning("chip downgrades (%s):\n%s", changelog, changelog.read_text(encoding="utf-8").strip())
        return lit, metric, self.save(trainer, record, name)

    def load_quantized(
        self, path: Path, out_dir: Path | None = None
    ) -> tuple[L.LightningModule, CheckpointInfo]:
        """Build a fresh module prepared with the checkpoint's recipe, loaded strictly (+ float records)."""
        from qat_lightning.callbacks.prepare import load_quantized_checkpoint, prepare_submodule

        ckpt, info = read_checkpoint_info(path)
        if info is None or info.recipe is None:
            raise ValueError(
                f"{path} was not written by a qat-lightning calibration/qat stage (no recorded recipe); "
                "pass the checkpoint written by stage=calibration (checkpoints/calibration.ckpt)"
            )
        lit = self.new_model()
        p = self.cfg.prepare
        setter = info.recipe.setter()
        example = self.example_inputs(lit)
        prepare_submodule(
            lit,
            setter,
            example,
            submodule=p.submodule,
            method=p.method.value,
            qat_mode=p.qat_mode.value,
            check_dir=out_dir,
            int_bias=p.int_bias,
        )
        load_quantized_checkpoint(
            lit,
            path,
            setter,
            example,
            submodule=p.submodule,
            method=p.method.value,
            qat_mode=p.qat_mode.value,
            int_bias=p.int_bias,
        )
        restore_float_records(lit, ckpt, p.submodule)  # the float values ptq= overwrote, for the analysis
        return lit, info

    def qat(
        self,
        calib_ckpt: Path,
        out_dir: Path,
        name: str = "qat",
        extra: list[Callback] | None = None,
        lr: float | None = None,
        scheduler: str | None = None,
        scales: str | None = None,
        **kw: Any,
    ) -> tuple[L.LightningModule, float, Path | None, CheckpointInfo]:
        """QAT from a calibration checkpoint; returns ``(module, metric, checkpoint, calibration info)``.

        ``extra`` callbacks (a ``SanityCheck``) and trainer overrides ``kw`` make the short sanity runs; those
        are not saved (``name=""``). ``lr`` / ``scheduler`` override ``qat.lr`` / ``qat.scheduler`` (the LR
        probe: a fixed LR, ``constant``; the QAT run after it: the chosen LR); ``scales`` overrides
        ``qat.scales`` (the scale trial's ``moving`` / ``fixed_input_output``). The QAT callback gets the
        scale mode as ``scales=`` only (``qat.fix_scales`` is its old name, :func:`qat_scales`).
        """
        q = self.cfg.qat
        lit, info = self.load_quantized(calib_ckpt, out_dir)
        lit.configure_optimizers = qat_optimizers(  # type: ignore[method-assign]
            lit,
            lit.configure_optimizers,
            q.lr if lr is None else lr,
            q.scheduler.value if scheduler is None else scheduler,
        )
        record = Record(
            CheckpointInfo("qat", info.recipe, float_metric=info.float_metric, float_steps=info.float_steps)
        )
        qat_cb = self.callback(
            "qat",
            scales=qat_scales(self.cfg) if scales is None else scales,
            float_steps=info.float_steps or None,
        )
        args: dict[str, Any] = {
            **run_length(q.max_epochs, q.max_steps),  # max_steps > 0 wins
            "limit_val_batches": self._val_limit(),
        }
        if self.cfg.train.limit_train_batches is not None:
            args["limit_train_batches"] = self.cfg.train.limit_train_batches
        args.update(kw)
        callbacks = [*self._prepare_callbacks(info.recipe), qat_cb, *(extra or []), record]
        trainer = self.trainer(out_dir, callbacks, **args)
        trainer.fit(lit, datamodule=self.datamodule())
        metric = self._metric(trainer.validate(lit, datamodule=self.datamodule(), verbose=False), trainer)
        record.info = CheckpointInfo("qat", info.recipe, metric, info.float_metric, info.float_steps)
        return lit, metric, self.save(trainer, record, name) if name else None, info

    def sanity(self, mode: str, calib_ckpt: Path, reference: float, out_dir: Path) -> Any:
        """Run the seed's check ``mode`` (``lr0``/``float``) as a short QAT run; return its result."""
        s = self.cfg.sanity
        check = self.callback(
            "sanity", mode=mode, reference=reference, monitor_mode="max" if self.higher_is_better else "min"
        )
        self.qat(
            calib_ckpt,
            out_dir,
            name="",
            extra=[check],
            max_epochs=1,
            max_steps=-1,
            limit_train_batches=s.steps,
        )
        result = check.result
        if result is not None and result.status != "PASS":
            log.error("SANITY CHECK %s: %s\n%s", mode, result.status, result.render())
        return result

    # ------------------------------------------------------------------------------------------- analysis
    def analyze(self, lit: L.LightningModule, out_dir: Path) -> list[Any]:
        """Bad cases, layer-by-layer comparison and sensitivity of a calibrated module; returns the tables.

        Runs ``QuantAnalysisCallback`` on the validation data: reports under ``<out_dir>/quant_analysis/``,
        plots and tables also in TensorBoard.
        """
        callback = self.callback("analysis")
        trainer = self.trainer(out_dir, [callback], limit_val_batches=1)
        trainer.validate(lit, datamodule=self.datamodule(), verbose=False)
        outcome = callback.run_analysis(trainer, lit)  # rank zero works, the others get None
        tables = list(outcome.sensitivity) if outcome is not None else []
        tables = trainer.strategy.broadcast(tables, src=0)  # every rank searches with the same tables
        for table in tables:
            top = ", ".join(f"{r.op_name}/{r.sensitive_type}={r.metric:.4g}" for r in table.rows[:5])
            log.info("sensitivity (%s, output %s) top 5: %s", table.metric_name, table.output_name, top)
        return tables

    def target(self, float_metric: float) -> float:
        """Return the metric to reach: ``target.value``, else ``ratio_of_float`` of the float metric."""
        t = self.cfg.target
        if t.value is not None:
            return float(t.value)
        if t.mode.value == "max":
            return float_metric * t.ratio_of_float
        return float_metric / t.ratio_of_float if t.ratio_of_float else math.inf

    @property
    def higher_is_better(self) -> bool:
        """``target.mode == max``."""
        return self.cfg.target.mode.value == "max"

    def meets(self, metric: float, target: float) -> bool:
        """Whether ``metric`` reaches ``target`` in the configured direction."""
        return metric >= target if self.cfg.target.mode.value == "max" else metric <= target
