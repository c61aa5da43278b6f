"""CMA-CLIP: encoders, sequence-wise attention, per-task modality-wise attention and heads."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit import registry
from fusionkit.config import ModelConfig, RunConfig
from fusionkit.encoders.base import check_images
from fusionkit.errors import CheckpointError, ConfigError, ShapeError
from fusionkit.fusion.inputs import check_records_attention
from fusionkit.heads import MultiTaskHead, hide_labels
from fusionkit.io import (
    load_weights,
    read_yaml,
    save_weights,
    verify_checksums,
    write_checksums,
    write_yaml,
)
from fusionkit.models.unimodal import LateFusionBlend, UnimodalHeads, masked_mean

__all__ = [
    "CMACLIP",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CMACLIPOutput",
    "build_model",
]

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class CMACLIPOutput:
    """What `CMACLIP` returns.

    Attributes:
        logits: Task → ``(B, num_classes)``: the model's final scores. Without unimodal heads
            these are the fused head's logits; with them, the late-fusion blend of the fused
            and unimodal heads (log-probabilities for single-label tasks, see
            `fusionkit.models.unimodal.LateFusionBlend`).
        modality_weights: Task → ``(B, M)``, columns in ``model.modalities`` order; each row
            sums to 1 over the sample's present modalities, an absent one gets exactly 0.
        embeddings: Task → fused embedding ``(B, dim)`` fed to that task's head.
        summaries: Modality → summary embedding ``(B, dim)`` after the sequence fusion.
        present: Modality → ``(B,)`` bool.
        attentions: Per fusion layer ``(B, heads, L, L)`` when asked for (explanations).
        spans: Modality → ``(start, end)`` in the fused sequence, with ``attentions``.
    """

    logits: dict[str, Tensor]
    modality_weights: dict[str, Tensor]
    embeddings: dict[str, Tensor]
    summaries: dict[str, Tensor]
    present: dict[str, Tensor]
    attentions: list[Tensor] | None = None
    spans: dict[str, tuple[int, int]] | None = field(default=None)
    fused_logits: dict[str, Tensor] | None = None
    unimodal_logits: dict[str, dict[str, Tensor]] | None = None

    def source_logits(self) -> dict[str, dict[str, Tensor]]:
        """Source (``fused`` and each modality with a head of its own) → task → logits.

        Empty for a model without unimodal heads: its ``logits`` are the fused head's.
        """
        if self.fused_logits is None or self.unimodal_logits is None:
            return {}
        return {"fused": self.fused_logits, **self.unimodal_logits}


class _Pool(nn.Module):
    """Summary of an encoder's tokens without sequence fusion: first (prefix) token or mean."""

    def __init__(self, width: int, dim: int, first_token: bool) -> None:
        super().__init__()
        self.first_token = first_token
        self.proj = nn.Sequential(nn.Linear(width, dim), nn.LayerNorm(dim))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        pooled = tokens[:, 0] if self.first_token else masked_mean(tokens, mask)
        return self.proj(pooled)


