"""The profile service: customers, identities, events, traits and the interaction feed."""
