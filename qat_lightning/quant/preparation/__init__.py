"""Preparation: a float model becomes a quantized (fake-quant) model, and the check report says how.

``prepare`` picks fx tracing (``fx_tracer``, ``fx_plan``, ``fx_prepare``) or eager call probing
(``eager_prepare``), fuses conv/bn/relu/add groups (``fusion``), builds one quant op per float op
(``build``, with the op tables in ``tables``) and writes the model-check report (``model_check``,
rendered by ``model_check_report``). fx helpers: ``fx_switches`` (the guide's switches inside a traced
``forward``), ``fx_float_ops`` (what is left float32), ``fx_masks`` (which values are attention masks),
``fx_sdpa`` (``scaled_dot_product_attention`` as the eager attention's ops), ``fx_inplace`` (uses after
an in-place op read its result); eager helpers: ``eager_probe`` (the probe run), ``eager_flow`` (the data
flow between module calls), ``eager_fusion`` (the user's fuse hook), ``dynamic_block`` (loops over
shapes, the extra-call warning).
Both paths: ``attention_swap`` (each ``nn.MultiheadAttention`` becomes linears, matmuls and a softmax
first); ``nn.Embedding`` is an op with a per-row quantized table (``quant/nodes/embedding.py``).
Op records (``OpInfo``, ``iter_quant_ops``) are shared with the rest of the package: ``quant/ops.py``.
"""

from qat_lightning.quant.preparation.dynamic_block import dynamic_block
from qat_lightning.quant.preparation.eager_fusion import EagerFused, fuse_modules
from qat_lightning.quant.preparation.model_check import (
    ModelCheckReport,
    check_model,
    not_quantized_share,
    write_changelog,
)
from qat_lightning.quant.preparation.prepare import PREPARE_METHODS, QAT_MODES, FxTraceError, prepare

__all__ = [
    "PREPARE_METHODS",
    "QAT_MODES",
    "EagerFused",
    "FxTraceError",
    "ModelCheckReport",
    "check_model",
    "dynamic_block",
    "fuse_modules",
    "not_quantized_share",
    "prepare",
    "write_changelog",
]
