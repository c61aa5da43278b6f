"""The worked plugin of docs/plugins.md installs and plugs into the registry."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fusionkit

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin"


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory) -> Path:
    """``pip install`` the example into a private target folder (never into the venv)."""
    root = tmp_path_factory.mktemp("plugin")
    source, target = root / "src", root / "site"
    # Build from a copy, so that the build leaves nothing behind in examples/plugin.
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
        "--no-index", "--disable-pip-version-check", "--target", str(target), str(source),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (target / "fusionkit_max_fusion" / "__init__.py").is_file()
    return target


@pytest.fixture
def plugin_on_path(installed_plugin, monkeypatch, isolated_registry):
    monkeypatch.syspath_prepend(str(installed_plugin))
    yield isolated_registry
    for name in [m for m in sys.modules if m.startswith("fusionkit_max_fusion")]:
        del sys.modules[name]


def test_entry_point_is_declared(installed_plugin):
    entry_points = next(installed_plugin.glob("fusionkit_max_fusion-*.dist-info"))
    text = (entry_points / "entry_points.txt").read_text()
    assert "[fusionkit.plugins]" in text
    assert "fusionkit_max_fusion:register_components" in text


def test_plugin_loads_and_registers(plugin_on_path):
    assert "max" not in fusionkit.list_components("modality_fusion")
    loaded = plugin_on_path.load_plugins(force=True)
    assert "max_fusion" in loaded
    assert fusionkit.list_components("modality_fusion", "ma*") == ["max"]
    assert plugin_on_path.get("modality_fusion", "max").source == (
        "fusionkit_max_fusion:MaxFusion"
    )


def test_max_fusion_through_create(plugin_on_path):
    plugin_on_path.load_plugins(force=True)
    fusion = fusionkit.create("modality_fusion", "max", dim=3, modalities=("text", "image"))
    text = torch.tensor([[1.0, -5.0, 2.0], [1.0, 1.0, 1.0], [-1.0, -2.0, -3.0]])
    image = torch.tensor([[0.0, 4.0, 2.5], [9.0, 9.0, 9.0], [-4.0, -1.0, -9.0]])
    present = {
        "text": torch.tensor([True, True, False]),
        "image": torch.tensor([True, False, True]),
    }
    fused, weights = fusion({"text": text, "image": image}, present)
    expected = torch.tensor([[1.0, 4.0, 2.5], [1.0, 1.0, 1.0], [-4.0, -1.0, -9.0]])
    torch.testing.assert_close(fused, expected)  # absent modalities are excluded, not zeros
    torch.testing.assert_close(weights, torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]]))


def test_max_fusion_in_a_model_config(plugin_on_path):
    plugin_on_path.load_plugins(force=True)
    model = fusionkit.build_model({
        "vision": {"name": "timm", "model_name": "resnet18"},
        "text": None,
        "fusion": {"dim": 16, "sequence": None, "modality": {"name": "max"}},
        "tasks": {"color": {"num_classes": 3}},
    })  # fmt: skip
    out = model(images=torch.randn(2, 3, 32, 32))
    assert out.logits["color"].shape == (2, 3)
    torch.testing.assert_close(out.modality_weights["color"], torch.ones(2, 1))
    out.logits["color"].sum().backward()
