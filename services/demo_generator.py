"""The demo data itself: customers, a catalog and months of events, generated with a fixed seed.

Pure Python, no gRPC: `services/demo_data.py` turns what `generate` returns into RPCs, and
tests/unit/test_demo_generator.py checks its structure. The same seed and end time give
the same data, down to every id, so loading it twice adds nothing.

The structure is there to be found again by the services:
- five segments of customers, each drawn to its own part of the category tree (home office
  to office/printing, young families to baby and household, ...), with demographics and a
  channel mix of its own;
- consumables are re-bought at item-specific cadences (ink about every 30 days, coffee
  beans about every 14), each customer with a personal rhythm around the item's and a
  little noise, so purchase-cadence traits, recommendations and replenishment have
  something true to discover; connected devices (printers, coffee machines, water
  filters) report their consumable's level weekly and re-order it themselves;
- some customers churn (stop buying well before the end), some join late;
- most customers consent; a few consent narrowly and a few not at all (demo-chloe among
  them), so the profile service's consent enforcement shows in the load summary.
Nothing in the catalog says what an item's cadence is: `CatalogItem.cadence_days` is the
generator's ground truth, kept for the tests and never sent.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

SEED = 4_004  # issue 4's demo data
DEFAULT_CUSTOMERS = 200
DEFAULT_ITEMS = 500
DEFAULT_DAYS = 182  # about six months of events
CURRENCY = "JPY"

SECOND_US = 1_000_000
HOUR_US = 3600 * SECOND_US
DAY_US = 24 * HOUR_US
YEN = 1_000_000  # micros of one yen

# Consent vocabulary (README, Architecture) and what each event type is collected as (the proto's
# EventType comments).
RECOMMENDATIONS = "personalize.recommendations"
PROFILING = "personalize.profiling"
AUTOMATIC_ORDERING = "replenishment.automatic_ordering"
AGE = "user.demographic.age_range"
GENDER = "user.demographic.gender"
LOCATION = "user.location.imprecise"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"
SEARCHES = "user.behavior.search_history"
STORE_VISITS = "user.behavior.store_visits"
TELEMETRY = "user.device.telemetry"
CONTACT = "user.contact"
BEHAVIOUR = (PURCHASES, BROWSING, SEARCHES, STORE_VISITS)
DEMOGRAPHICS = (AGE, GENDER, LOCATION)

EVENT_CATEGORY = {
    "PRODUCT_VIEW": BROWSING,
    "SEARCH": SEARCHES,
    "ADD_TO_CART": BROWSING,
    "REMOVE_FROM_CART": BROWSING,
    "ADD_TO_WISHLIST": BROWSING,
    "PURCHASE": PURCHASES,
    "RATING": PURCHASES,
    "INQUIRY": BROWSING,
    "DOCUMENT_REQUEST": BROWSING,
    "STORE_VISIT": STORE_VISITS,
    "STORE_PURCHASE": PURCHASES,
    "RETURN": PURCHASES,
    "DEVICE_USAGE": TELEMETRY,
}
PURCHASE_TYPES = frozenset({"PURCHASE", "STORE_PURCHASE"})
LOYALTY_ISSUER = "najimi-club"


# -- the catalog ------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A leaf of the category tree and how its items are made up."""

    path: tuple[str, ...]
    cadence_days: float | None  # how long the base pack lasts; None: not a consumable
    price_yen: tuple[int, int]  # range of the base pack's price
    brands: tuple[str, ...]
    products: tuple[str, ...]
    # (label, pack multiplier): a bigger pack lasts longer and costs a little less per unit.
    variants: tuple[tuple[str, float], ...]


