import pytest

from flwr_ext.appkit.config import ConfigError, ConfigSchema, Option

SCHEMA = ConfigSchema(
    [
        Option("rounds", int, 3, "federated rounds", min=1),
        Option("lr", float, 0.1, "learning rate", min=0.0, min_exclusive=True),
        Option("strategy", str, "fedavg", "rule", choices=("fedavg", "krum")),
        Option("dp", bool, False, "DP on/off"),
        Option("frac", float, 0.5, "fraction", min=0, max=1, max_exclusive=True),
        Option("name", str, None, "required name"),
    ]
)


def test_valid_config_is_typed_and_filled_with_defaults():
    settings = SCHEMA.validate({"name": "x", "lr": 1, "strategy": " KRUM "})
    assert settings["lr"] == 1.0 and isinstance(settings["lr"], float)
    assert settings["strategy"] == "krum"  # normalised
    assert settings["rounds"] == 3 and settings["dp"] is False
    assert settings.to_dict()["name"] == "x"


def test_every_problem_is_reported_at_once_with_valid_choices():
    with pytest.raises(ConfigError) as err:
        SCHEMA.validate(
            {
                "rounds": 0,
                "lr": "fast",
                "strategy": "trimed-mean",
                "dp": 1,
                "frac": 1.0,
                "stratgy": "x",
            }
        )
    text = str(err.value)
    assert len(err.value.problems) == 7
    assert "rounds=0 must be >= 1" in text
    assert "lr='fast' must be a number" in text
    assert "choose one of: 'fedavg', 'krum'" in text
    assert "dp=1 must be a boolean" in text
    assert "frac=1.0 must be < 1" in text
    assert "name is missing" in text
    assert "stratgy is not a known key (did you mean 'strategy'?)" in text


def test_bool_is_not_a_number_and_nan_is_rejected():
    with pytest.raises(ConfigError, match="must be an integer"):
        SCHEMA.validate({"name": "x", "rounds": True})
    with pytest.raises(ConfigError, match="finite"):
        SCHEMA.validate({"name": "x", "lr": float("nan")})


def test_unknown_keys_allowed_for_node_configs():
    settings = SCHEMA.validate({"name": "x", "ckks-context": "/k"}, allow_unknown=True)
    assert "ckks-context" not in settings


def test_custom_check_and_bad_default_caught_at_definition():
    option = Option("path", str, "", "abs", check=lambda v: (v and "bad") or None)
    with pytest.raises(ValueError, match="path='x' bad"):
        option.parse("x")
    with pytest.raises(ValueError, match="bad default"):
        Option("n", int, 0, "n", min=1)
    with pytest.raises(TypeError):
        Option("n", list, None, "n")  # type: ignore[arg-type]


def test_schemas_combine_and_defaults_can_be_replaced():
    extra = ConfigSchema([Option("extra", int, 1, "extra")])
    combined = (SCHEMA + extra).with_defaults({"rounds": 7})
    assert combined.defaults()["rounds"] == 7 and "extra" in combined
    with pytest.raises(ValueError, match="duplicate"):
        SCHEMA + ConfigSchema([Option("rounds", int, 1, "again")])
    with pytest.raises(ValueError, match="unknown options"):
        SCHEMA.with_defaults({"nope": 1})
    with pytest.raises(ValueError, match="bad default"):
        SCHEMA.with_defaults({"rounds": 0})


def test_markdown_table_lists_every_option():
    table = SCHEMA.markdown_table()
    assert table.count("\n") == len(SCHEMA.options) + 1
    assert '| `strategy` | `"fedavg"` | `fedavg`, `krum` |' in table
    assert "| `dp` | `false` | bool |" in table
    assert "| `name` | required |" in table


def test_settings_name_unknown_keys():
    settings = SCHEMA.validate({"name": "x"})
    with pytest.raises(KeyError, match="not a validated config key"):
        settings["nope"]