@registry.register("model", "cma_clip")
class CMACLIP(nn.Module):
    """CMA-CLIP (Liu et al., 2021) from any vision and any text encoder.

    ``forward_features`` runs the encoders (tokens and masks per modality);
    ``forward_head`` runs the fusion and the heads. Either modality may be absent for the
    whole batch (not passed) or per sample (``None`` in ``texts``, ``present`` flags), and is
    then masked out of both attentions.

    Args:
        config: The validated model configuration.
        vision: A built vision encoder (or ``None``); built from ``config`` when omitted.
        text: A built text encoder (or ``None``); built from ``config`` when omitted.

    Raises:
        ConfigError: The configuration is invalid.

    Examples:
        >>> model = build_model({"vision": {"name": "timm", "model_name": "resnet18"},
        ...                      "text": None, "tasks": {"color": {"num_classes": 3}}})
        >>> out = model(images=torch.randn(2, 3, 64, 64))
        >>> out.logits["color"].shape, out.modality_weights["color"].shape
        (torch.Size([2, 3]), torch.Size([2, 1]))
    """

    def __init__(
        self,
        config: ModelConfig,
        vision: nn.Module | None = None,
        text: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.modalities = config.modalities
        self.vision = (
            vision
            if vision is not None or config.vision is None
            else registry.create("vision_encoder", config.vision.name, **config.vision.options)
        )
        self.text = (
            text
            if text is not None or config.text is None
            else registry.create("text_encoder", config.text.name, **config.text.options)
        )
        widths = {m: self._encoder(m).width for m in self.modalities}
        dim = config.fusion.dim
        self.dim = dim
        self.sequence_fusion: nn.Module | None = None
        self.pool: nn.ModuleDict | None = None
        if config.fusion.sequence is not None:
            self.sequence_fusion = registry.create(
                "sequence_fusion",
                config.fusion.sequence.name,
                input_dims=widths,
                dim=dim,
                **config.fusion.sequence.options,
            )
        else:
            self.pool = nn.ModuleDict(
                {
                    m: _Pool(widths[m], dim, getattr(self._encoder(m), "num_prefix_tokens", 0) > 0)
                    for m in self.modalities
                }
            )
        modality = config.fusion.modality
        self.modality_fusion = nn.ModuleDict(
            {
                task: registry.create(
                    "modality_fusion",
                    modality.name,
                    dim=dim,
                    modalities=self.modalities,
                    **modality.options,
                )
                for task in config.tasks
            }
        )
        self.head: MultiTaskHead = registry.create(
            "head", config.head.name, dim=dim, tasks=config.tasks, **config.head.options
        )
        self.unimodal: UnimodalHeads | None = None
        self.blend: LateFusionBlend | None = None
        if config.unimodal_loss_weight is not None:
            self.unimodal = UnimodalHeads(
                widths, dim, config.tasks, config.head.name, config.head.options
            )
            self.blend = LateFusionBlend(config.tasks, self.modalities)

    def _encoder(self, modality: str) -> nn.Module:
        encoder = self.vision if modality == "image" else self.text
        assert encoder is not None
        return encoder

    def encoders(self) -> dict[str, nn.Module]:
        """Modality → its encoder, for every modality the model uses.

        Returns:
            The encoders, in the order of `modalities`.
        """
        return {modality: self._encoder(modality) for modality in self.modalities}

    def frozen_modalities(self) -> list[str]:
        """The modalities whose encoder is frozen (``freeze: true``), which a cache can serve.

        Returns:
            Modality names, in the order of `modalities`.
        """
        return [m for m, encoder in self.encoders().items() if getattr(encoder, "frozen", False)]

    @property
    def tasks(self) -> dict[str, Any]:
        """Task name → `fusionkit.tasks.TaskSpec`."""
        return self.config.tasks

    def _run_encoder(self, encoder: nn.Module, *args: Any, **kwargs: Any) -> Any:
        frozen = bool(getattr(encoder, "frozen", False))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return encoder(*args, **kwargs)

    def forward_features(
        self,
        images: Tensor | None = None,
        texts: Sequence[str | None] | None = None,
        text_inputs: Mapping[str, Tensor] | None = None,
        present: Mapping[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Encode the given modalities into tokens and masks.

        Args:
            images: ``(B, 3, H, W)`` float, preprocessed for the vision backbone.
            texts: ``B`` strings; ``None`` marks a sample without text.
            text_inputs: Pre-tokenised text (the text encoder's ``tokenize`` output).
            present: Modality → ``(B,)`` bool, False where a sample lacks that modality
                (e.g. a placeholder image).

        Returns:
            ``(tokens, masks)``: modality → ``(B, N, C)`` and ``(B, N)`` bool.

        Raises:
            ShapeError: No input, an input for a modality the model lacks, images that are
                not a finite float ``(B, C, H, W)`` tensor, or mismatched batch sizes.
        """
        tokens: dict[str, Tensor] = {}
        masks: dict[str, Tensor] = {}
        if images is not None:
            if self.vision is None:
                raise ShapeError("images were given but this model has no vision encoder")
            # Here as well as in the timm adapter: a plugin encoder may not check.
            check_images(images)
            out = self._run_encoder(self.vision, images)
            tokens["image"], masks["image"] = out.tokens, out.mask
        if texts is not None or text_inputs is not None:
            if self.text is None:
                raise ShapeError("texts were given but this model has no text encoder")
            out = self._run_encoder(self.text, texts=texts, text_inputs=text_inputs)
            tokens["text"], masks["text"] = out.tokens, out.mask
        if not tokens:
            raise ShapeError("give images, texts or text_inputs: there is nothing to classify")
        sizes = {m: t.shape[0] for m, t in tokens.items()}
        if len(set(sizes.values())) > 1:
            raise ShapeError(f"images and texts disagree on the batch size: {sizes}")
        for modality, flags in (present or {}).items():
            if modality not in masks:
                continue
            batch = masks[modality].shape[0]
            if (
                not isinstance(flags, Tensor)
                or flags.dtype != torch.bool
                or flags.dim() != 1
                or flags.shape[0] != batch
            ):
                raise ShapeError(f"present[{modality!r}] must be a (B,) = ({batch},) bool tensor")
            masks[modality] = masks[modality] & flags.to(masks[modality].device)[:, None]
        return tokens, masks

    def forward_head(
        self,
        tokens: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        *,
        return_attention: bool = False,
    ) -> CMACLIPOutput:
        """Fuse encoder tokens and classify every task.

        Args:
            tokens: Modality → ``(B, N, C)`` from `forward_features` (or a cache).
            masks: Modality → ``(B, N)`` bool.
            return_attention: Also return the fusion's attention probabilities.

        Returns:
            A `CMACLIPOutput`.

        Raises:
            ConfigError: ``return_attention=True`` and the model has no sequence fusion, or
                one that cannot record attention.
        """
        attentions = spans = None
        if return_attention:
            if self.sequence_fusion is None:
                raise ConfigError(
                    "return_attention needs sequence-wise attention (fusion.sequence is null)"
                )
            check_records_attention(self.sequence_fusion)
        if self.sequence_fusion is not None:
            kwargs = {"return_attention": True} if return_attention else {}
            fused = self.sequence_fusion(tokens, masks, **kwargs)
            summaries, present = fused.summaries, fused.present
            attentions, spans = fused.attentions, fused.spans
        else:
            assert self.pool is not None
            present = {m: masks[m].any(dim=1) for m in tokens}
            summaries = {
                m: self.pool[m](tokens[m], masks[m]).masked_fill(~present[m][:, None], 0.0)
                for m in tokens
            }
        embeddings, weights = {}, {}
        for task, fusion in self.modality_fusion.items():
            embeddings[task], weights[task] = fusion(summaries, present)
        logits = fused = self.head(embeddings)
        unimodal = None
        if self.unimodal is not None and self.blend is not None:
            unimodal = self.unimodal(tokens, masks)
            logits = self.blend(fused, unimodal, present)
        return CMACLIPOutput(
            logits=logits,
            modality_weights=weights,
            embeddings=embeddings,
            summaries=summaries,
            present=present,
            attentions=attentions,
            spans=spans,
            fused_logits=fused if unimodal is not None else None,
            unimodal_logits=unimodal,
        )

    def forward(
        self,
        images: Tensor | None = None,
        texts: Sequence[str | None] | None = None,
        text_inputs: Mapping[str, Tensor] | None = None,
        present: Mapping[str, Tensor] | None = None,
        *,
        return_attention: bool = False,
    ) -> CMACLIPOutput:
        """Classify image+text samples; see `forward_features` for the arguments.

        Returns:
            A `CMACLIPOutput`.
        """
        tokens, masks = self.forward_features(images, texts, text_inputs, present)
        return self.forward_head(tokens, masks, return_attention=return_attention)

    def loss_terms(
        self, output: CMACLIPOutput, targets: Mapping[str, Tensor]
    ) -> list[tuple[MultiTaskHead, dict[str, Tensor], Mapping[str, Tensor], float]]:
        """The training objective as ``(head, logits, targets, weight)`` terms.

        The fused head has weight 1; with unimodal heads, each modality's head has the
        configured loss weight, and the samples that lack that modality have their labels
        hidden from it.

        Args:
            output: The model's output on a batch.
            targets: Task → the batch's targets.

        Returns:
            The terms; the loss is the sum of ``weight * head.loss(logits, targets)``.
        """
        fused = output.logits if output.fused_logits is None else output.fused_logits
        terms = [(self.head, fused, targets, 1.0)]
        if self.unimodal is not None and output.unimodal_logits is not None:
            weight = float(self.config.unimodal_loss_weight or 0.0)
            for modality, logits in output.unimodal_logits.items():
                kept = hide_labels(targets, output.present[modality])
                terms.append((self.unimodal.heads[modality], logits, kept, weight))
        return terms

    def loss(self, output: CMACLIPOutput, targets: Mapping[str, Tensor]) -> Tensor:
        """The training loss: the multi-task loss (see `fusionkit.heads.MultiTaskHead.loss`)
        of the fused head, plus the weighted losses of the unimodal heads when the model has
        them (see `loss_terms`).
        """
        terms = self.loss_terms(output, targets)
        return torch.stack([w * head.loss(lg, t) for head, lg, t, w in terms]).sum()

    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes of the frozen encoders (their weights come from the config)."""
        return [
            f"{name}."
            for name in ("vision", "text")
            if getattr(getattr(self, name), "frozen", False)
        ]

    def save_pretrained(
        self, directory: str | os.PathLike[str], *, include_frozen: bool = True
    ) -> Path:
        """Write ``config.yaml``, ``model.safetensors`` and ``checksums.json`` into
        ``directory``, each file atomically.

        ``checksums.json`` holds the SHA-256 of the other two; `from_pretrained` checks it, so a
        damaged file is refused instead of loaded as wrong weights.

        Args:
            directory: Target folder (created).
            include_frozen: Also store frozen encoder weights. Without them the checkpoint is
                small, and loading rebuilds those encoders from the config's ``pretrained``
                source, which must then be available.

        Returns:
            The folder.
        """
        directory = Path(directory)
        excluded = [] if include_frozen else self.frozen_prefixes()
        state = {
            k: v for k, v in self.state_dict().items() if not any(k.startswith(p) for p in excluded)
        }
        save_weights(
            directory / WEIGHTS_FILE,
            state,
            metadata={"format": "fusionkit", "excluded_prefixes": json.dumps(excluded)},
        )
        write_yaml(directory / CONFIG_FILE, self.config.to_dict())
        write_checksums(directory, [WEIGHTS_FILE, CONFIG_FILE])
        return directory

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike[str], map_location: str | torch.device = "cpu"
    ) -> CMACLIP:
        """Load a model written by `save_pretrained`.

        Args:
            directory: The folder holding ``config.yaml`` and ``model.safetensors``.
            map_location: Device to load the weights to.

        Returns:
            The model, in eval mode.

        Raises:
            CheckpointError: Missing or corrupt files (a file whose SHA-256 differs from
                ``checksums.json``, a truncated or malformed weights file), or weights that do
                not fit the config.
            ConfigError: ``config.yaml`` is not a valid config.
        """
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"{directory} has no {CONFIG_FILE}; is it a fusionkit checkpoint?"
            )
        from safetensors import SafetensorError, safe_open

        verify_checksums(directory, [WEIGHTS_FILE, CONFIG_FILE])
        state = load_weights(directory / WEIGHTS_FILE, device=map_location)
        try:
            with safe_open(str(directory / WEIGHTS_FILE), "pt") as handle:
                excluded = json.loads((handle.metadata() or {}).get("excluded_prefixes", "[]"))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE}: unreadable metadata ({error})"
            ) from None
        if not isinstance(excluded, list) or not all(isinstance(p, str) for p in excluded):
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE}: metadata excluded_prefixes must be a list of "
                f"strings, got {excluded!r}"
            )
        raw = read_yaml(directory / CONFIG_FILE)
        if "vision." not in excluded and isinstance(raw.get("vision"), dict):
            # The file holds the vision weights: skip loading them from their source first.
            raw["vision"] = {**raw["vision"], "pretrained": False}
        model = cls(ModelConfig.from_dict(raw))
        expected = model.state_dict()
        missing = [
            k for k in expected if k not in state and not any(k.startswith(p) for p in excluded)
        ]
        unexpected = [k for k in state if k not in expected]
        mismatched = [
            f"{k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
            for k in state
            if k in expected and state[k].shape != expected[k].shape
        ]
        if missing or unexpected or mismatched:
            raise CheckpointError(
                f"{directory / WEIGHTS_FILE} does not fit its config: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {mismatched[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model.to(map_location).eval()


def build_model(
    config: ModelConfig | RunConfig | Mapping[str, Any] | str | os.PathLike[str],
) -> nn.Module:
    """Build a model from a config mapping, a YAML path, a `ModelConfig` or a run config.

    Args:
        config: The configuration (see `fusionkit.config.model` for its shape); of a run
            config, the model part.

    Returns:
        The model named by ``config["model"]`` (``CMACLIP`` by default).

    Raises:
        ConfigError: Unknown keys or wrong types, named by their key path.

    Examples:
        >>> model = build_model("configs/quickstart.yaml")
    """
    parsed = ModelConfig.load(config)
    return registry.create("model", parsed.model, config=parsed)