# One leaf a line: path | cadence in days ("-": not a consumable) | base price range in yen |
# brands | products | pack variants as label:multiplier ("-": one variant; an empty label is
# the base pack). Each item is a brand's product in one variant.
LEAF_TABLE = """
office/printing/ink | 30 | 2500-4500 | Inkwell, Printek, Colorjet | black ink cartridge, colour ink cartridge, photo black ink cartridge, cyan ink cartridge, magenta ink cartridge, yellow ink cartridge | :1, XL:1.6
office/printing/toner | 75 | 6000-9000 | Printek, Laserline | black toner, colour toner set | :1, high-yield:1.8
office/printing/paper | 21 | 600-1200 | Papyra, Whitesheet | A4 copy paper, A4 premium paper, photo paper A6, A3 copy paper | 500 sheets:1, 2500 sheets:4
office/stationery/notebooks | - | 300-2000 | Papyra, Kuroi | dot-grid notebook, lined notebook, weekly planner, sticky notes | A5:1, B5:1
office/stationery/pens | - | 150-3000 | Inkflow, Zebrano | gel pen, fountain pen, highlighter set, mechanical pencil | black:1, blue:1
office/electronics | - | 1500-15000 | Keyhaus, Clickr | wireless mouse, mechanical keyboard, USB-C hub, monitor stand, webcam, laptop stand | -
office/furniture | - | 8000-60000 | Sitwell, Deskform | ergonomic chair, standing desk, desk lamp, footrest, cable tray | -
kitchen/coffee/beans | 14 | 1200-2200 | Kobe Roast, Hilltop Coffee, Blue Crane | single-origin beans, house blend beans, espresso beans, decaf beans | 500 g:1, 1 kg:2
kitchen/coffee/capsules | 10 | 800-1400 | Kobe Roast, Capsula | lungo capsules, espresso capsules, decaf capsules, oat latte capsules | 10 pack:1, 30 pack:3
kitchen/coffee/equipment | - | 2000-40000 | Pourwell, Kobe Roast | gooseneck kettle, hand grinder, pour-over dripper, coffee scale, espresso machine, milk frother | -
kitchen/coffee/care | 60 | 900-1500 | Kobe Roast, Cleanbrew | descaler, cleaning tablets, paper filters | :1, 3-pack:3
kitchen/tea | 21 | 900-2500 | Uji Garden, Darjeel | sencha, matcha, genmaicha, earl grey, rooibos, hojicha | 100 g:1, 250 g:2.5
kitchen/water/filters | 30 | 1500-3000 | Aqualis, Purestream | water filter cartridge, tap filter cartridge, pitcher filter | :1, 3-pack:3
kitchen/cookware | - | 2000-25000 | Ironleaf, Tsubame Works | frying pan, saucepan, rice cooker, chef's knife, cutting board, steamer basket | -
household/cleaning/detergent | 28 | 500-1200 | Sparkle, Freshfold | laundry detergent, liquid detergent, detergent pods | 1 L:1, 3 L:3
household/cleaning/dishwasher | 21 | 600-1300 | Sparkle, Clearwash | dishwasher tablets, rinse aid, dish soap | :1, 3-pack:3
household/paper | 14 | 400-900 | Softcloud, Hanagami | toilet paper, kitchen towels, tissues | 12 rolls:1, 24 rolls:2
household/laundry | 35 | 400-1100 | Freshfold, Lavenda | fabric softener, stain remover, laundry sheets | :1, twin pack:2
household/storage | - | 800-6000 | Boxwell, Shimau | storage box, laundry basket, hanger set, drawer organiser | -
baby/diapers | 7 | 1500-2500 | Hugglet, Sora Baby | diapers size 3, diapers size 4, diapers size 5, pull-ups | 44 pack:1, 88 pack:2
baby/wipes | 10 | 500-900 | Hugglet, Pureskin | baby wipes, sensitive wipes, water wipes | :1, 3-pack:3
baby/formula | 9 | 2200-3200 | Milky Way Baby, Nutribo | infant formula, follow-on formula | :1, twin pack:2
baby/toys | - | 800-5000 | Tsumiki, Playhaus | wooden blocks, rattle, stacking cups, picture book, bath toys | -
food/breakfast | 10 | 400-900 | Morningfield, Granola Co | granola, muesli, oat flakes, cornflakes | :1, twin pack:2
food/pantry/rice | 30 | 2500-4000 | Koshihikari Farm, Akita Fields | white rice, brown rice, multigrain rice | 5 kg:1, 10 kg:2
food/snacks | - | 200-1200 | Crunchy, Umai | rice crackers, mixed nuts, dark chocolate, dried mango, seaweed snacks | -
food/drinks | 7 | 1800-3000 | Fujisui, Spritz | sparkling water, mineral water, green tea bottles | 24 x 500 ml:1, 48 x 500 ml:2
health/supplements/vitamins | 30 | 900-2500 | Vitara, Nutribo | multivitamin, vitamin D, omega-3, magnesium | 30 days:1, 90 days:3
health/supplements/protein | 21 | 3000-5000 | Musclo, Plantein | whey protein, plant protein, protein shake mix | 1 kg:1, 2.5 kg:2.5
health/personal-care/lenses | 30 | 2500-4500 | Clearsight, Iris | daily contact lenses, monthly contact lenses, lens solution | 30 pack:1, 90 pack:3
health/personal-care/oral | 30 | 300-1500 | Brightsmile, Shiro | toothpaste, toothbrush heads, dental floss, mouthwash | :1, twin pack:2
health/devices | - | 3000-20000 | Medica, Kenko | blood pressure monitor, thermometer, massage gun, body scale | -
beauty/skincare | 45 | 1500-6000 | Hadaka, Lumiere | moisturiser, cleanser, serum, sunscreen, toner | -
beauty/haircare | 30 | 800-2500 | Silkara, Camellia | shampoo, conditioner, hair oil | 500 ml:1, 1 L refill:2
beauty/makeup | - | 1200-5000 | Lumiere, Hanami | lipstick, mascara, foundation, eyeliner, blush | -
pets/dog/food | 21 | 2500-4500 | Wagtail, Shiba Select | dry dog food, puppy food, senior dog food | 3 kg:1, 8 kg:2.5
pets/cat/food | 14 | 1500-3000 | Nekomama, Purrfect | dry cat food, wet cat food, kitten food | 2 kg:1, 5 kg:2.5
pets/cat/litter | 14 | 900-1800 | Nekomama, Clumpwell | clumping litter, tofu litter, silica litter | 7 L:1, 3 x 7 L:3
pets/accessories | - | 600-12000 | Wagtail, Purrfect | cat tree, dog leash, pet bed, feeding bowl, chew toy | -
sports/nutrition | 14 | 1200-2400 | Musclo, Trailfuel | energy bars, electrolyte tablets, energy gels | 12 pack:1, 36 pack:3
sports/fitness | - | 1000-15000 | Flexa, Ironclub | yoga mat, dumbbell set, resistance bands, foam roller, jump rope | -
sports/outdoor | - | 2000-18000 | Trailfuel, Yamabito | running shoes, rain jacket, hiking backpack, insulated bottle | -
electronics/batteries | 60 | 400-1200 | Voltra, Eneru | AA batteries, AAA batteries, rechargeable AA batteries | 4 pack:1, 12 pack:3
electronics/audio | - | 3000-30000 | Sonora, Otoya | wireless earbuds, headphones, bluetooth speaker | -
electronics/smart-home | - | 1500-25000 | Homelink, Sumato | smart plug, smart bulb, security camera, robot vacuum | -
"""


def _leaf_of(line: str) -> Leaf:
    path, cadence, prices, brands, products, variants = (part.strip() for part in line.split("|"))
    low, high = prices.split("-")
    packs: tuple[tuple[str, float], ...] = (("", 1.0),)
    if variants != "-":
        packs = tuple(
            (label, float(multiple)) for label, multiple in (v.split(":") for v in variants.split(", "))
        )
    return Leaf(
        path=tuple(path.split("/")),
        cadence_days=None if cadence == "-" else float(cadence),
        price_yen=(int(low), int(high)),
        brands=tuple(brands.split(", ")),
        products=tuple(products.split(", ")),
        variants=packs,
    )


