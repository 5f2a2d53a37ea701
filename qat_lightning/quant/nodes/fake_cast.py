"""The float16 quant point :class:`FakeCast` and the user-facing float16 switch."""

from __future__ import annotations

from torch import Tensor, nn

from qat_lightning.quant.nodes.functional import fake_cast
from qat_lightning.quant.nodes.switches import FakeCastSwitch

__all__ = ["FakeCast"]


class FakeCast(nn.Module):
    """A float16 quant point (round trip through fp16, saturating at ±65504), and the global switch.

    ``FakeCast.disable()`` / ``FakeCast.enable()`` turn every float16 node off/on, also from inside a
    ``forward`` (the seed's partial-quantization idiom).
    """

    def forward(self, x: Tensor) -> Tensor:
        """Fake-cast ``x`` to float16 precision when fake cast is enabled."""
        return fake_cast(x) if FakeCastSwitch._enabled else x

    @staticmethod
    def enable() -> None:
        """Turn float16 fake cast on for every node."""
        FakeCastSwitch.enable()

    @staticmethod
    def disable() -> None:
        """Turn float16 fake cast off for every node."""
        FakeCastSwitch.disable()

    @staticmethod
    def enabled() -> bool:
        """Whether float16 fake cast is on."""
        return FakeCastSwitch.enabled()
