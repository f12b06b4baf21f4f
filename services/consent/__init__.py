"""The consent service: vocabulary, notices, consent state, receipts, audit, change feed."""