LEAVES = tuple(_leaf_of(line) for line in LEAF_TABLE.strip().splitlines())


@dataclass(frozen=True)
class CatalogItem:
    item_id: str
    title: str
    category_path: tuple[str, ...]
    brand: str
    price_micros: int
    tags: tuple[str, ...]
    cadence_days: float | None  # ground truth: how long one unit lasts (never sent)
    popularity: float  # relative chance of being picked within its leaf


# The hand-written items of the first demo (README examples and the demo device use them),
# with their cadences: ink every ~30 days, beans every ~14, as the issue describes.
# fmt: off
LEGACY_ITEMS = tuple(
    CatalogItem(item_id, title, tuple(path.split("/")), brand, yen * YEN, tags, cadence, popularity)
    for item_id, title, path, brand, yen, tags, cadence, popularity in (
        ("ink-black-xl", "Black ink cartridge XL", "office/printing/ink", "Inkwell", 4200, ("consumable",), 30.0, 4.0),
        ("ink-colour", "Colour ink cartridge", "office/printing/ink", "Inkwell", 5100, ("consumable",), 45.0, 3.0),
        ("paper-a4", "A4 paper, 500 sheets", "office/printing/paper", "Papyra", 900, ("consumable",), 21.0, 4.0),
        ("filter-std", "Water filter cartridge", "kitchen/water/filters", "Aqualis", 2800, ("consumable",), 30.0, 4.0),
        ("coffee-beans", "Single-origin coffee beans 1 kg", "kitchen/coffee/beans", "Kobe Roast", 3600, (), 14.0, 4.0),
        ("coffee-descaler", "Descaler for coffee machines", "kitchen/coffee/care", "Kobe Roast", 1200, ("consumable",), 60.0, 3.0),
        ("kettle", "Gooseneck kettle", "kitchen/coffee/equipment", "Pourwell", 9800, (), None, 2.0),
        ("notebook", "Dot-grid notebook", "office/stationery", "Papyra", 1500, (), None, 2.0),
    )
)
# fmt: on


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _round_price(yen: float) -> int:
    """A shelf price: to 10 yen, ending in 80 above 1,000 yen (1,980 rather than 1,973)."""
    if yen >= 1000:
        return int(round((yen + 20) / 100) * 100 - 20) * YEN
    return int(round(yen / 10) * 10) * YEN


def generate_catalog(rng: random.Random, count: int) -> tuple[CatalogItem, ...]:
    """`count` items (at least the legacy ones) spread over the leaves of the tree."""
    items = list(LEGACY_ITEMS)
    taken = {item.item_id for item in items}
    # Every (brand, product, variant) of every leaf, shuffled per leaf, then dealt out
    # round-robin so that each leaf gets about the same share.
    pools: list[list[tuple[Leaf, str, str, str, float]]] = []
    for leaf in LEAVES:
        pool = [
            (leaf, brand, product, label, multiplier)
            for brand in leaf.brands
            for product in leaf.products
            for label, multiplier in leaf.variants
        ]
        rng.shuffle(pool)
        pools.append(pool)
    while len(items) < count and any(pools):
        for pool in pools:
            if len(items) >= count or not pool:
                continue
            leaf, brand, product, label, multiplier = pool.pop()
            title = f"{brand} {product}" + (f", {label}" if label else "")
            item_id = slug(f"{brand} {product} {label}")[:120]
            if item_id in taken:
                continue
            taken.add(item_id)
            base = rng.uniform(*leaf.price_yen)
            price = _round_price(base * multiplier**0.9)
            cadence = None
            tags: tuple[str, ...] = ()
            if leaf.cadence_days is not None:
                # Item-specific: the leaf's rhythm, scaled by pack size, varied per item.
                cadence = round(leaf.cadence_days * multiplier * rng.uniform(0.85, 1.15), 1)
                tags = ("consumable", "bulk") if multiplier > 1 else ("consumable",)
            items.append(
                CatalogItem(
                    item_id=item_id,
                    title=title[:256],
                    category_path=leaf.path,
                    brand=brand,
                    price_micros=price,
                    tags=tags,
                    cadence_days=cadence,
                    popularity=rng.paretovariate(1.5),  # a few best sellers per leaf
                )
            )
    return tuple(items)


# -- segments ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    name: str
    share: float  # of the generated customers
    # Category prefix ("office", "kitchen/coffee") -> how strongly the segment is drawn to
    # it; the rest of the tree shares BACKGROUND_WEIGHT.
    preferences: tuple[tuple[str, float], ...]
    channels: tuple[tuple[str, float], ...]  # where its browsing and buying happens
    birth_years: tuple[int, int]
    genders: tuple[tuple[str, float], ...]
    devices: tuple[tuple[str, float], ...]  # device kind -> chance a customer owns one


