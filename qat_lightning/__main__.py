"""``python -m qat_lightning`` = ``qat-lightning``."""

from qat_lightning.cli import main

main()
