"""flwr-ext: robust, private and encrypted aggregation for Flower.

Byzantine-robust, differentially private and homomorphically encrypted aggregation
for Flower (Message API), plus hospital and bank app templates.

Sub-packages (imports point downwards only):

- :mod:`flwr_ext.strategy` - Flower strategy wrappers (robust, DP, homomorphic).
- :mod:`flwr_ext.mods` - Flower client mods.
- :mod:`flwr_ext.attacks` - Byzantine attacks, to test defences.
- :mod:`flwr_ext.aggregation` - pure numpy aggregation rules.
- :mod:`flwr_ext.privacy` - privacy accounting and DP helpers.
- :mod:`flwr_ext.he` - CKKS keys and codec (TenSEAL).
- :mod:`flwr_ext.records` - ArrayRecord <-> flat vector, reply validation.

Importing the package reads no files and starts nothing.
"""

__version__ = "0.1.0"
