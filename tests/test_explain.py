"""``fusionkit explain``: the attention of a word over the image's feature grid, drawn."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import fusionkit
from fusionkit.cli import main
from fusionkit.errors import ConfigError
from fusionkit.models import build_model
from fusionkit.serving import attention_map, explain, feature_grid
from fusionkit.training import build_run_config


def save_tiny_model(directory, tiny_bert_dir, sequence="transformer"):
    """A tiny random CMA-CLIP (resnet18 at 96 px: a 3x3 feature grid) saved to disk."""
    config = build_run_config(
        {
            "vision": {"name": "timm", "model_name": "resnet18", "pretrained": False},
            "text": {"name": "huggingface", "model_name_or_path": str(tiny_bert_dir),
                     "max_length": 16},
            "fusion": {"dim": 32, "sequence": {"name": sequence, "heads": 2, "layers": 2}},
            "head": {"name": "mlp", "hidden_dim": 32},
            "tasks": {"color": {"classes": ["blue", "red"]},
                      "category": {"classes": ["bag", "dress", "shirt"]}},
            "data": {"image_size": 96},
        }
    )
    torch.manual_seed(0)
    return build_model(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_bert_dir):
    return save_tiny_model(tmp_path_factory.mktemp("explain") / "ckpt", tiny_bert_dir)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("image") / "shirt.png"
    image = Image.new("RGB", (120, 120), "white")
    image.paste((200, 20, 20), (30, 30, 90, 90))
    image.save(path)
    return path


def test_feature_grid_matches_the_input_aspect():
    assert feature_grid(49, 224, 224) == (7, 7)
    assert feature_grid(12, 96, 128) == (3, 4)
    assert feature_grid(12, 128, 96) == (4, 3)
    assert sorted(feature_grid(7, 32, 32)) == [1, 7]  # a prime count still factors
    with pytest.raises(ConfigError):
        feature_grid(0, 32, 32)


def test_attention_map_averages_heads_queries_and_layers():
    first = torch.zeros(1, 2, 4, 4)
    first[0, 0, 0, 2], first[0, 1, 0, 2] = 1.0, 0.5  # query 0 on key 2: heads 1.0 and 0.5
    second = torch.zeros(1, 2, 4, 4)
    second[0, :, 0, 3] = 1.0
    assert attention_map([first], [0], range(2, 4)).tolist() == [0.75, 0.0]
    assert attention_map([first, second], [0], range(2, 4), "mean").tolist() == [0.375, 0.5]
    assert attention_map([first, second], [0], range(2, 4), "last").tolist() == [0.0, 1.0]
    with pytest.raises(ConfigError):
        attention_map([first], [0], range(2, 4), "first")


def test_explain_writes_a_png_with_the_grid_shaped_heatmap(checkpoint, image_path, tmp_path):
    out = tmp_path / "fig.png"
    result = explain(checkpoint, image_path, "a red striped shirt", out)
    assert result.grid == (3, 3) and result.heatmap.shape == (3, 3)
    assert result.image.shape == (96, 96, 3)
    assert 0.0 <= result.image.min() <= result.image.max() <= 1.0
    assert result.token in {"a", "red", "striped", "shirt"}
    assert result.token_scores[result.token] == max(result.token_scores.values())
    # Attention rows are probabilities: the map is the token's share of attention on patches.
    assert 0.0 < result.heatmap.sum() <= 1.0 + 1e-5
    assert result.heatmap.sum() == pytest.approx(result.token_scores[result.token], rel=1e-5)
    assert set(result.predictions) == {"color", "category"}
    assert sum(result.modality_weights["color"].values()) == pytest.approx(1.0, abs=1e-5)
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.width > 300


def test_explain_a_chosen_word_and_refuse_an_absent_one(checkpoint, image_path):
    result = explain(checkpoint, image_path, "a red striped shirt", token="Shirt", layers="mean")
    assert result.token == "shirt" and result.path is None
    with pytest.raises(ConfigError, match="not a word of the text"):
        explain(checkpoint, image_path, "a red striped shirt", token="dress")


def test_cli_explain(checkpoint, image_path, tmp_path, capsys):
    out = tmp_path / "cli.png"
    code = main(["-q", "explain", "--checkpoint", str(checkpoint), "--image", str(image_path),
                 "--text", "blue bag", "--out", str(out), "--token", "bag"])
    assert code == 0 and out.is_file()
    assert "bag" in capsys.readouterr().out


@pytest.mark.parametrize("sequence", fusionkit.list_components("sequence_fusion"))
def test_explain_works_or_says_why_for_every_sequence_fusion(
    sequence, tiny_bert_dir, image_path, tmp_path
):
    checkpoint = save_tiny_model(tmp_path / "ckpt", tiny_bert_dir, sequence)
    try:
        result = explain(checkpoint, image_path, "a red striped shirt")
    except ConfigError as error:
        assert sequence in str(error) and "attention" in str(error)
        code = main(["-q", "explain", "--checkpoint", str(checkpoint), "--image",
                     str(image_path), "--text", "a red shirt", "--out", str(tmp_path / "x.png")])
        assert code == 2
        return
    assert result.heatmap.shape == result.grid


class _Pieces:
    """A tokenizer stand-in: id → piece, ids 0 and 9 special."""

    all_special_ids = (0, 9)

    def __init__(self, pieces):
        self.pieces = pieces

    def convert_ids_to_tokens(self, token_id):
        return self.pieces[token_id]


@pytest.mark.parametrize(
    "pieces",
    [
        ["[CLS]", "red", "stri", "##ped", "shirt", "[SEP]"],  # WordPiece (BERT)
        ["<sot>", "red</w>", "stri", "ped</w>", "shirt</w>", "<eot>"],  # end-marked BPE (CLIP)
        ["<s>", "▁red", "▁stri", "ped", "▁shirt", "</s>"],  # SentencePiece (SigLIP, T5)
    ],
    ids=["wordpiece", "clip-bpe", "sentencepiece"],
)
def test_words_merge_the_pieces_of_every_subword_scheme(pieces):
    from fusionkit.serving.explain import _words

    ids = [0, 1, 2, 3, 4, 9]
    tokenizer = _Pieces(dict(zip(ids, pieces, strict=True)))
    words = _words(tokenizer, ids, [True] * 5 + [False])
    assert words == [("red", [1]), ("striped", [2, 3]), ("shirt", [4])]
