"""Flower client mods: add them to ``ClientApp(mods=[...])``; app code is unchanged.

- :func:`ckks_mod` - decrypts the CKKS-encrypted global model before the ClientApp
  sees it and encrypts the train reply (pairs with
  :class:`flwr_ext.strategy.HomomorphicAggregation`; also answers the threshold
  operations of :class:`flwr_ext.strategy.ThresholdHomomorphicAggregation`). Put it
  first.
- :func:`distributed_dp_mod` - clips the client's update and adds its share of the
  Gaussian noise (pairs with :class:`flwr_ext.strategy.DistributedDP`). List it
  after any encrypting mod: ``ClientApp(mods=[ckks_mod, distributed_dp_mod])``.
- :func:`site_policy_mod` - enforces the site's own privacy policy (node config
  ``policy-*`` floors: minimum noise, minimum contributions, CKKS required...)
  against any server instruction. Put it first (outermost).
- :func:`secure_aggregation_mod` - runs ``ckks_mod`` when the run asks for CKKS
  *or* the site holds a secret context (the app templates' routing: a keyed site
  never sends plaintext); the encrypted statistics round's queries pass through.
- :func:`momentum_mod` - sends the client's momentum instead of its raw update
  (variance reduction for any robust rule); state in ``context.state``.

Names are resolved on first use (PEP 562): a ClientApp that uses one mod does not
import the other's dependencies.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .ckks import ckks_mod
    from .distributed_dp import distributed_dp_mod
    from .momentum import momentum_mod
    from .secure_aggregation import secure_aggregation_mod
    from .site_policy import SitePolicy, site_policy_mod

_EXPORTS = {
    "ckks_mod": "ckks",
    "distributed_dp_mod": "distributed_dp",
    "momentum_mod": "momentum",
    "secure_aggregation_mod": "secure_aggregation",
    "SitePolicy": "site_policy",
    "site_policy_mod": "site_policy",
}
__all__ = [
    "SitePolicy",
    "ckks_mod",
    "distributed_dp_mod",
    "momentum_mod",
    "secure_aggregation_mod",
    "site_policy_mod",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