BACKGROUND_WEIGHT = 0.12  # everything outside a segment's preferences, together
SEGMENTS: tuple[Segment, ...] = (
    Segment(
        "home_office",
        0.22,
        (("office/printing", 0.35), ("office", 0.25), ("electronics", 0.12), ("kitchen/coffee", 0.16)),
        (("WEB", 0.6), ("MOBILE_APP", 0.2), ("STORE", 0.12), ("CALL_CENTER", 0.08)),
        (1965, 1992),
        (("MALE", 0.55), ("FEMALE", 0.4), ("UNDISCLOSED", 0.05)),
        (("printer", 0.55),),
    ),
    Segment(
        "coffee_lovers",
        0.2,
        (("kitchen/coffee", 0.45), ("kitchen/tea", 0.12), ("kitchen", 0.18), ("food/breakfast", 0.13)),
        (("WEB", 0.4), ("MOBILE_APP", 0.4), ("STORE", 0.2)),
        (1970, 1998),
        (("FEMALE", 0.5), ("MALE", 0.45), ("NON_BINARY", 0.05)),
        (("coffee_machine", 0.4), ("water_filter", 0.3)),
    ),
    Segment(
        "young_families",
        0.2,
        (("baby", 0.45), ("household", 0.25), ("food", 0.18)),
        (("MOBILE_APP", 0.55), ("WEB", 0.15), ("STORE", 0.3)),
        (1984, 1998),
        (("FEMALE", 0.6), ("MALE", 0.38), ("UNDISCLOSED", 0.02)),
        (),
    ),
    Segment(
        "wellness",
        0.2,
        (("health", 0.32), ("beauty", 0.28), ("sports", 0.26), ("food/drinks", 0.02)),
        (("MOBILE_APP", 0.6), ("WEB", 0.3), ("STORE", 0.1)),
        (1988, 2004),
        (("FEMALE", 0.55), ("MALE", 0.35), ("NON_BINARY", 0.07), ("UNDISCLOSED", 0.03)),
        (),
    ),
    Segment(
        "pet_households",
        0.18,
        (("pets", 0.5), ("household", 0.22), ("food/pantry", 0.1), ("kitchen/water", 0.06)),
        (("STORE", 0.45), ("WEB", 0.3), ("MOBILE_APP", 0.2), ("CALL_CENTER", 0.05)),
        (1955, 1995),
        (("FEMALE", 0.5), ("MALE", 0.45), ("UNDISCLOSED", 0.05)),
        (("water_filter", 0.25),),
    ),
)
SEGMENT_BY_NAME = {segment.name: segment for segment in SEGMENTS}

# device kind -> (the leaf its consumable comes from, unit of its level readings)
DEVICE_CONSUMABLES = {
    "printer": ("office/printing/ink", "percent"),
    "coffee_machine": ("kitchen/coffee/care", "percent"),
    "water_filter": ("kitchen/water/filters", "percent"),
}


def under(path: Sequence[str], prefix: str) -> bool:
    """Whether a category path lies under a prefix such as "kitchen/coffee"."""
    parts = tuple(prefix.split("/"))
    return tuple(path[: len(parts)]) == parts


def leaf_weights(segment: Segment, paths: Iterable[tuple[str, ...]]) -> dict[tuple[str, ...], float]:
    """How likely a browse or purchase of this segment falls in each leaf (sums to 1).

    A leaf takes the weight of the most specific preference that covers it, shared
    equally with the other leaves under that preference; leaves under no preference
    share BACKGROUND_WEIGHT.
    """
    owner: dict[tuple[str, ...], str] = {}
    for path in paths:
        matches = [p for p, _ in segment.preferences if under(path, p)]
        owner[path] = max(matches, key=lambda p: len(p.split("/")), default="")
    weights = dict(segment.preferences)
    weights[""] = BACKGROUND_WEIGHT
    members: dict[str, int] = {}
    for prefix in owner.values():
        members[prefix] = members.get(prefix, 0) + 1
    raw = {path: weights[prefix] / members[prefix] for path, prefix in owner.items()}
    total = sum(raw.values())
    return {path: weight / total for path, weight in raw.items()}


# -- customers --------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentGrant:
    purpose: str
    data_categories: tuple[str, ...]
    collection_method: str  # a CollectionMethod suffix: WEB_FORM, MOBILE_APP, STORE, ...

    def request_id(self, customer_id: str) -> str:
        return f"demo-consent-{customer_id}-{self.purpose}"


@dataclass(frozen=True)
class Habit:
    """A consumable the customer keeps re-buying, at their own interval."""

    item_id: str
    interval_days: float
    channel: str
    device: str = ""  # the device kind that re-orders it, when one does


@dataclass(frozen=True)
class DemoCustomer:
    customer_id: str
    display_name: str
    email: str
    phone: str
    birth_year: int
    gender: str  # a Gender suffix: FEMALE, MALE, NON_BINARY, UNDISCLOSED
    region: str
    language_code: str
    segment: str
    signup_us: int
    loyalty_card: str
    cookie_id: str
    home_store: str
    devices: tuple[str, ...]
    habits: tuple[Habit, ...]
    consents: tuple[ConsentGrant, ...]
    active_from_us: int
    active_until_us: int  # earlier than the end for a customer who churned
    loyalty_tier: str

    @property
    def collectable_categories(self) -> frozenset[str]:
        """The data categories any of the customer's grants covers (collected if any does)."""
        return frozenset(c for grant in self.consents for c in grant.data_categories)


# Named customers of the first demo, kept with their ids and attributes.
NAMED_CUSTOMERS = (
    ("demo-aiko", "Aiko Tanaka", "aiko@example.com", 1988, "JP-13", "ja", "home_office", "FEMALE"),
    ("demo-ben", "Ben Carter", "ben@example.com", 1975, "GB-LND", "en", "coffee_lovers", "MALE"),
    ("demo-chloe", "Chloé Martin", "chloe@example.com", 1999, "FR-75", "fr", "wellness", "FEMALE"),
)

JAPANESE_GIVEN = (
    "Haruto Yui Sota Hina Ren Mio Minato Sakura Yuto Aoi Riku Mei Kaito Rin Hayato Yuna Daiki Saki "
    "Kenta Nanami Takumi Emi Shota Ayaka Ryo Kaori Naoki Misaki Kenji Yoko Hiroshi Keiko"
).split()
JAPANESE_FAMILY = (
    "Sato Suzuki Takahashi Tanaka Watanabe Ito Yamamoto Nakamura Kobayashi Kato Yoshida Yamada "
    "Sasaki Yamaguchi Matsumoto Inoue Kimura Hayashi Shimizu Mori Abe Ikeda Hashimoto Ishikawa"
).split()
ENGLISH_GIVEN = "Oliver Amelia George Isla Harry Ava Noah Mia Jack Grace Leo Emily Oscar Lily".split()
ENGLISH_FAMILY = "Smith Jones Taylor Brown Williams Wilson Evans Thomas Roberts Walker Wright".split()
FRENCH_GIVEN = "Louis Emma Gabriel Jade Arthur Louise Jules Alice Hugo Chloé Léo Lina".split()
FRENCH_FAMILY = "Martin Bernard Dubois Thomas Robert Richard Petit Durand Leroy Moreau".split()
# (region, language, weight): a shop in Japan with a few customers abroad.
REGIONS = (
    ("JP-13", "ja", 0.28),
    ("JP-14", "ja", 0.1),
    ("JP-27", "ja", 0.12),
    ("JP-23", "ja", 0.07),
    ("JP-11", "ja", 0.06),
    ("JP-12", "ja", 0.05),
    ("JP-01", "ja", 0.05),
    ("JP-40", "ja", 0.05),
    ("JP-26", "ja", 0.05),
    ("JP-28", "ja", 0.05),
    ("JP-13", "en", 0.04),
    ("GB-LND", "en", 0.04),
    ("US-CA", "en", 0.02),
    ("FR-75", "fr", 0.02),
)


