"""Serving: the active model's arrays and the pure functions that score, explain and
re-rank with them (no gRPC, no database).

- model.py: ServingModel, the artefact's arrays laid out for serving (contiguous float32).
- scorer.py: exact top-k under an allowed-items mask (matrix-vector product, argpartition),
  one customer or many; the approximate index for large catalogs (ann_index.py).
- diversity.py: maximal-marginal-relevance re-rank over item representations.
- customer_vectors.py: a customer's query vector from what may be used of them: the
  learned row, consented attributes, fresh or session items folded in; kept as additive
  terms, each with the consent data category it rests on.
- reasons.py: the largest terms of one item's score, as reasons.
"""
