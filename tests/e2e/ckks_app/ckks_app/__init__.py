"""Tiny CKKS app: plain local training; encryption comes from ckks_mod only."""
