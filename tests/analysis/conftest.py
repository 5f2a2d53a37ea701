"""Make the hand-built toy models (``analysis_toys``) importable from the analysis tests."""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
