"""Flower client mods: add them to ``ClientApp(mods=[...])``; app code is unchanged.

- :func:`ckks_mod` - decrypts the CKKS-encrypted global model before the ClientApp
  sees it and encrypts the train reply (pairs with
  :class:`flwr_ext.strategy.HomomorphicAggregation`). Put it first.
"""

from .ckks import ckks_mod

__all__ = ["ckks_mod"]
