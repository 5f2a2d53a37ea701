"""``qat-lightning`` (= ``python -m qat_lightning``): the Hydra application.

The only module that imports hydra. It registers the typed schema (``qat_lightning.app.schema``) in
Hydra's ConfigStore, composes ``conf/config.yaml`` with the command-line overrides, instantiates the
user's LightningModule / LightningDataModule / logger from their ``_target_`` and hands plain factories to
``qat_lightning.app.runner.run``.

Before Hydra takes over, the overrides are composed once on their own so that a misspelt key gets an
error that lists the valid keys (Hydra's own message only says the key is not in the struct).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from qat_lightning.app.conf_dir import config_dir
from qat_lightning.app.config_checks import ConfigError, check_config, ignored_overrides
from qat_lightning.app.schema import (
    AppConfig,
    StageName,
    check_trainer_keys,
    did_you_mean,
    schema_node,
    valid_keys,
)

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "compose",
    "explain_error",
    "main",
    "make_factories",
    "register_schema",
]

log = logging.getLogger("qat_lightning")

CONFIG_DIR = config_dir()
"""The app's config tree (``qat_lightning/conf``: the repository's ``conf/``, shipped as package data)."""

SCHEMA_NAME = "qat_lightning_schema"
_FLAGS_WITH_VALUE = {
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--experimental-rerun",
}


def register_schema() -> None:
    """Register :class:`AppConfig` as ``qat_lightning_schema`` in Hydra's ConfigStore (idempotent)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema_node())


def _trainer_params() -> list[str]:
    import inspect

    import lightning

    return [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]


def explain_error(err: BaseException) -> str:
    """Turn a composition error into a message that names the valid keys / values.

    Args:
        err: what Hydra / OmegaConf raised.
    """
    message = str(err)
    cause: BaseException | None = err
    while cause is not None:
        full_key = getattr(cause, "full_key", None)
        text = str(cause)
        if full_key and (
            "not in" in text or "Could not override" in message or "Could not append" in message
        ):
            parent, _, key = str(full_key).rpartition(".")
            if parent == "trainer" or str(full_key).startswith("trainer."):
                choices = _trainer_params()
                where = "lightning.Trainer arguments"
            else:
                choices = valid_keys(parent) or []
                where = f"keys of '{parent or '<root>'}'"
            if choices and key not in choices:
                return (
                    f"unknown config key '{full_key}'{did_you_mean(key, choices)}\n"
                    f"valid {where}: {', '.join(choices)}"
                )
        cause = cause.__cause__ or cause.__context__
    details = []
    cause = err.__cause__ or err.__context__
    while cause is not None:
        first = str(cause).split("\n    full_key:")[0].strip()
        if first and "$VALUE" not in first and first not in message and not details:
            details.append(first)
        cause = cause.__cause__ or cause.__context__
    return "\n".join([message, *details])


