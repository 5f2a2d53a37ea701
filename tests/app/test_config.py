"""Every YAML of conf/ composes against the typed schema and instantiates; override errors are clear."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from qat_lightning.app.recipes import RecipeError, load_recipe_conf, recipe_from_conf
from qat_lightning.app.schema import AppConfig, CalibrationConf, ChipConf, ChipName
from qat_lightning.cli import CONFIG_DIR, ConfigError, register_schema, to_app_config
from qat_lightning.cli import compose as app_compose

GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in sorted(CONFIG_DIR.iterdir())
    if group.is_dir()
}
REQUIRED = {
    "chip": ["j6e", "j6m", "j6p"],
    "recipe": [
        "float",
        "int8",
        "int16",
        "int8_int16",
        "int16_fp16",
        "int8_int16_fp16",
        "gemm_int16_other_fp16",
        "gemm_int8_other_fp16",
    ],
    "calibration": ["minmax", "moving_minmax", "percentile", "kl", "mse", "mix"],
    "stage": ["float", "calibration", "qat", "analysis", "pipeline"],
    "sanity": ["none", "lr0", "float"],
    "trainer": ["cpu", "ddp_cpu", "gpu"],
}
CASES = [(group, option) for group, options in GROUPS.items() for option in options]


@pytest.fixture(scope="module")
def hydra_dir():
    register_schema()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield


def test_required_options_exist():
    for group, options in REQUIRED.items():
        assert set(options) <= set(GROUPS[group]), group
    assert GROUPS["model"] and GROUPS["data"] and "tensorboard" in GROUPS["logger"]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_yaml_composes_and_instantiates(hydra_dir, group, option, tmp_path):
    cfg = compose("config", overrides=[f"{group}={option}"])
    app = to_app_config(cfg)
    assert isinstance(app, AppConfig)
    if group in ("model", "data"):
        obj = instantiate(cfg[group])
        assert isinstance(obj, L.LightningModule if group == "model" else L.LightningDataModule)
    elif group == "logger":
        logger = (
            None
            if cfg.logger is None
            else instantiate(cfg.logger, save_dir=str(tmp_path), name="", version="")
        )
        assert logger is None or logger.log_dir is not None
    elif group == "trainer":
        if app.trainer["accelerator"] == "gpu" and not torch.cuda.is_available():
            pytest.skip("no GPU here: the keys were checked against lightning.Trainer")
        trainer = L.Trainer(**app.trainer, logger=False, default_root_dir=str(tmp_path))
        assert trainer.num_devices >= 1
    elif group == "recipe" and app.recipe.quantize:
        chip = "j6p" if option.startswith("gemm") else "j6m"
        recipe = recipe_from_conf(app.recipe, ChipConf(ChipName(chip)), app.calibration)
        assert recipe.setter() is not None
    elif group == "chip":
        assert app.chip.name.value == option
    elif group == "callbacks":
        _check_callback_yaml(cfg, option)


def _check_callback_yaml(cfg, name):
    """conf/callbacks/<name>.yaml: instantiates, and every key is an argument of that name and value."""
    import inspect

    from hydra.utils import get_class
    from lightning.pytorch.callbacks import Callback
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg.callbacks[name], resolve=True, enum_to_str=True)
    params = inspect.signature(get_class(node["_target_"]).__init__).parameters
    callback = instantiate(node, _partial_=True)()
    assert isinstance(callback, Callback)
    for key, value in node.items():
        if key == "_target_":
            continue
        assert key in params, f"callbacks.{name}.{key} is not an argument of {node['_target_']}"
        got = getattr(callback, key, value)
        assert got == (tuple(value) if isinstance(got, tuple) else value), (name, key)


def test_issue_example_override(hydra_dir):
    cfg = compose(
        "config", overrides=["chip=j6p", "recipe=gemm_int8_other_fp16", "stage=calibration", "calibration=kl"]
    )
    app = to_app_config(cfg)
    assert (app.chip.name.value, app.recipe.name.value, app.stage.name.value) == (
        "j6p",
        "gemm_int8_other_fp16",
        "calibration",
    )
    assert app.calibration.observer.value == "kl"
    assert app.stage.name.value == "calibration"


def test_default_is_pipeline_on_the_example(hydra_dir):
    app = to_app_config(compose("config"))
    assert app.stage.name.value == "pipeline"
    assert app.model["_target_"] == "qat_lightning.example.DigitsClassifier"
    assert app.data["_target_"] == "qat_lightning.example.DigitsDataModule"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["qat.lrr=0.1"], ["unknown config key 'qat.lrr'", "did you mean 'lr'", "max_epochs", "scheduler"]),
        (["trainer.max_epoch=3"], ["did you mean 'max_epochs'", "lightning.Trainer"]),
        (["+trainer.max_epoch=3"], ["did you mean 'max_epochs'", "valid trainer keys"]),
        (["chip.name=j6x"], ["expected one of [j6e, j6m, j6p]"]),
        (["chip=j6x"], ["Available options in 'chip'", "j6e", "j6p"]),
        (["recipe=int9"], ["Available options in 'recipe'", "int8_int16"]),
        (
            ["calibration.observer=histogram"],
            ["expected one of [minmax, moving_minmax, percentile, kl, mse, mix]"],
        ),
        (["recipe.activation=int4"], ["expected one of [qint8, qint16, float16, float32]"]),
        (["stage=trian"], ["Available options in 'stage'", "pipeline"]),
        (["pipelin.qat=false"], ["unknown config key 'pipelin'", "did you mean 'pipeline'"]),
        (["qat.max_epochs=two"], ["could not be converted to Integer"]),
    ],
)
def test_override_errors_are_clear(override, expected):
    with pytest.raises(ConfigError) as err:
        to_app_config(app_compose(override))
    for text in expected:
        assert text in str(err.value)


@pytest.mark.parametrize("chip", ["j6e", "j6m", "j6p"])
@pytest.mark.parametrize("name", REQUIRED["recipe"])
def test_chip_rules_on_recipes(chip, name):
    conf = load_recipe_conf(CONFIG_DIR, name)
    double_int16 = name == "gemm_int16_other_fp16"
    if double_int16 and chip != "j6p":
        with pytest.raises(RecipeError) as err:
            recipe_from_conf(conf, ChipConf(ChipName(chip)), CalibrationConf())
        message = str(err.value)
        assert f"{chip}: gemm cannot take int16 on both activation and weight" in message
        assert "matmul cannot take int16 on both inputs" in message
        assert "chip.on_violation=downgrade" in message
    else:
        recipe = recipe_from_conf(conf, ChipConf(ChipName(chip)), CalibrationConf())
        assert recipe.chip == chip


def test_downgrade_is_allowed_by_the_app_check():
    conf = load_recipe_conf(CONFIG_DIR, "gemm_int16_other_fp16")
    chip = ChipConf(ChipName.j6m, on_violation="downgrade")  # type: ignore[arg-type]
    recipe = recipe_from_conf(conf, chip, CalibrationConf())
    assert recipe.on_violation == "downgrade"
    assert recipe.setter().on_violation == "downgrade"


def test_recipe_round_trip():
    conf = load_recipe_conf(CONFIG_DIR, "int8_int16")
    recipe = recipe_from_conf(conf, ChipConf(), CalibrationConf()).replace(
        raised=(("cat", "activation"), ("head", "weight")), fp16_ops=("attn.softmax",)
    )
    again = type(recipe).from_dict(recipe.to_dict())
    assert again == recipe
    assert "2 sensitive row(s) -> qint16" in recipe.describe()


def test_conf_is_yaml_only():
    assert all(p.suffix == ".yaml" for p in Path(CONFIG_DIR).rglob("*") if p.is_file())
