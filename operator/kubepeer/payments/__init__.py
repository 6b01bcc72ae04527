"""Livepeer probabilistic micropayments: ticket maths (pure), the Redis ledger, the redeemer.

Split by noun, as go-livepeer's pm/ is: ticket, recipient, sender, validator, ledger,
redeemer.
"""