def _overrides(argv: Sequence[str]) -> list[str] | None:
    """Return the ``key=value`` overrides of a command line (``None``: Hydra flags make it special)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun", "--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp"):
            return None
        if arg in _FLAGS_WITH_VALUE:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        out.append(arg)
    return out


def compose(overrides: Sequence[str] = (), config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Compose the app's config with ``overrides`` (Hydra compose API), errors explained.

    Args:
        overrides: ``key=value`` / ``group=option`` strings.
        config_dir: the config tree.

    Raises:
        ConfigError: with :func:`explain_error`'s message.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schema()
    try:
        if GlobalHydra.instance().is_initialized():
            return hydra_compose("config", overrides=list(overrides))
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))
    except Exception as err:  # noqa: BLE001 - every composition error becomes one clear message
        raise ConfigError(explain_error(err)) from err


def to_app_config(cfg: DictConfig) -> AppConfig:
    """Convert a composed config to the frozen :class:`AppConfig` (model/data/trainer/logger as dicts).

    Raises:
        ConfigError: for trainer keys ``lightning.Trainer`` does not take, a missing ``_target_``, or values
            out of range (:func:`~qat_lightning.app.config_checks.check_config`).
        RecipeError: a recipe the chip cannot run (``stage=calibration`` / ``troubleshoot``).
    """
    from qat_lightning.app.recipes import recipe_from_conf

    app = OmegaConf.to_object(cfg)
    if not isinstance(app, AppConfig):  # pragma: no cover - the schema is always first in the defaults
        raise ConfigError(f"the config was not composed with {SCHEMA_NAME} first in its defaults")
    try:
        check_trainer_keys(app.trainer)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    for group in ("model", "data"):
        if "_target_" not in getattr(app, group):
            raise ConfigError(
                f"{group}._target_ is missing: pick {group}=<option> or set {group}._target_=pkg.module.Class"
            )
    if app.stage.name in (StageName.calibration, StageName.troubleshoot):
        recipe_from_conf(app.recipe, app.chip, app.calibration)  # the chip rules first: RecipeError
    check_config(app)
    return app


def make_factories(cfg: DictConfig) -> Any:
    """Plain factories for the model, datamodule and logger of a composed config."""
    from hydra.utils import instantiate

    from qat_lightning.app.session import Factories

    def build(group: str, **kwargs: Any) -> Any:
        node = cfg[group]
        try:
            return instantiate(node, **kwargs)
        except Exception as err:  # noqa: BLE001 - name the group and the target in the message
            target = node.get("_target_", "?")
            raise ConfigError(f"cannot build {group} ({target}): {err}") from err

    def callback(name: str, **runtime: Any) -> Any:
        if name not in cfg.callbacks:
            raise ConfigError(f"callbacks.{name} is missing; conf/callbacks/ defines {sorted(cfg.callbacks)}")
        node = OmegaConf.to_container(cfg.callbacks[name], resolve=True, enum_to_str=True)
        # a run-time argument never overrides the YAML silently (config_checks refuses this up front)
        clash = [
            f"callbacks.{name}.{k}={node[k]!r} vs {v!r}" for k, v in runtime.items() if node.get(k, v) != v
        ]
        if clash:
            raise ConfigError(
                f"callbacks.{name} sets what the stage passes at run time ({'; '.join(clash)}); drop the "
                f"callbacks.{name} key and set the stage's config (conf/config.yaml) instead"
            )
        try:  # a partial: run-time objects (a QconfigSetter) must not go through OmegaConf
            return instantiate(node, _partial_=True)(**runtime)
        except Exception as err:  # noqa: BLE001 - name the callback and its target in the message
            raise ConfigError(f"cannot build callbacks.{name} ({node.get('_target_', '?')}): {err}") from err

    def logger(out_dir: Path) -> Any:
        if cfg.get("logger") is None or "_target_" not in cfg.logger:
            return None
        return build("logger", save_dir=str(out_dir), name="", version="")

    def ptq() -> tuple[Any, list[Any]]:
        node = cfg.ptq
        try:
            equalization = None if node.equalization is None else instantiate(node.equalization)
            return equalization, [instantiate(c) for c in node.after_calibration]
        except Exception as err:  # noqa: BLE001 - name the group and the choice in the message
            raise ConfigError(f"cannot build the ptq={node.name} callbacks: {err}") from err

    return Factories(
        model=lambda: build("model"),
        datamodule=lambda: build("data"),
        logger=logger,
        callback=callback,
        ptq=ptq,
    )


def run_config(cfg: DictConfig, run_dir: Path) -> Any:
    """Run the stage a composed config asks for; returns the summary.

    Args:
        cfg: the composed config (a ``DictConfig`` with the schema).
        run_dir: where the run writes.
    """
    from qat_lightning.app.runner import run

    app = to_app_config(cfg)
    return run(app, run_dir, make_factories(cfg), CONFIG_DIR)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    from qat_lightning.app.recipes import RecipeError

    try:
        run_config(cfg, run_dir)
    except (ConfigError, RecipeError) as err:
        log.error("%s", err)
        print(f"qat-lightning: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Entry point of ``qat-lightning`` / ``python -m qat_lightning``."""
    if not CONFIG_DIR.is_dir():
        print(
            f"qat-lightning: error: the config tree {CONFIG_DIR} is missing; install from a checkout "
            '(pip install -e ".[dev]") or reinstall the package (pip install .)',
            file=sys.stderr,
        )
        sys.exit(2)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: `model._target_=mypkg.MyModule` imports from here
    register_schema()
    overrides = _overrides(sys.argv[1:])
    if overrides is not None:
        from qat_lightning.app.recipes import RecipeError

        try:
            app = to_app_config(compose(overrides))
        except (ConfigError, RecipeError) as err:
            print(f"qat-lightning: error: {err}", file=sys.stderr)
            sys.exit(2)
        for line in ignored_overrides(app.stage.name, overrides, cfg=app):
            print(f"qat-lightning: warning: ignored override {line}", file=sys.stderr)
    _hydra_main()


if __name__ == "__main__":
    main()
