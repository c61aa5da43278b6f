"""Classify real photographs with texts using the offline pretrained CMA-CLIP.

Builds EfficientNet-Lite0 (ImageNet) + all-MiniLM-L6-v2 from ``configs/cma_clip_offline.yaml``
(the fusion and heads are untrained, so the logits are those of a fresh model) and prints, per
task, the logits and the modality weights of each sample: what the model looks like before
``fusionkit train``.

Run: ``.venv/bin/python examples/classify_images.py``
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from skimage import data

import fusionkit
from fusionkit.data import build_image_transform
from fusionkit.io import read_yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cma_clip_offline.yaml"
TASKS = {
    "subject": {"classes": ["animal", "food", "person"]},
    "setting": {"classes": ["indoor", "outdoor", "space"], "multi_label": True},
}
SAMPLES = [
    ("chelsea", data.chelsea(), "a tabby cat sitting on a wooden floor"),
    ("coffee", data.coffee(), "a cup of coffee on a saucer"),
    ("astronaut", data.astronaut(), None),
]


def main() -> None:
    torch.manual_seed(0)
    config = read_yaml(CONFIG)
    # The config leaves tasks to the training manifest; name two for this example.
    config["tasks"] = TASKS
    model = fusionkit.build_model(config).eval()
    transform = build_image_transform(model.vision.data_config, train=False)
    images = torch.stack([transform(Image.fromarray(pixels)) for _, pixels, _ in SAMPLES])
    texts = [text for _, _, text in SAMPLES]
    with torch.no_grad():
        out = model(images=images, texts=texts)
    print(f"modalities (weight columns): {model.modalities}")
    for task, logits in out.logits.items():
        print(f"\ntask {task!r}")
        for i, (name, _, text) in enumerate(SAMPLES):
            row = out.modality_weights[task][i].tolist()
            weights = ", ".join(f"{m}={w:.3f}" for m, w in zip(model.modalities, row, strict=True))
            shown = "<no text>" if text is None else repr(text)
            print(f"  {name:10s} text={shown:45s} logits={logits[i].numpy().round(3)}  {weights}")


if __name__ == "__main__":
    main()
