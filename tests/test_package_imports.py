"""Package front files stay light: importing a strategy loads no torch/Opacus/TenSEAL.

Each check runs in a fresh interpreter, because this test process has long
imported everything.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("tenseal", "opacus", "torch", "matplotlib")


def _loaded_after(code: str) -> list[str]:
    script = (
        f"import sys, json\n{code}\n"
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "code",
    [
        "import flwr_ext.strategy",
        "import flwr_ext.privacy, flwr_ext.mods, flwr_ext.he, flwr_ext.appkit",
        "from flwr_ext.strategy import TrimmedMean, Krum, RobustAggregation",
        "from flwr_ext.strategy import HomomorphicAggregation, check_composition",
        "from flwr_ext.mods import ckks_mod",
        "from flwr_ext.privacy import keys",
        "import flwr_ext.appkit.strategy_options, flwr_ext.appkit.config",
    ],
)
def test_importing_a_strategy_or_config_loads_no_heavy_dependency(code):
    assert _loaded_after(code) == []


def test_lazy_names_resolve_to_their_modules():
    import flwr_ext.mods
    import flwr_ext.privacy
    import flwr_ext.strategy
    from flwr_ext.mods.ckks import ckks_mod
    from flwr_ext.strategy.robust_strategies import TrimmedMean

    assert flwr_ext.strategy.TrimmedMean is TrimmedMean
    assert flwr_ext.mods.ckks_mod is ckks_mod
    assert flwr_ext.privacy.keys.CLIENT_EPSILON
    for package in (flwr_ext.strategy, flwr_ext.privacy, flwr_ext.mods):
        assert sorted(dir(package)) == sorted(package.__all__)
        for name in package.__all__:
            assert getattr(package, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = flwr_ext.strategy.Nope