def _weighted(rng: random.Random, choices: Sequence[tuple[str, float]]) -> str:
    return rng.choices([c for c, _ in choices], weights=[w for _, w in choices])[0]


def _name(rng: random.Random, language: str) -> tuple[str, str]:
    if language == "ja":
        given, family = rng.choice(JAPANESE_GIVEN), rng.choice(JAPANESE_FAMILY)
        return f"{family} {given}", f"{given}.{family}"
    if language == "fr":
        given, family = rng.choice(FRENCH_GIVEN), rng.choice(FRENCH_FAMILY)
    else:
        given, family = rng.choice(ENGLISH_GIVEN), rng.choice(ENGLISH_FAMILY)
    return f"{given} {family}", f"{given}.{family}"


def _ascii(text: str) -> str:
    return text.translate(str.maketrans("éèëêàç", "eeeeac")).lower()


def _full_consent(devices: Sequence[str], method: str) -> tuple[ConsentGrant, ...]:
    """Everything the demo uses: behaviour and demographics for both personalisation
    purposes, and automatic ordering for a device owner."""
    grants: tuple[ConsentGrant, ...] = (
        ConsentGrant(RECOMMENDATIONS, BEHAVIOUR + DEMOGRAPHICS, method),
        ConsentGrant(PROFILING, BEHAVIOUR + DEMOGRAPHICS, method),
    )
    if devices:
        grants += (ConsentGrant(AUTOMATIC_ORDERING, (TELEMETRY, PURCHASES, CONTACT), "DEVICE"),)
    return grants


def _consents(
    rng: random.Random, devices: Sequence[str], method: str, index: int
) -> tuple[ConsentGrant, ...]:
    """Most customers grant everything the demo needs; some narrowly; a few nothing at all."""
    if index % 20 == 7:  # one in twenty: no consent at all (every event is rejected)
        return ()
    grants: tuple[ConsentGrant, ...]
    roll = rng.random()
    if roll < 0.06:  # recommendations from purchases only: browsing is not collected
        return (ConsentGrant(RECOMMENDATIONS, (PURCHASES,), method),)
    if roll < 0.2:  # behaviour, but no demographics
        grants = (
            ConsentGrant(RECOMMENDATIONS, BEHAVIOUR, method),
            ConsentGrant(PROFILING, BEHAVIOUR, method),
        )
    else:
        grants = _full_consent((), method)
    # Device owners let their devices re-order, except one in eight (readings then rejected).
    if devices and rng.random() >= 0.125:
        grants += (ConsentGrant(AUTOMATIC_ORDERING, (TELEMETRY, PURCHASES, CONTACT), "DEVICE"),)
    return grants


COLLECTION_METHOD_OF_CHANNEL = {
    "WEB": "WEB_FORM",
    "MOBILE_APP": "MOBILE_APP",
    "STORE": "STORE",
    "CALL_CENTER": "CALL_CENTER",
}


class _Picker:
    """Picks items for a segment: a leaf by the segment's weights, an item by popularity.

    The choices are tabulated once (cumulative weights), as they are drawn for every event.
    """

    def __init__(self, catalog: Sequence[CatalogItem]):
        by_leaf: dict[tuple[str, ...], list[CatalogItem]] = {}
        for item in catalog:
            by_leaf.setdefault(item.category_path, []).append(item)
        self.leaves = sorted(by_leaf)
        self._items: dict[tuple[tuple[str, ...], bool | None], tuple[list[CatalogItem], list[float]]] = {}
        for path, members in by_leaf.items():
            for kind in (None, True, False):
                chosen = [i for i in members if kind is None or (i.cadence_days is not None) == kind]
                if chosen:
                    self._items[path, kind] = (chosen, list(accumulate(i.popularity for i in chosen)))
        self._leaves: dict[tuple[str, bool | None], tuple[list[tuple[str, ...]], list[float]]] = {}
        for segment in SEGMENTS:
            weights = leaf_weights(segment, self.leaves)
            for kind in (None, True, False):
                paths = [p for p in self.leaves if (p, kind) in self._items]
                self._leaves[segment.name, kind] = (paths, list(accumulate(weights[p] for p in paths)))

    def leaf(self, rng: random.Random, segment: str, consumable: bool | None = None) -> tuple[str, ...]:
        paths, cumulative = self._leaves[segment, consumable]
        return rng.choices(paths, cum_weights=cumulative)[0]

    def random_leaf(self, rng: random.Random) -> tuple[str, ...]:
        return rng.choice(self.leaves)

    def item(self, rng: random.Random, leaf: tuple[str, ...], consumable: bool | None = None) -> CatalogItem:
        items, cumulative = self._items[leaf, consumable]
        return rng.choices(items, cum_weights=cumulative)[0]


