"""The timm vision adapter: any timm backbone as a sequence of image tokens.

ViT-like models already produce tokens; CNNs produce a feature map, whose positions become
tokens. Either way the fusion layers receive ``(B, N, C)`` tokens and a mask.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from fusionkit.encoders.base import EncoderOutput, FreezableEncoder, check_images
from fusionkit.encoders.weights import OFFLINE_VISION_WEIGHTS, load_vision_weights
from fusionkit.errors import ConfigError, ShapeError, did_you_mean
from fusionkit.registry import register

__all__ = ["TimmVisionEncoder"]


@register("vision_encoder", "timm")
class TimmVisionEncoder(FreezableEncoder):
    """A timm backbone that returns image tokens.

    The classifier is never built (``num_classes=0``): classification lives in the heads.
    Weights come from an offline package or a local checkpoint, never from a hub.

    Args:
        model_name: A timm model name, e.g. ``"vit_tiny_patch16_224"`` or ``"resnet18"``.
        pretrained: ``False`` for random init; a known offline weight name (see
            `fusionkit.encoders.weights.OFFLINE_VISION_WEIGHTS`) or the path of a
            local checkpoint file or directory. ``True`` is refused: there is no hub here.
        freeze: Stop gradients to every backbone parameter and keep the backbone in eval mode
            (batch-norm statistics and dropout fixed) even after ``.train()``.
        **timm_kwargs: Passed to ``timm.create_model`` (``img_size``, ``dynamic_img_size``,
            ``drop_path_rate``, ``in_chans``...).

    Attributes:
        model: The timm backbone.
        model_name: The timm model name.
        in_chans: Input channels the backbone expects (3 unless ``in_chans`` is passed).
        width: Channels ``C`` of every token (timm's ``num_features``).
        num_prefix_tokens: Leading non-patch tokens (class, register, distillation tokens);
            0 for CNNs.
        data_config: Preprocessing of the backbone: ``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct`` (and ``crop_mode``).
        frozen: Whether the backbone is frozen.
        channels_last: Whether images and convolution weights run in ``channels_last``
            memory format (see `use_channels_last`).

    Note:
        A few timm models keep layers that only their classifier path uses (``convnext``'s
        ``head.norm``, ``mobilenetv3``'s ``conv_head``); their parameters get no gradient
        from the tokens, so train those under DDP with ``find_unused_parameters=True``.

    Raises:
        ConfigError: The model name is unknown, ``pretrained`` is ``True`` or names unknown
            weights, ``timm_kwargs`` sets ``num_classes`` or an option the model does not take.
        CheckpointError: The weights do not fit the model.
        MissingDependencyError: An offline weight package is not installed.

    Examples:
        >>> encoder = TimmVisionEncoder("resnet18")
        >>> out = encoder(torch.randn(2, 3, 64, 64))
        >>> out.tokens.shape, out.mask.shape
        (torch.Size([2, 4, 512]), torch.Size([2, 4]))
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool | str | os.PathLike[str] = False,
        freeze: bool = False,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        if "num_classes" in timm_kwargs:
            raise ConfigError(
                "num_classes cannot be set: the vision encoder returns tokens "
                "(num_classes=0); classifiers live in the heads"
            )
        # timm is imported on first use: it costs seconds that `import fusionkit` should not.
        import timm
        from timm.data import resolve_model_data_config

        if not timm.is_model(model_name):
            hint = did_you_mean(model_name, timm.list_models(), limit=3, list_choices=False)
            hint = hint or "see timm.list_models()"
            raise ConfigError(f"unknown timm model {model_name!r}; {hint}")
        if not isinstance(pretrained, (bool, str, os.PathLike)):
            raise ConfigError(
                f"pretrained must be False, an offline weight name or a path, got {pretrained!r}"
            )
        if pretrained is True:
            raise ConfigError(
                "pretrained=True would download from a model hub, which fusionkit never does; "
                "pass a known offline weight name "
                f"({', '.join(map(repr, OFFLINE_VISION_WEIGHTS))}) or a local checkpoint path"
            )
        self.model_name = model_name
        try:
            self.model = timm.create_model(
                model_name, pretrained=False, num_classes=0, **timm_kwargs
            )
        except TypeError as error:
            # An option timm's constructor does not take ("unexpected keyword argument").
            raise ConfigError(
                f"timm model {model_name!r} does not accept the option(s) "
                f"{sorted(timm_kwargs)}: {error}"
            ) from None
        if pretrained is not False:
            load_vision_weights(self.model, pretrained)
        self.width = int(self.model.num_features)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.in_chans = int(timm_kwargs.get("in_chans", 3))
        self.data_config = dict(resolve_model_data_config(self.model))
        if "img_size" in timm_kwargs:
            # timm's pretrained_cfg keeps the default size when img_size is overridden.
            size = timm_kwargs["img_size"]
            height, width = (size, size) if isinstance(size, int) else tuple(size)
            self.data_config["input_size"] = (self.in_chans, height, width)
        self._set_frozen(freeze)

    channels_last: bool = False

    @property
    def convolutional(self) -> bool:
        """A CNN (no patch embedding): the kind of backbone ``channels_last`` speeds up on CUDA."""
        return not hasattr(self.model, "patch_embed")

    def use_channels_last(self, enabled: bool = True) -> TimmVisionEncoder:
        """Keep the weights, and convert every image batch, to ``channels_last`` memory format.

        The layout is NHWC in memory, the shape stays ``(B, C, H, W)``: tokens equal those of
        the default layout up to float rounding. cuDNN's tensor-core convolutions want it.

        Args:
            enabled: ``False`` goes back to the default (contiguous) format.

        Returns:
            ``self``.

        Examples:
            >>> encoder = TimmVisionEncoder("resnet18").use_channels_last()
            >>> encoder.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
            True
        """
        self.channels_last = bool(enabled)
        layout = torch.channels_last if enabled else torch.contiguous_format
        self.model.to(memory_format=layout)
        return self

    def _check_images(self, images: Tensor) -> None:
        check_images(images, shape=f"(B, {self.in_chans}, H, W)", channels=self.in_chans)
        weight = next(self.model.parameters(), None)
        if weight is None:
            return
        if images.device != weight.device:
            raise ShapeError(
                f"images: on {images.device}, but the backbone is on {weight.device}; "
                f"move them with images.to({str(weight.device)!r})"
            )
        # Under autocast the backbone casts its inputs itself; otherwise torch would fail
        # deep inside the first convolution with a message about "bias type".
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            raise ShapeError(
                f"images: dtype {images.dtype} does not match the backbone's {weight.dtype}; "
                f"convert them with images.to({weight.dtype})"
            )

    def _channels_last(self, features: Tensor) -> bool:
        channels_first = features.shape[1] == self.width
        channels_last = features.shape[-1] == self.width
        if channels_first and channels_last:
            # Only when a spatial size equals the width; then trust the model's declaration.
            output_fmt = getattr(self.model, "output_fmt", "NCHW")
            return getattr(output_fmt, "value", output_fmt) == "NHWC"
        if channels_first or channels_last:
            return channels_last
        raise ShapeError(
            f"{self.model_name}.forward_features returned shape {tuple(features.shape)}; "
            f"no axis matches the model width {self.width}"
        )

    def forward_features(self, images: Tensor) -> EncoderOutput:
        """Encode images into tokens.

        Args:
            images: Float tensor ``(B, 3, H, W)``, preprocessed as `data_config` says.

        Returns:
            Tokens ``(B, N, width)``: for ViT-like models every token, the
            `num_prefix_tokens` prefix tokens first; for CNNs one token per feature-map
            position in row-major order. The mask is all ``True``.

        Raises:
            ShapeError: ``images`` is not a finite floating-point ``(B, 3, H, W)`` tensor of
                the backbone's dtype and device, the backbone refuses its size, or the
                backbone returns an unexpected shape.

        Examples:
            >>> TimmVisionEncoder("vit_tiny_patch16_224", img_size=64)(
            ...     torch.randn(1, 3, 64, 64)).tokens.shape
            torch.Size([1, 17, 192])
        """
        self._check_images(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            features = self.model.forward_features(images)
        except (AssertionError, ValueError) as error:
            # timm asserts a fixed input size (ViTs), batch norm refuses one value per channel
            # in training mode: both are about the input, so say which input.
            raise ShapeError(
                f"images: {self.model_name} cannot encode a batch of shape "
                f"{tuple(images.shape)}: {error}"
            ) from error
        if features.ndim == 3:
            tokens = features
        elif features.ndim == 4:
            if self._channels_last(features):
                tokens = features.flatten(1, 2)
            else:
                tokens = features.flatten(2).transpose(1, 2)
        else:
            raise ShapeError(
                f"{self.model_name}.forward_features returned shape {tuple(features.shape)}; "
                "expected tokens (B, N, C) or a feature map (B, C, H, W) / (B, H, W, C)"
            )
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return EncoderOutput(tokens=tokens, mask=mask)

    def forward(self, images: Tensor) -> EncoderOutput:
        """Same as `forward_features`.

        Args:
            images: Float tensor ``(B, 3, H, W)``.

        Returns:
            The image tokens and their mask.

        Raises:
            ShapeError: ``images`` has the wrong rank, channel count, dtype or device, or holds
                NaN or infinite values.

        Examples:
            >>> TimmVisionEncoder("resnet18")(torch.randn(1, 3, 64, 64)).tokens.shape
            torch.Size([1, 4, 512])
        """
        return self.forward_features(images)
