"""The registry: registration, lookup, wildcards, errors and entry-point plugins."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
from torch import nn

import fusionkit
from fusionkit.errors import FusionkitError, RegistryError


def test_builtin_components_are_listed():
    listing = fusionkit.list_components()
    assert set(listing) == {
        "vision_encoder",
        "text_encoder",
        "sequence_fusion",
        "modality_fusion",
        "head",
        "model",
    }
    assert listing["sequence_fusion"] == sorted(listing["sequence_fusion"])
    assert {"transformer", "co_attention"} <= set(listing["sequence_fusion"])
    assert {"keyless", "gated", "concat", "mean"} <= set(listing["modality_fusion"])
    assert "mlp" in listing["head"]


def test_wildcards():
    assert fusionkit.list_components("modality_fusion", "c*") == ["concat"]
    assert fusionkit.list_components("sequence_fusion", "*att*") == ["co_attention"]
    assert fusionkit.list_components("head", "nothing-*") == []


def test_register_decorator_default_name_and_create(isolated_registry):
    @fusionkit.register("modality_fusion")
    class FirstModalityFusion(nn.Module):
        def __init__(self, dim, modalities):
            super().__init__()
            self.dim = dim

    assert "first_modality_fusion" in fusionkit.list_components("modality_fusion")
    built = fusionkit.create("modality_fusion", "first_modality_fusion", dim=4, modalities=("a",))
    assert isinstance(built, FirstModalityFusion) and built.dim == 4


def test_register_function_factory(isolated_registry):
    def tiny_head(dim, tasks):
        return nn.Linear(dim, 2)

    returned = fusionkit.register("head", "tiny", tiny_head)
    assert returned is tiny_head
    assert isinstance(fusionkit.create("head", "tiny", dim=3, tasks={}), nn.Linear)


def test_taken_name_raises_unless_override(isolated_registry):
    fusionkit.register("head", "dup", lambda **_: "first")
    with pytest.raises(RegistryError, match="already registered"):
        fusionkit.register("head", "dup", lambda **_: "second")
    with pytest.warns(UserWarning, match="replaced"):
        fusionkit.register("head", "dup", lambda **_: "third", override=True)
    assert fusionkit.create("head", "dup") == "third"


def test_unknown_name_lists_closest():
    with pytest.raises(RegistryError) as info:
        fusionkit.create("sequence_fusion", "transfomer")
    assert "transformer" in str(info.value)
    assert isinstance(info.value, KeyError) and isinstance(info.value, FusionkitError)


def test_unknown_kind():
    with pytest.raises(RegistryError, match="modality_fusion"):
        fusionkit.list_components("modality_fusoin")
    with pytest.raises(RegistryError, match="unknown component kind"):
        fusionkit.register("backbone")


def test_register_non_callable(isolated_registry):
    with pytest.raises(RegistryError, match="not callable"):
        fusionkit.register("head", "bad", 42)


def _write_distribution(root, dist, module, entry_points, source):
    (root / module).mkdir()
    (root / module / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fusionkit.plugins]\n" + entry_points + "\n")


def test_entry_point_plugins_load_lazily_and_broken_ones_warn(
    tmp_path, isolated_registry, monkeypatch
):
    _write_distribution(
        tmp_path,
        "fk_test_plugin",
        "fk_test_plugin",
        "maxfusion = fk_test_plugin",
        """
        import torch
        import fusionkit

        @fusionkit.register("modality_fusion", "plugin_max")
        class MaxFusion(torch.nn.Module):
            def __init__(self, dim, modalities):
                super().__init__()
        """,
    )
    _write_distribution(
        tmp_path,
        "fk_broken_plugin",
        "fk_broken_plugin",
        "broken = fk_broken_plugin:setup",
        """
        def setup():
            raise RuntimeError("boom")
        """,
    )
    _write_distribution(
        tmp_path,
        "fk_callable_plugin",
        "fk_callable_plugin",
        "callable = fk_callable_plugin:setup",
        """
        import fusionkit

        def setup():
            fusionkit.register("head", "plugin_head", lambda dim, tasks: "head")
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(isolated_registry, "_plugins_loaded", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = fusionkit.list_components("modality_fusion", "plugin_*")
    assert names == ["plugin_max"]
    assert fusionkit.create("head", "plugin_head", dim=1, tasks={}) == "head"
    messages = [str(w.message) for w in caught]
    assert any("'broken'" in m and "boom" in m for m in messages), messages
    # Loaded once: a second listing does not import again.
    del sys.modules["fk_test_plugin"]
    fusionkit.list_components("modality_fusion")
    assert "fk_test_plugin" not in sys.modules
