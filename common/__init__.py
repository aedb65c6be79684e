"""Shared pieces of prepare.py, train.py and distill.py: shards, decoder swap, checkpoints."""