def generate_customer(
    rng: random.Random, index: int, picker: _Picker, start_us: int, end_us: int
) -> DemoCustomer:
    named = NAMED_CUSTOMERS[index] if index < len(NAMED_CUSTOMERS) else None
    if named:
        customer_id, display_name, email, birth_year, region, language, segment_name, gender = named
        segment = SEGMENT_BY_NAME[segment_name]
    else:
        segment = rng.choices(SEGMENTS, weights=[s.share for s in SEGMENTS])[0]
        customer_id = f"demo-c{index:04d}"
        region, language = rng.choices(
            [(r, lang) for r, lang, _ in REGIONS], weights=[w for *_, w in REGIONS]
        )[0]
        display_name, handle = _name(rng, language)
        email = f"{_ascii(handle)}.{index}@example.com"
        birth_year = rng.randint(*segment.birth_years)
        gender = _weighted(rng, segment.genders)
    main_channel = _weighted(rng, [(c, w) for c, w in segment.channels if c != "CALL_CENTER"])
    phone = f"+8190{rng.randrange(10**8):08d}" if language == "ja" and rng.random() < 0.6 else ""

    # Who buys when: most customers are active throughout, some join late, some churn.
    active_from, active_until = start_us, end_us
    signup = start_us - int(rng.uniform(30, 1500) * DAY_US)
    if named is None:
        roll = rng.random()
        if roll < 0.1:
            active_from = start_us + int(rng.uniform(20, 110) * DAY_US)
            signup = active_from - int(rng.uniform(0, 2) * DAY_US)
        elif roll < 0.2:
            active_until = end_us - int(rng.uniform(50, 100) * DAY_US)

    # Devices, and the consumables re-bought at their own rhythm.
    if named and customer_id == "demo-aiko":
        devices: tuple[str, ...] = ("printer",)
        habits = [
            Habit("ink-black-xl", 30.0, "IOT_DEVICE", "printer"),
            Habit("ink-colour", 45.0, "IOT_DEVICE", "printer"),
        ]
    elif named and customer_id == "demo-ben":
        devices = ()
        habits = [Habit("coffee-beans", 14.0, "WEB"), Habit("filter-std", 31.0, "WEB")]
    else:
        devices = tuple(kind for kind, chance in segment.devices if rng.random() < chance)
        habits = []
        for kind in devices:
            leaf = tuple(DEVICE_CONSUMABLES[kind][0].split("/"))
            item = picker.item(rng, leaf, consumable=True)
            habits.append(Habit(item.item_id, _personal(rng, item), "IOT_DEVICE", kind))
        wanted = len(habits) + rng.choice((1, 2, 2, 3, 3, 4))
        attempts = 0
        while len(habits) < wanted and attempts < 20:
            attempts += 1
            item = picker.item(rng, picker.leaf(rng, segment.name, consumable=True), consumable=True)
            if any(h.item_id == item.item_id for h in habits):
                continue
            channel = main_channel if rng.random() < 0.8 else _weighted(rng, segment.channels)
            habits.append(Habit(item.item_id, _personal(rng, item), channel))

    if not named:
        consents = _consents(rng, devices, COLLECTION_METHOD_OF_CHANNEL[main_channel], index)
    elif customer_id == "demo-chloe":  # the named customer who consents to nothing
        consents = ()
    else:
        consents = _full_consent(devices, "WEB_FORM")
    return DemoCustomer(
        customer_id=customer_id,
        display_name=display_name,
        email=email,
        phone=phone,
        birth_year=birth_year,
        gender=gender,
        region=region,
        language_code=language,
        segment=segment.name,
        signup_us=signup,
        loyalty_card=f"NC-{index:06d}",
        cookie_id=f"ck-{rng.getrandbits(64):016x}",
        home_store=f"{region}-{rng.randint(1, 5):03d}",
        devices=devices,
        habits=tuple(habits),
        consents=consents,
        active_from_us=active_from,
        active_until_us=active_until,
        loyalty_tier=rng.choice(("bronze", "bronze", "silver", "gold")),
    )


def _personal(rng: random.Random, item: CatalogItem) -> float:
    """The customer's own interval for an item: the item's cadence, give or take 15 %."""
    assert item.cadence_days is not None
    return round(item.cadence_days * rng.uniform(0.85, 1.15), 1)


# -- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventLine:
    item_id: str
    category_path: tuple[str, ...]
    quantity: int
    unit_price_micros: int


@dataclass(slots=True)
class DemoEvent:
    event_id: str
    customer_id: str
    # How the sender names the customer: "" (customer_id), "loyalty_card" or "cookie_id".
    identified_by: str
    identifier_value: str
    channel: str  # a Channel suffix
    event_type: str  # an EventType suffix
    occurred_at_us: int
    items: tuple[EventLine, ...] = ()
    search_query: str = ""
    rating_value: float = 0.0
    value_micros: int = 0
    currency_code: str = ""
    order_id: str = ""
    store_id: str = ""
    properties: tuple[tuple[str, str | float], ...] = ()

    @property
    def data_category(self) -> str:
        return EVENT_CATEGORY[self.event_type]


@dataclass
class _Timeline:
    """Collects one customer's events; ids are given once they are sorted by time."""

    customer: DemoCustomer
    catalog: dict[str, CatalogItem]
    end_us: int
    events: list[DemoEvent] = field(default_factory=list)
    orders: int = 0
    habit_items: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.habit_items = frozenset(habit.item_id for habit in self.customer.habits)

    def one_off(self, lines: Iterable[EventLine]) -> list[EventLine]:
        """The lines a one-off purchase may hold: a habit's item is bought on its rhythm only,
        so that its purchase cadence stays what it is."""
        return [line for line in lines if line.item_id not in self.habit_items]

    def add(self, event_type: str, channel: str, at_us: int, **fields: object) -> bool:
        if not (self.customer.active_from_us <= at_us < min(self.customer.active_until_us, self.end_us)):
            return False
        identified_by, value = "", ""
        if channel == "STORE":
            identified_by, value = "loyalty_card", self.customer.loyalty_card
            fields.setdefault("store_id", self.customer.home_store)
        elif channel == "WEB" and event_type in ("PRODUCT_VIEW", "SEARCH"):
            identified_by, value = "cookie_id", self.customer.cookie_id
        self.events.append(
            DemoEvent(
                event_id="",
                customer_id=self.customer.customer_id,
                identified_by=identified_by,
                identifier_value=value,
                channel=channel,
                event_type=event_type,
                occurred_at_us=at_us,
                **fields,  # type: ignore[arg-type]
            )
        )
        return True

    def line(self, item: CatalogItem, quantity: int = 1) -> EventLine:
        return EventLine(item.item_id, item.category_path, quantity, item.price_micros)

    def order(self, channel: str, at_us: int, lines: Sequence[EventLine], **extra: object) -> str:
        """A purchase (online, by phone, by a device, or at a till); returns the order id."""
        self.orders += 1
        order_id = f"{self.customer.customer_id}-o{self.orders:04d}"
        event_type = "STORE_PURCHASE" if channel == "STORE" else "PURCHASE"
        value = sum(line.unit_price_micros * line.quantity for line in lines)
        added = self.add(
            event_type,
            channel,
            at_us,
            items=tuple(lines),
            value_micros=value,
            currency_code=CURRENCY,
            order_id=order_id,
            **extra,
        )
        return order_id if added else ""


