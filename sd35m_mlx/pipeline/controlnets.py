"""ControlNets held by the pipeline: `load_controlnet` and the list `generate(control_image=...)` uses."""

from __future__ import annotations

import os

from ..editing.control import check_fits
from ..loading.controlnet import QUANTIZATION_POLICY as CONTROLNET_QUANTIZATION
from ..loading.controlnet import load_controlnet
from ..loading.safetensors_io import materialize
from ..models.controlnet import SD3ControlNetModel
from ..quantize import quantize_model


class ControlNetMixin:
    """For StableDiffusion35: `self.controlnets` (set in its __init__), `self.dtype`, `self.transformer_config`."""

    controlnets: list[SD3ControlNetModel]

    def load_controlnet(
        self,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        quantize: int | None = None,
        quantize_group_size: int = 64,
    ) -> SD3ControlNetModel:
        """Add an SD3 ControlNet (diffusers folder, single safetensors file or Hub repo id), in the pipeline's
        dtype, its linear layers quantized to `quantize` bits if given; a ControlNet made for another
        transformer width is refused. Returns the model."""
        net = load_controlnet(source, self.dtype, revision=revision)
        check_fits(net, self.transformer_config, str(source))
        if quantize is not None:
            quantize_model(net, quantize, quantize_group_size, policy=CONTROLNET_QUANTIZATION)
        materialize(net)
        self.controlnets.append(net)
        return net
