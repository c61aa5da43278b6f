"""The product titles of the synthetic catalogue: attribute synonyms set among brand, filler and
distractor words, and the spoiled titles of the ``text_noise`` knob."""

from __future__ import annotations

import random
from collections.abc import Sequence

from fusionkit.data.synthetic_vocabulary import (
    CATEGORY_WORDS,
    COLOR_RGB,
    COLOR_WORDS,
    PATTERN_WORDS,
    Product,
)

__all__ = ["contradicting", "informative_title", "uninformative_title"]

# Filler vocabulary. None of these phrases may contain a colour, pattern or category word:
# uninformative titles are built from them alone.
_BRANDS = (
    "Nordvik", "Alba & Co", "Urbanline", "Mira Studio", "Kestrel", "Tidewear", "Lumo",
    "Harbor Lane", "Solenne", "Basics Co", "Fjord", "Maison Verre", "Oakridge", "Kinfolk Supply",
)
_ADJECTIVES = (
    "premium", "new", "classic", "vintage", "casual", "essential", "lightweight", "everyday",
    "oversized", "slim", "relaxed", "organic", "soft", "retro", "modern", "elegant", "cozy",
    "breathable", "limited edition", "handmade", "recycled", "luxury",
)
_AUDIENCES = ("for women", "for men", "women's", "men's", "unisex", "kids", "for girls", "for boys")
_SIZES = ("size S", "size M", "size L", "size XL", "one size")
_SUFFIXES = (
    "summer sale", "free shipping", "2-pack", "new season", "gift idea", "cotton blend",
    "100% cotton", "machine washable", "new arrival", "bestseller", "limited stock", "in stock",
    "fast delivery", "20% off", "clearance", "eco friendly", "made in Portugal", "regular fit",
)
_GENERIC_NOUNS = (
    "item", "piece", "product", "must-have", "wardrobe staple", "gift", "look", "favourite",
    "essential piece", "style",
)

_MAX_TITLE_WORDS = 20
# Layouts add up to two separator tokens ("-", "by") to the counted phrases.
_FILLER_BUDGET = _MAX_TITLE_WORDS - 2


def _word_count(parts: Sequence[str]) -> int:
    return sum(len(part.split()) for part in parts)


def _fill_title(
    core: list[str], rng: random.Random, target: int, *, with_brand: bool
) -> tuple[str | None, list[str], list[str], str | None]:
    """Choose filler phrases around ``core`` until the title reaches ``target`` words.

    Returns:
        The brand (or None), the leading adjectives, the trailing suffixes and the audience.
    """
    brand = rng.choice(_BRANDS) if with_brand and rng.random() < 0.75 else None
    adjectives: list[str] = []
    suffixes: list[str] = []
    audience: str | None = None
    sized = False
    for _ in range(12):
        count = _word_count([*core, *adjectives, *suffixes] + [p for p in (brand, audience) if p])
        if count >= target:
            break
        slot = rng.random()
        if slot < 0.4:
            phrase, bucket = rng.choice(_ADJECTIVES), adjectives
        elif slot < 0.75:
            phrase, bucket = rng.choice(_SUFFIXES), suffixes
        elif slot < 0.88:
            if sized:
                continue
            phrase, bucket, sized = rng.choice(_SIZES), suffixes, True
        else:
            if audience is None and count + 2 <= _FILLER_BUDGET:
                audience = rng.choice(_AUDIENCES)
            continue
        if phrase not in bucket and count + len(phrase.split()) <= _FILLER_BUDGET:
            bucket.append(phrase)
    return brand, adjectives, suffixes, audience


def _style(title: str, rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.45:
        return " ".join(word[:1].upper() + word[1:] for word in title.split(" "))
    if draw < 0.55:
        return title.lower()
    return title


def _target_length(rng: random.Random, low: int, mode: int) -> int:
    return min(_FILLER_BUDGET, max(low, round(rng.triangular(low, _FILLER_BUDGET, mode))))


def informative_title(product: Product, rng: random.Random) -> str:
    """A title that names the product's colour, pattern(s) and category with synonyms."""
    color = rng.choice(COLOR_WORDS[product.color])
    category = rng.choice(CATEGORY_WORDS[product.category])
    words = [rng.choice(PATTERN_WORDS[p]) for p in product.patterns]
    if len(words) == 2:
        pattern = rng.choice(("{} and {}", "{} & {}", "{} {}", "{}/{}")).format(*words)
    elif product.patterns == ("plain",) and rng.random() < 0.25:
        # Sellers often leave "plain" out; the absence of any pattern word still says it.
        pattern = ""
    else:
        pattern = words[0]
    core = [part for part in (color, pattern, category) if part]
    brand, adjectives, suffixes, audience = _fill_title(
        core, rng, _target_length(rng, 3, 8), with_brand=True
    )
    layout = rng.random()
    if layout < 0.5:
        parts = [brand, *adjectives, color, pattern, category, audience, *suffixes]
        title = " ".join(part for part in parts if part)
    elif layout < 0.8:
        head = " ".join(part for part in (brand, *adjectives, category, audience) if part)
        attributes = ", ".join(part for part in (color, pattern) if part)
        title = f"{head} - {attributes}"
        if suffixes:
            title += " - " + ", ".join(suffixes)
    else:
        head = " ".join(part for part in (*adjectives, pattern, color, category) if part)
        tail = " ".join(part for part in (audience, *suffixes) if part)
        title = " ".join(part for part in (head, f"by {brand}" if brand else "", tail) if part)
    return _style(title, rng)


def uninformative_title(rng: random.Random) -> str:
    """A title with no colour, pattern or category word at all."""
    core = [rng.choice(_GENERIC_NOUNS)]
    brand, adjectives, suffixes, audience = _fill_title(
        core, rng, _target_length(rng, 3, 6), with_brand=True
    )
    parts = [brand, *adjectives, *core, audience, *suffixes]
    return _style(" ".join(part for part in parts if part), rng)


def contradicting(product: Product, rng: random.Random) -> Product:
    """The product with a wrong colour, a wrong category, or both."""
    draw = rng.random()
    color, category = product.color, product.category
    if draw < 0.7:
        color = rng.choice([c for c in COLOR_RGB if c != product.color])
    if draw >= 0.4:
        category = rng.choice([c for c in CATEGORY_WORDS if c != product.category])
    return Product(color, product.patterns, category)