def _time_of_day(rng: random.Random, day_us: int, channel: str) -> int:
    """A plausible moment on that day: shops open 10-20 h, screens 7-23 h (UTC+9 ignored)."""
    hours = (10, 20) if channel in ("STORE", "CALL_CENTER") else (7, 23)
    midnight = day_us - day_us % DAY_US
    return midnight + int(rng.uniform(*hours) * HOUR_US)


def _habit_events(rng: random.Random, timeline: _Timeline, picker: _Picker, habit: Habit) -> None:
    customer = timeline.customer
    item = timeline.catalog[habit.item_id]
    interval = habit.interval_days * DAY_US
    stop = min(customer.active_until_us, timeline.end_us)
    # The first purchase falls somewhere in the first interval, then one about every interval.
    at = customer.active_from_us + int(rng.uniform(0.05, 1.0) * interval)
    refills: list[int] = [at - int(rng.uniform(0.2, 0.8) * interval)]  # a unit in use already
    while at < stop:
        moment = at if habit.channel == "IOT_DEVICE" else _time_of_day(rng, at, habit.channel)
        lines = [timeline.line(item)]
        if habit.channel in ("WEB", "MOBILE_APP"):
            if rng.random() < 0.5:
                timeline.add(
                    "PRODUCT_VIEW",
                    habit.channel,
                    moment - int(rng.uniform(1, 20) * 60 * SECOND_US),
                    items=(lines[0],),
                )
            if rng.random() < 0.2:  # and something else while at it
                extra = picker.item(rng, picker.leaf(rng, customer.segment))
                lines += timeline.one_off([timeline.line(extra)])
        if habit.channel == "STORE":
            timeline.add("STORE_VISIT", "STORE", moment - int(rng.uniform(5, 30) * 60 * SECOND_US))
        extra_fields: dict[str, object] = {}
        if habit.channel == "IOT_DEVICE":
            extra_fields["properties"] = (("trigger", "automatic_reorder"), ("device", habit.device))
        timeline.order(habit.channel, moment, lines, **extra_fields)
        refills.append(moment + 2 * DAY_US)  # delivered two days later
        at += int(interval * min(1.35, max(0.7, rng.gauss(1.0, 0.08))))
    if habit.device:
        _usage_readings(rng, timeline, habit, item, refills)


def _usage_readings(
    rng: random.Random, timeline: _Timeline, habit: Habit, item: CatalogItem, refills: list[int]
) -> None:
    """Weekly level readings of the device's consumable: a saw tooth, full at each refill."""
    customer = timeline.customer
    interval = habit.interval_days * DAY_US
    at = customer.active_from_us + int(rng.uniform(0, 7) * DAY_US)
    stop = min(customer.active_until_us, timeline.end_us)
    while at < stop:
        last_refill = max((r for r in refills if r <= at), default=refills[0])
        level = max(0.0, 100.0 * (1.0 - (at - last_refill) / interval) + rng.gauss(0, 1.5))
        timeline.add(
            "DEVICE_USAGE",
            "IOT_DEVICE",
            at,
            items=(EventLine(item.item_id, item.category_path, 1, 0),),
            properties=(
                ("device", habit.device),
                ("measurement", "level"),
                ("unit", DEVICE_CONSUMABLES[habit.device][1]),
                ("level", round(min(100.0, level), 1)),
            ),
        )
        at += int(rng.uniform(6, 8) * DAY_US)


def _session_events(
    rng: random.Random, timeline: _Timeline, picker: _Picker, at: int, activity: float
) -> None:
    """One visit: on a screen, views (maybe after a search), perhaps a cart and an order;
    in a store, a visit and usually a purchase; now and then a call to the call centre."""
    customer = timeline.customer
    segment = SEGMENT_BY_NAME[customer.segment]
    channel = _weighted(rng, segment.channels)
    preferred = rng.random() < 0.85
    leaf = picker.leaf(rng, customer.segment) if preferred else picker.random_leaf(rng)
    moment = _time_of_day(rng, at, channel)
    if channel == "CALL_CENTER":
        item = picker.item(rng, leaf)
        kind = "INQUIRY" if rng.random() < 0.7 else "DOCUMENT_REQUEST"
        timeline.add(kind, channel, moment, items=(timeline.line(item),))
        bought = timeline.one_off([timeline.line(item)])
        if bought and rng.random() < 0.3:
            timeline.order(channel, moment + 5 * 60 * SECOND_US, bought)
        return
    if channel == "STORE":
        timeline.add("STORE_VISIT", channel, moment)
        if rng.random() < 0.65:
            lines = {picker.item(rng, leaf).item_id: None}
            for _ in range(rng.choice((0, 0, 1, 2))):
                lines[picker.item(rng, picker.leaf(rng, customer.segment)).item_id] = None
            bought = timeline.one_off(
                timeline.line(timeline.catalog[i], rng.choice((1, 1, 1, 2))) for i in lines
            )
            if bought:
                order = timeline.order(channel, moment + int(rng.uniform(10, 40) * 60 * SECOND_US), bought)
                _after_purchase(rng, timeline, order, bought, moment, preferred)
        return
    step = int(rng.uniform(20, 90) * SECOND_US)
    if rng.random() < 0.3:
        clicked = picker.item(rng, leaf)
        query = leaf[-1] if rng.random() < 0.6 else f"{clicked.brand} {leaf[-1]}"
        timeline.add("SEARCH", channel, moment, search_query=query.lower(), items=(timeline.line(clicked),))
        moment += step
    viewed = [picker.item(rng, leaf) for _ in range(rng.choice((1, 1, 2, 2, 3, 4)))]
    for item in viewed:
        timeline.add("PRODUCT_VIEW", channel, moment, items=(timeline.line(item),))
        moment += step
    chosen = viewed[-1]
    if rng.random() < 0.06:
        timeline.add("ADD_TO_WISHLIST", channel, moment, items=(timeline.line(chosen),))
        moment += step
    if chosen.item_id not in timeline.habit_items and rng.random() < 0.25 * min(1.5, activity):
        line = timeline.line(chosen, rng.choice((1, 1, 1, 2)))
        timeline.add("ADD_TO_CART", channel, moment, items=(line,))
        moment += step
        if rng.random() < 0.55:
            order = timeline.order(channel, moment + step, [line])
            _after_purchase(rng, timeline, order, [line], moment, preferred)
        elif rng.random() < 0.3:
            timeline.add("REMOVE_FROM_CART", channel, moment + step, items=(line,))


