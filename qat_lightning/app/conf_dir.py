"""Where the app's config tree is: ``conf/`` shipped inside the package (``qat_lightning/conf``).

The repository's top-level ``conf/`` is the tree users read and edit; ``qat_lightning/conf`` is a symbolic
link to it, so a checkout (editable install) reads the same files, and a wheel (``pip install .``) ships a
copy of them as package data (``[tool.setuptools.package-data]`` in ``pyproject.toml``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["config_dir"]


def config_dir() -> Path:
    """Return the directory of ``config.yaml`` and the config groups (``chip/``, ``recipe/``, ...)."""
    return Path(str(resources.files("qat_lightning") / "conf")).resolve()
