"""Smoke test of the benchmark suite, so it never rots; and the case selection per device.

``make test`` runs every benchmark family once at tiny shapes (``--quick``) in a subprocess
with pytest-benchmark enabled, then builds the report from the JSON it just wrote. The case
selection for CUDA (xformers cases, bf16 ceiling) is checked here on CPU by faking the
availability checks, since the GPU path cannot run on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The suite lives in the repository (not in the installed package): import it from there.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cases, ratios, report  # noqa: E402

FAMILIES = {"attention", "memory", "layer", "varlen", "ceiling", "model"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run ``pytest benchmarks --quick`` once; returns its pytest-benchmark JSON."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks",
        "-q",
        "-p",
        "no:cacheprovider",
        "--benchmark-enable",
        "--quick",
        # One thread: tiny cases only check the plumbing, and a second OpenMP thread turns
        # every op into a scheduling wait when the machine is busy.
        "--bench-threads=1",
        f"--benchmark-json={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def test_quick_run_covers_every_family(quick_run: Path) -> None:
    data = json.loads(quick_run.read_text())
    infos = [b["extra_info"] for b in data["benchmarks"]]
    families = {info["family"] for info in infos}
    try:
        import fusionkit.models  # noqa: F401
    except ImportError:
        families.add("model")  # skipped until the model lands
    assert families == FAMILIES
    for info in infos:
        assert info["device"] == "cpu"
        assert info["profile"] == "quick"
        assert info["flops"] > 0
        assert info["peak_memory_bytes"] >= 0
        assert "profiler" in info["memory_method"]


def test_report_from_quick_run(quick_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "docs"
    assert report.main([str(quick_run), "--out", str(out)]) == 0
    page = (out / report.REPORT_FILE).read_text()
    assert "GPU: not measured yet" in page
    assert "| shape | dtype | mode | impl |" in page
    assert "| backend |" in page and "| sdpa |" in page
    assert "GFLOP/s" in page and "tokens/s" in page and "peak MiB" in page
    assert "samples/s" in page and "## Key ratios" in page and "## Full model" in page
    for chart in ("attention_cpu.png", "layers_cpu.png", "memory_cpu.png"):
        assert (out / chart).stat().st_size > 1000
        assert f"]({chart})" in page


# Case selection -------------------------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):
    """Pretend CUDA (and, by the returned switch, xformers) is available."""
    state = {"xformers": True}
    monkeypatch.setattr(cases, "cuda_available", lambda: True)
    monkeypatch.setattr(cases, "xformers_importable", lambda: state["xformers"])
    return state


def test_cuda_with_xformers_selects_xformers_and_bf16(fake_cuda) -> None:
    env = cases.detect_environment("cuda")
    assert env.xformers and env.backends == ("xformers", "sdpa", "math")
    assert cases.default_profile(env) == "gpu"
    attention = cases.attention_cases("gpu", env)
    assert {c.backend for c in attention} == {"xformers", "sdpa", "math"}
    assert {c.dtype for c in attention} == {"bfloat16", "float32"}
    assert {c.mask for c in attention} == {"none", "padding"}
    assert {c.mode for c in attention} == {"fwd", "fwd+bwd"}
    ceiling = cases.ceiling_cases("gpu", env)
    assert [(c.dtype, c.n) for c in ceiling] == [("bfloat16", 8192), ("float32", 8192)]
    memory = cases.memory_cases("gpu", env)
    at_target = {
        (c.backend, c.mode) for c in memory if c.shape.q_len == cases.TARGET_MEMORY_SEQ_LEN
    }
    assert ("xformers", "fwd+bwd") in at_target and ("math", "fwd+bwd") in at_target
    # The reduced grids on CUDA run in bf16 only.
    assert {c.dtype for c in cases.layer_cases("cpu", env)} == {"bfloat16"}


def test_cuda_without_xformers_has_no_xformers_cases(fake_cuda) -> None:
    fake_cuda["xformers"] = False
    env = cases.detect_environment("cuda")
    assert not env.xformers
    assert {c.backend for c in cases.attention_cases("gpu", env)} == {"sdpa", "math"}


def test_cpu_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_import() -> bool:
        raise AssertionError("xformers is CUDA-only: its import must not be tried on CPU")

    monkeypatch.setattr(cases, "xformers_importable", must_not_import)
    env = cases.detect_environment("cpu")
    assert cases.default_profile(env) == "cpu"
    attention = cases.attention_cases("cpu", env)
    assert {c.backend for c in attention} == {"sdpa", "math"}
    assert {c.dtype for c in attention} == {"float32"}
    assert [(c.dtype, c.n) for c in cases.ceiling_cases("cpu", env)] == [("float32", 2048)]
    memory = cases.memory_cases("cpu", env)
    assert max(c.shape.q_len for c in memory if c.mode == "fwd") == 4096
    layer_shapes = {c.shape for c in cases.layer_cases("cpu", env)}
    assert cases.TARGET_LAYER_SHAPE in layer_shapes
    assert cases.TARGET_LAYER_SHAPE in {c.shape for c in cases.varlen_cases("cpu", env)}


def test_cuda_asked_for_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cases, "cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        cases.detect_environment("cuda")


# Formulas and targets -----------------------------------------------------------------------


def test_text_lengths_mean_a_quarter_of_the_padding() -> None:
    lengths = cases.text_lengths(32, 77)
    assert lengths == cases.text_lengths(32, 77)
    assert len(lengths) == 32 and min(lengths) >= 1 and max(lengths) <= 77
    assert abs(sum(lengths) / 32 / 77 - cases.TEXT_MEAN_FRACTION) < 0.02
    assert len(set(lengths)) > 10  # a spread, not one length


def test_flop_formulas_by_hand() -> None:
    # q kᵀ and p v: 2 matmuls of B·H·Lq·Lk·D multiply-adds.
    assert cases.attention_flops(2, 3, 5, 7, 4) == 2 * 2 * (2 * 3 * 5 * 7 * 4)
    # n = 3 tokens, dim 2, MLP hidden 8: qkv 2·3·2·6, proj 2·3·2·2, fc1+fc2 2·(2·3·2·8),
    # attention 4·3²·2.
    expected = 72 + 24 + 192 + 72
    assert cases.layer_flops([3], 2, 4.0) == expected
    assert cases.layer_flops([3, 3], 2, 4.0) == 2 * expected
    assert cases.mode_factor("fwd+bwd") == 3 * cases.mode_factor("fwd")


def _row(family: str, impl: str, median: float, **info) -> report.Row:
    base = {
        "family": family,
        "impl": impl,
        "device": "cpu",
        "dtype": "float32",
        "mode": "fwd",
        "case": f"{family}-{impl}",
        "flops": 10**9,
    }
    return report.Row(base | info, median, median, 5)


def test_key_ratios_are_measured_side_by_side() -> None:
    shape = cases.TARGET_LAYER_SHAPE.label
    rows = [
        _row("ceiling", "matmul", 0.01),  # 100 GFLOP/s
        _row("layer", "fusionkit", 0.012, shape=shape),  # 83 GFLOP/s
        _row("layer", "timm", 0.010, shape=shape),
        _row("layer", "torch", 0.015, shape=shape),
        _row("varlen", "fusionkit-packed", 0.005, shape=shape, text_mean=19.3),
        _row("varlen", "torch", 0.010, shape=shape),
        _row("varlen", "timm", 0.011, shape=shape),
        _row("memory", "math", 1.0, q_len=4096, mask="none", peak_memory_bytes=1000),
        _row("memory", "sdpa", 0.5, q_len=4096, mask="none", peak_memory_bytes=50),
    ]
    by_name = {r.name: r for r in ratios.key_ratios(rows)}
    assert by_name["dense: fusionkit / timm Block time"].measured == "1.20"
    assert by_name["dense: fusionkit / nn.TransformerEncoderLayer time"].measured == "0.80"
    assert by_name["dense: fusionkit FLOP rate / ceiling"].measured == "83%"
    assert by_name["varlen: fusionkit-packed / best padded peer (torch) time"].measured == "0.50"
    assert by_name["memory at L=4096: sdpa / math peak"].measured == "0.05"


def _emoji_report(seed: int, group: float) -> dict:
    task = {"accuracy": group, "macro_f1": group - 0.01,
            "recall_at_precision": {"0.9": group - 0.1},
            "modality_weights": {"text": 0.6, "image": 0.4}}
    return {"seed": seed, "train_seconds": 10.0,
            "tasks": {"group": task, "subgroup": {**task, "accuracy": group / 2}}}


def test_emoji_accuracy_summary_is_the_mean_over_seeds(tmp_path, monkeypatch):
    from experiments import accuracy_emoji

    summary = accuracy_emoji.summarise([_emoji_report(s, g) for s, g in
                                        ((0, 0.90), (1, 0.94), (2, 0.92))])
    assert summary["tasks"]["group"]["accuracy"] == pytest.approx(0.92)
    assert summary["group_accuracy_sd"] == pytest.approx(0.02)
    assert summary["tasks"]["subgroup"]["accuracy"] == pytest.approx(0.46)
    assert summary["seeds"] == [0, 1, 2] and summary["train_seconds"] == 30.0
    assert accuracy_emoji.summarise([_emoji_report(0, 0.9)])["group_accuracy_sd"] == 0.0

    monkeypatch.setattr(accuracy_emoji, "OUT", tmp_path / "emoji.md")
    monkeypatch.setattr(accuracy_emoji, "CHART", tmp_path / "emoji.png")
    models = {"cma_clip": 0.96, "image_only": 0.7, "text_only": 0.93, "concat": 0.94}
    results = {"flag": {name: accuracy_emoji.summarise([_emoji_report(0, value)])
                        for name, value in models.items()}}
    accuracy_emoji.write_report(results, {"train": 10, "val": 3, "test": 3})
    text = (tmp_path / "emoji.md").read_text()
    assert "| cma_clip | 1 | 0.960 ± 0.000 | 0.960 |" in text
    assert "the full model beats both; the target of 0.95 is reached" in text
    results["flag"]["concat"] = accuracy_emoji.summarise(
        [_emoji_report(0, 0.95), _emoji_report(1, 0.97)])
    accuracy_emoji.write_report(results, {"train": 10, "val": 3, "test": 3})
    text = (tmp_path / "emoji.md").read_text()
    assert "the full model beats text_only and ties concat; the target of 0.95 is reached" in text
    assert "Against sequence_concat" not in text
    results["flag"]["sequence_concat"] = accuracy_emoji.summarise([_emoji_report(0, 0.97)])
    accuracy_emoji.write_report(results, {"train": 10, "val": 3, "test": 3})
    text = (tmp_path / "emoji.md").read_text()
    assert ("Against sequence_concat (0.970: the same model with concatenation in place of the "
            "modality-wise attention) the full model falls below it.") in text
    assert (tmp_path / "emoji.png").stat().st_size > 0


def test_emoji_paired_comparison_counts_discordant_predictions(tmp_path, monkeypatch):
    from experiments import accuracy_emoji

    assert accuracy_emoji.sign_test(0, 0) == 1.0
    assert accuracy_emoji.sign_test(3, 3) == 1.0
    assert accuracy_emoji.sign_test(5, 0) == pytest.approx(0.0625)
    assert accuracy_emoji.sign_test(2, 10) == pytest.approx(0.0386, abs=1e-4)

    monkeypatch.setattr(accuracy_emoji, "ROOT", tmp_path)
    test = tmp_path / "test.csv"
    test.write_text("id,text,group\na,x,red\nb,y,blue\nc,z,red\nd,w,blue\n")
    # Per seed, what each model predicts for a, b, c, d (truth: red, blue, red, blue).
    predicted = {
        ("cma_clip", 0): ["red", "blue", "red", "red"],
        ("concat", 0): ["red", "red", "blue", "red"],
        ("cma_clip", 1): ["blue", "blue", "red", "blue"],
        ("concat", 1): ["red", "blue", "red", "blue"],
    }
    for (name, seed), labels in predicted.items():
        run = accuracy_emoji.run_dir("flag", name, seed)
        run.mkdir(parents=True)
        (run / "test_predictions.json").write_text(
            json.dumps([{"group": {"label": label}} for label in labels])
        )
    result = accuracy_emoji.paired_comparison("flag", "cma_clip", "concat", [0, 1], test)
    assert result == {"seeds": [0, 1], "wins": 2, "losses": 1, "p": 1.0}
    only = accuracy_emoji.paired_comparison("flag", "cma_clip", "concat", [0], test)
    assert (only["wins"], only["losses"]) == (2, 0)

    monkeypatch.setattr(accuracy_emoji, "OUT", tmp_path / "emoji.md")
    monkeypatch.setattr(accuracy_emoji, "CHART", tmp_path / "emoji.png")
    results = {"flag": {name: accuracy_emoji.summarise([_emoji_report(0, value)])
                        for name, value in (("cma_clip", 0.96), ("concat", 0.94))}}
    accuracy_emoji.write_report(results, {"train": 10, "val": 3, "test": 3},
                                comparisons={"flag": {"concat": result}})
    text = (tmp_path / "emoji.md").read_text()
    assert ("against concat (2 seeds) it is right where concat is wrong on 2 test predictions "
            "and wrong where concat is right on 1 (p = 1.00)") in text