def _after_purchase(
    rng: random.Random,
    timeline: _Timeline,
    order_id: str,
    lines: Sequence[EventLine],
    at: int,
    preferred: bool,
) -> None:
    """Sometimes a rating a few days later; rarely a return."""
    if not order_id:
        return
    if rng.random() < 0.15:
        rating = rng.choice((4.0, 4.5, 5.0, 5.0)) if preferred else rng.choice((2.0, 3.0, 3.5, 4.0))
        timeline.add(
            "RATING",
            rng.choice(("WEB", "MOBILE_APP")),
            at + int(rng.uniform(3, 12) * DAY_US),
            items=(lines[0],),
            rating_value=rating,
        )
    elif rng.random() < 0.03:
        returned = lines[0]
        timeline.add(
            "RETURN",
            "STORE" if rng.random() < 0.3 else "WEB",
            at + int(rng.uniform(4, 14) * DAY_US),
            items=(returned,),
            order_id=order_id,
            value_micros=returned.unit_price_micros * returned.quantity,
            currency_code=CURRENCY,
        )


def generate_events(
    rng: random.Random, customer: DemoCustomer, catalog: dict[str, CatalogItem], picker: _Picker, end_us: int
) -> tuple[DemoEvent, ...]:
    timeline = _Timeline(customer, catalog, end_us)
    for habit in customer.habits:
        _habit_events(rng, timeline, picker, habit)
    # Visits arrive as a Poisson process, about 1.3 a week for an average customer.
    activity = min(3.0, max(0.3, rng.lognormvariate(0.0, 0.5)))
    rate_per_us = activity * 1.3 / (7 * DAY_US)
    at = customer.active_from_us + int(rng.expovariate(rate_per_us))
    while at < min(customer.active_until_us, end_us):
        _session_events(rng, timeline, picker, at, activity)
        at += int(rng.expovariate(rate_per_us))
    ordered = sorted(timeline.events, key=lambda e: (e.occurred_at_us, e.event_type, e.order_id))
    for n, event in enumerate(ordered, start=1):
        event.event_id = f"{customer.customer_id}-e{n:04d}"
    return tuple(ordered)


# -- everything -------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoData:
    seed: int
    start_us: int
    end_us: int
    items: tuple[CatalogItem, ...]
    customers: tuple[DemoCustomer, ...]
    events: tuple[DemoEvent, ...]  # by customer, each customer's in time order

    def item(self, item_id: str) -> CatalogItem:
        return self._items_by_id()[item_id]

    def _items_by_id(self) -> dict[str, CatalogItem]:
        return {item.item_id: item for item in self.items}

    def events_of(self, customer_id: str) -> list[DemoEvent]:
        return [event for event in self.events if event.customer_id == customer_id]


def generate(
    end_us: int,
    seed: int = SEED,
    customers: int = DEFAULT_CUSTOMERS,
    items: int = DEFAULT_ITEMS,
    days: int = DEFAULT_DAYS,
) -> DemoData:
    """The demo data for `days` days ending at `end_us` (microseconds since the epoch).

    Deterministic: the same arguments give equal results. Each customer draws from a
    random stream of their own, so one customer's data does not depend on another's.
    """
    start_us = end_us - days * DAY_US
    catalog = generate_catalog(random.Random(f"{seed}/catalog"), items)
    by_id = {item.item_id: item for item in catalog}
    picker = _Picker(catalog)
    people: list[DemoCustomer] = []
    events: list[DemoEvent] = []
    for index in range(max(customers, len(NAMED_CUSTOMERS))):
        rng = random.Random(f"{seed}/customer/{index}")
        customer = generate_customer(rng, index, picker, start_us, end_us)
        people.append(customer)
        events.extend(generate_events(rng, customer, by_id, picker, end_us))
    return DemoData(seed, start_us, end_us, catalog, tuple(people), tuple(events))


def purchase_intervals_days(events: Iterable[DemoEvent]) -> dict[tuple[str, str], list[float]]:
    """(customer, item) -> days between consecutive purchases of the item, in time order."""
    times: dict[tuple[str, str], list[int]] = {}
    for event in events:
        if event.event_type in PURCHASE_TYPES:
            for line in event.items:
                times.setdefault((event.customer_id, line.item_id), []).append(event.occurred_at_us)
    return {
        key: [(b - a) / DAY_US for a, b in zip(sorted(t), sorted(t)[1:], strict=False)]
        for key, t in times.items()
        if len(t) >= 2
    }


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
