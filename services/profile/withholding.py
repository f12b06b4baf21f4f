"""Purpose-bound reads of a customer (GetCustomerRequest.purpose): a caller that names
the purpose it will use a profile for sees only the fields whose consent data category
the customer consents to for that purpose; the others are cleared and their categories
listed in withheld_data_categories.

The categories are the proto's (Customer's field comments): contact data for the name,
e-mail and phone, the age band, gender and coarse location, and each custom
attribute's own. language_code and signup_time are account data needed to serve the
customer and belong to none, so they are never withheld.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from najimi.profile.v1 import profile_service_pb2 as pb

from services.profile.customers import CONTACT_CATEGORY

# Customer fields (not attributes) and the data category each belongs to.
FIELD_CATEGORIES = (
    ("display_name", CONTACT_CATEGORY),
    ("email", CONTACT_CATEGORY),
    ("phone", CONTACT_CATEGORY),
    ("age_range", "user.demographic.age_range"),
    ("gender", "user.demographic.gender"),
    ("region", "user.location.imprecise"),
)


def categories_held(customer: pb.Customer) -> list[str]:
    """The data categories of the fields `customer` has values for, each once."""
    held = {category: None for name, category in FIELD_CATEGORIES if getattr(customer, name)}
    held.update((value.data_category, None) for value in customer.attributes.values())
    return list(held)


def withheld_view(
    customer: pb.Customer, allowed: Callable[[Collection[str]], Collection[str]]
) -> pb.Customer:
    """A copy of `customer` holding only the fields of the categories `allowed` returns
    (given the categories it holds); the rest cleared and named in withheld_data_categories."""
    held = categories_held(customer)
    granted = set(allowed(held)) if held else set()
    view = pb.Customer()
    view.CopyFrom(customer)
    withheld: set[str] = set()
    for name, category in FIELD_CATEGORIES:
        if category not in granted and getattr(view, name):
            view.ClearField(name)  # type: ignore[arg-type]
            withheld.add(category)
    for key, value in list(view.attributes.items()):
        if value.data_category not in granted:
            del view.attributes[key]
            withheld.add(value.data_category)
    view.withheld_data_categories.extend(sorted(withheld))
    return view
