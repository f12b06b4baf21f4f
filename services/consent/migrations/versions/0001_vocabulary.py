"""The consent vocabulary: purposes, data categories and their uses, with the defaults.

Revision ID: 0001
Revises:
"""

import json

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The data categories of the consent vocabulary (fideslang names), as a customer reads them.
DATA_CATEGORIES = [
    (
        "user.demographic.age_range",
        "Age range",
        "Your age group (for example 25-34), worked out from your birth year.",
        False,
    ),
    ("user.demographic.gender", "Gender", "The gender you told us, if you chose to.", True),
    (
        "user.location.imprecise",
        "Region",
        "The region or city you live in; never your exact address or position.",
        False,
    ),
    (
        "user.behavior.purchase_history",
        "Purchase history",
        "The products you bought, when, and where (online or in store).",
        False,
    ),
    (
        "user.behavior.browsing_history",
        "Browsing history",
        "The products and pages you looked at in our app and on our web site.",
        False,
    ),
    (
        "user.behavior.search_history",
        "Search history",
        "What you searched for in our app and on our web site.",
        False,
    ),
    ("user.behavior.store_visits", "Store visits", "When you visited one of our physical stores.", False),
    (
        "user.device.telemetry",
        "Device readings",
        "Consumption readings your connected devices send, such as ink or filter levels.",
        False,
    ),
    ("user.contact", "Contact details", "Your name, e-mail address and phone number.", False),
]

DAY = 86_400
# (name, display name, description, categories, validity in seconds or None, uses by service)
PURPOSES = [
    (
        "personalize.recommendations",
        "Personalised recommendations",
        "We suggest products for you based on what you bought, browsed and searched for.",
        [
            "user.behavior.purchase_history",
            "user.behavior.browsing_history",
            "user.behavior.search_history",
            "user.behavior.store_visits",
            "user.demographic.age_range",
            "user.demographic.gender",
            "user.location.imprecise",
        ],
        None,
        [
            (
                "profile",
                [
                    "user.behavior.purchase_history",
                    "user.behavior.browsing_history",
                    "user.behavior.search_history",
                    "user.behavior.store_visits",
                ],
                "Collects your interactions and passes them to the recommender.",
            ),
            (
                "recommendation",
                [
                    "user.behavior.purchase_history",
                    "user.behavior.browsing_history",
                    "user.behavior.search_history",
                    "user.demographic.age_range",
                    "user.demographic.gender",
                    "user.location.imprecise",
                ],
                "Ranks products for you by what you bought and browsed and by your profile.",
            ),
        ],
    ),
    (
        "personalize.profiling",
        "Customer profile",
        "We build a profile of your preferences (favourite categories, how often you buy) to serve you better.",
        [
            "user.behavior.purchase_history",
            "user.behavior.browsing_history",
            "user.behavior.search_history",
            "user.behavior.store_visits",
            "user.demographic.age_range",
            "user.demographic.gender",
            "user.location.imprecise",
        ],
        None,
        [
            (
                "profile",
                [
                    "user.behavior.purchase_history",
                    "user.behavior.browsing_history",
                    "user.behavior.search_history",
                    "user.behavior.store_visits",
                ],
                "Computes your favourite categories, purchase rhythm and how likely you are to leave.",
            )
        ],
    ),
    (
        "replenishment.automatic_ordering",
        "Automatic re-ordering",
        "Your connected devices tell us when a consumable runs low, and we order a replacement for you.",
        ["user.device.telemetry", "user.behavior.purchase_history", "user.contact"],
        None,
        [
            (
                "replenishment",
                ["user.device.telemetry", "user.behavior.purchase_history", "user.contact"],
                "Forecasts when a consumable runs out and places the re-order in time.",
            )
        ],
    ),
    (
        "marketing.communications",
        "Marketing messages",
        "We send you offers and news by e-mail or phone.",
        ["user.contact", "user.behavior.purchase_history", "user.demographic.age_range"],
        730 * DAY,
        [
            (
                "profile",
                ["user.contact", "user.behavior.purchase_history", "user.demographic.age_range"],
                "Selects the offers that fit you and the address to send them to.",
            )
        ],
    ),
    (
        "analytics",
        "Analytics",
        "We measure how our shops and services are used, in aggregate, to improve them.",
        [
            "user.behavior.purchase_history",
            "user.behavior.browsing_history",
            "user.behavior.store_visits",
            "user.location.imprecise",
        ],
        None,
        [
            (
                "recommendation",
                ["user.behavior.purchase_history", "user.behavior.browsing_history"],
                "Evaluates how well recommendations work, over all customers together.",
            )
        ],
    ),
]


def upgrade() -> None:
    categories = op.create_table(
        "data_categories",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("sensitive", sa.Boolean, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )
    purposes = op.create_table(
        "purposes",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("data_categories", sa.Text, nullable=False),  # JSON list of category names
        sa.Column(
            "data_uses", sa.Text, nullable=False
        ),  # JSON list of {service, data_categories, description}
        sa.Column("consent_validity_seconds", sa.BigInteger, nullable=True),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "idempotency",
        sa.Column("principal", sa.String(160), primary_key=True),
        sa.Column("rpc", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("response", sa.LargeBinary, nullable=False),
        sa.Column("created_at_us", sa.BigInteger, nullable=False),
    )
    created = 1_767_225_600_000_000  # 2026-01-01, when the default vocabulary was written
    op.bulk_insert(
        categories,
        [
            dict(name=n, display_name=d, description=t, sensitive=s, created_at_us=created)
            for n, d, t, s in DATA_CATEGORIES
        ],
    )
    op.bulk_insert(
        purposes,
        [
            dict(
                name=name,
                display_name=display,
                description=text,
                data_categories=json.dumps(cats),
                data_uses=json.dumps([dict(service=s, data_categories=c, description=d) for s, c, d in uses]),
                consent_validity_seconds=validity,
                created_at_us=created,
            )
            for name, display, text, cats, validity, uses in PURPOSES
        ],
    )


def downgrade() -> None:
    op.drop_table("idempotency")
    op.drop_table("purposes")
    op.drop_table("data_categories")
