"""Governance: model cards (card.py), a hash-chained audit trail (audit.py) and policy as code (policy.py)."""
