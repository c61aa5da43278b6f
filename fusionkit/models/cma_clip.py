"""CMA-CLIP: encoders, sequence-wise attention, per-task modality-wise attention and heads."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusionkit import registry
from fusionkit.config import ModelConfig, RunConfig
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
from fusionkit.models.inputs import SHORTHAND_ATTRIBUTES, build_encoders, encode_inputs, owner_of
from fusionkit.models.output import CMACLIPOutput, TokenPool
from fusionkit.models.unimodal import LateFusionBlend, UnimodalHeads

__all__ = [
    "CMACLIP",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "CMACLIPOutput",
    "build_model",
]

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"


@registry.register("model", "cma_clip")
class CMACLIP(nn.Module):
    """CMA-CLIP (Liu et al., 2021) from any vision and any text encoders, over named inputs.

    ``forward_features`` runs the encoders (tokens and masks per input); ``forward_head``
    runs the fusion and the heads. The inputs are the config's ``inputs`` (for example a
    title, a description and two photos), or ``text`` and ``image`` for the ``vision:`` /
    ``text:`` shorthand; the fusions and the modality weights are keyed by input name. Any
    input may be absent for the whole batch (not passed) or per sample (``None`` in a list of
    texts, ``present`` flags), and is then masked out of both attentions.

    Args:
        config: The validated model configuration.
        vision: A built vision encoder for the shorthand's ``image`` input (or ``None``); built
            from ``config`` when omitted.
        text: A built text encoder for the shorthand's ``text`` input (or ``None``); built
            from ``config`` when omitted.

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
        self.vision: nn.Module | None = None
        self.text: nn.Module | None = None
        self.input_encoders: nn.ModuleDict | None = None
        if config.shorthand:
            # The shorthand keeps its encoders at ``vision`` and ``text``, the state-dict
            # layout of every checkpoint saved with it.
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
        else:
            if vision is not None or text is not None:
                raise ConfigError("vision= and text= build the shorthand's encoders only")
            self.input_encoders = nn.ModuleDict(build_encoders(config))
        widths = {m: self.encoder_of(m).width for m in self.modalities}
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
                    m: TokenPool(
                        widths[m], dim, getattr(self.encoder_of(m), "num_prefix_tokens", 0) > 0
                    )
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

    def encoder_of(self, name: str) -> nn.Module:
        """The encoder that reads input ``name`` (its own, or the one it shares).

        Raises:
            KeyError: The model has no input ``name``.
        """
        owner = owner_of(self.config, name)
        if self.input_encoders is not None:
            return self.input_encoders[owner]
        encoder = getattr(self, SHORTHAND_ATTRIBUTES[owner])
        assert encoder is not None
        return encoder

    def encoders(self) -> dict[str, nn.Module]:
        """Input name → its encoder, for every input (shared encoders appear once per input).

        Returns:
            The encoders, in the order of `modalities`.
        """
        return {name: self.encoder_of(name) for name in self.modalities}

    def inputs_of_kind(self, kind: str) -> list[str]:
        """The names of the model's ``"image"`` or ``"text"`` inputs, in order."""
        return [n for n, spec in self.config.inputs.items() if spec.kind == kind]

    def frozen_modalities(self) -> list[str]:
        """The inputs whose encoder is frozen (``freeze: true``), which a cache can serve.

        Returns:
            Input names, in the order of `modalities`.
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

    def _only_input(self, kind: str, argument: str) -> str:
        """The one input of ``kind`` that ``images=`` / ``texts=`` address."""
        names = self.inputs_of_kind(kind)
        if not names:
            encoder = "vision" if kind == "image" else "text"
            raise ShapeError(f"{argument} were given but this model has no {encoder} encoder")
        if len(names) > 1:
            raise ShapeError(
                f"{argument}: this model has {len(names)} {kind} inputs {names}; give "
                "inputs={name: value, ...}"
            )
        return names[0]

    def forward_features(
        self,
        images: Tensor | None = None,
        texts: Sequence[str | None] | None = None,
        text_inputs: Mapping[str, Tensor] | None = None,
        present: Mapping[str, Tensor] | None = None,
        *,
        inputs: Mapping[str, Any] | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Encode the given inputs into tokens and masks.

        Args:
            images: ``(B, 3, H, W)`` float, preprocessed for the vision backbone: the value of
                the model's one image input.
            texts: ``B`` strings (``None`` marks a sample without text): the value of the
                model's one text input.
            text_inputs: Pre-tokenised text (the text encoder's ``tokenize`` output), instead
                of ``texts``.
            present: Input name → ``(B,)`` bool, False where a sample lacks that input
                (e.g. a placeholder image).
            inputs: Input name → images, a list of texts or pre-tokenised text, for a model
                with several inputs of a kind (``images`` / ``texts`` fill in the rest).

        Returns:
            ``(tokens, masks)``: input name → ``(B, N, C)`` and ``(B, N)`` bool.

        Raises:
            ShapeError: No input, an input the model lacks, ``images`` / ``texts`` for a model
                with no or several inputs of that kind, images that are not a finite float
                ``(B, C, H, W)`` tensor, or mismatched batch sizes.
        """
        given: dict[str, Any] = dict(inputs or {})
        labels: dict[str, str] = {}
        if images is not None:
            name = self._only_input("image", "images")
            given[name], labels[name] = images, "images"
        if texts is not None or text_inputs is not None:
            name = self._only_input("text", "texts")
            given[name] = text_inputs if text_inputs is not None else texts
        if not given:
            raise ShapeError("give images, texts or text_inputs: there is nothing to classify")
        tokens, masks = encode_inputs(
            self.config, self.encoder_of, self._run_encoder, given, labels
        )
        sizes = {m: t.shape[0] for m, t in tokens.items()}
        if len(set(sizes.values())) > 1:
            raise ShapeError(f"the inputs disagree on the batch size: {sizes}")
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
        inputs: Mapping[str, Any] | None = None,
        return_attention: bool = False,
    ) -> CMACLIPOutput:
        """Classify samples; see `forward_features` for the arguments.

        Returns:
            A `CMACLIPOutput`.

        Examples:
            >>> out = model(inputs={"title": ["red shirt"], "front": images})  # doctest: +SKIP
        """
        tokens, masks = self.forward_features(images, texts, text_inputs, present, inputs=inputs)
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
        if self.input_encoders is None:
            return [
                f"{name}."
                for name in ("vision", "text")
                if getattr(getattr(self, name), "frozen", False)
            ]
        return [
            f"input_encoders.{owner}."
            for owner, encoder in self.input_encoders.items()
            if getattr(encoder, "frozen", False)
        ]

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        include_frozen: bool = True,
        state_dict: Mapping[str, Tensor] | None = None,
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
            state_dict: The weights to write instead of ``self.state_dict()``: a sharded
                model's full weights, gathered on one rank.

        Returns:
            The folder.
        """
        directory = Path(directory)
        excluded = [] if include_frozen else self.frozen_prefixes()
        full = self.state_dict() if state_dict is None else state_dict
        state = {k: v for k, v in full.items() if not any(k.startswith(p) for p in excluded)}
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
        # The file holds the weights of every encoder it does not exclude: skip loading them
        # from their pretrained source (offline package, checkpoint file) first.
        for section in ("vision", "text"):
            spec = raw.get(section)
            if isinstance(spec, dict) and "pretrained" in spec and f"{section}." not in excluded:
                raw[section] = {**spec, "pretrained": False}
        for name, spec in (raw.get("inputs") or {}).items():
            encoder = spec.get("encoder") if isinstance(spec, dict) else None
            if (
                isinstance(encoder, dict)
                and "pretrained" in encoder
                and f"input_encoders.{name}." not in excluded
            ):
                spec["encoder"] = {**encoder, "pretrained": False}
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
