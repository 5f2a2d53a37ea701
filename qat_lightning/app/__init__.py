"""The ``qat-lightning`` application: typed config schema, recipes, stage runners, the pipeline, summaries.

``qat_lightning.cli`` (the only module importing hydra) composes ``conf/`` against :mod:`.schema` and calls
:func:`qat_lightning.app.runner.run`.
"""
