"""Flower client mods: add them to ``ClientApp(mods=[...])``; app code is unchanged.

- :func:`ckks_mod` - decrypts the CKKS-encrypted global model before the ClientApp
  sees it and encrypts the train reply (pairs with
  :class:`flwr_ext.strategy.HomomorphicAggregation`). Put it first.
- :func:`distributed_dp_mod` - clips the client's update and adds its share of the
  Gaussian noise (pairs with :class:`flwr_ext.strategy.DistributedDP`). List it
  after any encrypting mod: ``ClientApp(mods=[ckks_mod, distributed_dp_mod])``.
- :func:`site_policy_mod` - enforces the site's own privacy policy (node config
  ``policy-*`` floors: minimum noise, minimum contributions, CKKS required...)
  against any server instruction. Put it first (outermost).
- :func:`momentum_mod` - sends the client's momentum instead of its raw update
  (variance reduction for any robust rule); state in ``context.state``.
"""

from .ckks import ckks_mod
from .distributed_dp import distributed_dp_mod
from .momentum import momentum_mod
from .site_policy import SitePolicy, site_policy_mod

__all__ = [
    "SitePolicy",
    "ckks_mod",
    "distributed_dp_mod",
    "momentum_mod",
    "site_policy_mod",
]
