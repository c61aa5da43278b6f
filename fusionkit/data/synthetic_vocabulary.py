"""The classes of the synthetic catalogue: colours with their RGB, patterns and categories, the
words clean titles use for each, and the ground truth of one sample."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CATEGORY_WORDS", "COLOR_RGB", "COLOR_WORDS", "PATTERN_WORDS", "RGB", "Product"]

RGB = tuple[int, int, int]

COLOR_RGB: dict[str, RGB] = {
    "black": (25, 25, 28),
    "blue": (30, 70, 190),
    "green": (40, 150, 60),
    "orange": (240, 130, 20),
    "pink": (240, 130, 180),
    "purple": (120, 50, 160),
    "red": (200, 30, 35),
    "yellow": (240, 210, 30),
}

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "black": ("black", "jet black", "ebony", "onyx", "charcoal black"),
    "blue": ("blue", "navy", "cobalt", "royal blue", "azure", "sky blue"),
    "green": ("green", "emerald", "olive", "forest green", "sage", "kelly green"),
    "orange": ("orange", "tangerine", "burnt orange", "pumpkin", "apricot"),
    "pink": ("pink", "blush", "fuchsia", "hot pink", "magenta", "rose pink"),
    "purple": ("purple", "violet", "plum", "lilac", "lavender", "aubergine"),
    "red": ("red", "crimson", "scarlet", "cherry red", "ruby", "brick red"),
    "yellow": ("yellow", "mustard", "lemon", "golden", "sunflower yellow"),
}

PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "checked": ("checked", "check", "plaid", "gingham", "tartan", "windowpane check"),
    "dotted": ("dotted", "polka dot", "spotted", "dot print", "pin dot"),
    "floral": ("floral", "flower print", "botanical", "blossom print", "ditsy floral"),
    "plain": ("plain", "solid", "solid colour", "block colour", "plain-dyed"),
    "striped": ("striped", "stripe", "pinstripe", "breton stripe", "banded"),
}

CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "bag": ("bag", "handbag", "tote", "purse", "shoulder bag", "tote bag"),
    "dress": ("dress", "midi dress", "sundress", "maxi dress", "frock", "wrap dress"),
    "hat": ("hat", "cap", "beanie", "fedora", "bucket hat", "sun hat"),
    "scarf": ("scarf", "shawl", "stole", "muffler", "neck scarf", "pashmina"),
    "shoe": ("shoe", "sneakers", "trainers", "loafers", "ankle boots", "running shoe"),
    "trousers": ("trousers", "pants", "chinos", "slacks", "joggers", "wide-leg trousers"),
    "tshirt": ("t-shirt", "tee", "crew neck tee", "cotton tee", "short sleeve top"),
}


@dataclass(frozen=True)
class Product:
    """The ground truth of one sample."""

    color: str
    patterns: tuple[str, ...]
    category: str

