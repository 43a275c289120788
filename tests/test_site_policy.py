"""Site-side privacy policy: floors in a site's node config beat server instructions.

Real ClientApps with the real mods (``site_policy_mod``, ``distributed_dp_mod``,
``ckks_mod`` with real TenSEAL keys), real Flower Messages. The fuzz tests throw
random and mutated server instructions at both mods (bounded examples, CI) and check
that no exception escapes and that no update leaves the site in plaintext or with
less noise than the policy allows.

Leak check used throughout: the ClientApp adds a fixed secret direction ``SECRET``
(norm 100, ``D`` coordinates) to the model it receives. A reply that leaves the site
must carry ``clip(SECRET) + noise`` with noise std >= floor * C per coordinate, so
the correlation between the released update and ``SECRET`` is at most about
``1 / sqrt(1 + D * floor**2)`` (0.06 for D = 1024, floor 0.5); the exact update has
correlation 1. The threshold 0.3 is 8 standard errors (1/sqrt(D) = 0.03) above the
noise level.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_ext.he import (
    SECRET_FILE,
    SERVER_FILE,
    CiphertextSum,
    create_keys,
    encrypt_record,
    load_keys,
)
from flwr_ext.he.codec import META_KEY, STYPE_META, EncryptedHeader
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod, distributed_dp_mod
from flwr_ext.mods.site_policy import (
    PolicyViolationError,
    ShareableError,
    SitePolicy,
    SitePolicyError,
    site_policy_mod,
)
from flwr_ext.privacy import keys
from flwr_ext.strategy import DistributedDP, HomomorphicAggregation, NoModelError

from .conftest import instructions

D = 1024
SECRET = np.random.default_rng(7).standard_normal(D)
SECRET *= 100.0 / np.linalg.norm(SECRET)
PATIENT_ID = "PATIENT-4711-JANE-DOE"


def global_model(d: int = D) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(d, np.float32))})


def make_app(mods, *, raise_with_data: bool = False) -> ClientApp:
    """A ClientApp that adds SECRET to the model (or raises quoting a patient id)."""
    app = ClientApp(mods=list(mods))

    def train(msg: Message, context: Context) -> Message:
        if raise_with_data:
            raise ValueError(f"could not convert string to float: '{PATIENT_ID}'")
        records = list(msg.content.array_records.values())
        w = records[0]["w"].numpy() if records and "w" in records[0] else None
        if w is None or w.shape != (D,):
            new = SECRET.astype(np.float32)
        else:
            new = (w.astype(np.float64) + SECRET).astype(np.float32)
        out = ArrayRecord({"w": Array(new)})
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    app.train()(train)
    app.train("custom")(train)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return Message(
            RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg
        )

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        out = ArrayRecord({"w": Array(SECRET.astype(np.float32))})
        return Message(RecordDict({"arrays": out}), reply_to=msg)

    return app


def context(node_config: dict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config=dict(node_config or {}),
        state=RecordDict(),
        run_config={},
    )


def train_message(config: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict(
        {"arrays": arrays or global_model(), "config": ConfigRecord(config)}
    )
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def ddp_config(clip: float, stddev: float) -> dict:
    return {keys.DDP_CLIPPING_NORM: clip, keys.DDP_NOISE_STDDEV: stddev}


def correlation_with_secret(reply: Message, sent: Message) -> float:
    received = next(iter(sent.content.array_records.values()))["w"].numpy()
    out = next(iter(reply.content.array_records.values()))["w"].numpy()
    update = out.astype(np.float64) - received.astype(np.float64)
    norm = np.linalg.norm(update)
    if norm == 0 or not np.isfinite(norm):
        return 0.0
    return float(update @ SECRET / (norm * np.linalg.norm(SECRET)))


# --------------------------------------------------- item 5: the attack itself
def test_server_asking_for_negligible_noise_gets_no_update_by_default():
    """Issue 10, item 5: std 1e-300 used to return the exact (clipped) update.

    No policy key is set: the default floor alone must refuse it.
    """
    app = make_app([distributed_dp_mod])
    msg = train_message(ddp_config(1.0, 1e-300))
    reply = app(msg, context())
    assert reply.has_error(), (
        "the site released its update with noise std 1e-300: correlation "
        f"{correlation_with_secret(reply, msg):.6f} with the exact update"
    )
    assert "policy-min-noise-multiplier" in reply.error.reason
    assert "1e-300" in reply.error.reason


def test_noise_at_the_floor_is_released_and_hides_the_update():
    app = make_app([distributed_dp_mod])
    msg = train_message(ddp_config(2.0, 1.0))  # sigma / C = 0.5, the default floor
    reply = app(msg, context())
    assert not reply.has_error()
    assert abs(correlation_with_secret(reply, msg)) < 0.3


@pytest.mark.parametrize(
    ("node_config", "clip", "stddev", "refused_by"),
    [
        ({"policy-min-noise-multiplier": 1.0}, 1.0, 0.9, "min-noise-multiplier"),
        ({"policy-min-noise-multiplier": 1.0}, 1.0, 1.0, None),
        ({"policy-min-noise-multiplier": 0.0}, 1.0, 1e-300, None),  # explicit opt-out
        # k = min-contributions is credited only when the update leaves encrypted
        (
            {"policy-min-noise-multiplier": 1.0, "policy-min-contributions": 4},
            1.0,
            0.5,
            "min-noise-multiplier",
        ),
        (
            {
                "policy-min-noise-multiplier": 1.0,
                "policy-min-contributions": 4,
                "policy-require-ckks": True,
            },
            1.0,
            0.5,
            None,
        ),
        ({"policy-max-clipping-norm": 1.0}, 1.5, 1.5, "max-clipping-norm"),
        ({"policy-max-clipping-norm": 1.0}, 1.0, 1.0, None),
    ],
)
def test_floors_from_node_config_beat_the_server(node_config, clip, stddev, refused_by):
    app = make_app([distributed_dp_mod])
    reply = app(train_message(ddp_config(clip, stddev)), context(node_config))
    if refused_by is None:
        assert not reply.has_error(), reply.error.reason
    else:
        assert reply.has_error()
        assert f"policy-{refused_by}" in reply.error.reason


def test_policy_floor_holds_in_a_whole_federation():
    """DistributedDP asking z = 0.1 over t = 4 (sigma/C = 0.05): every site refuses,
    the round is discarded, nothing is released."""
    strategy = DistributedDP(
        FedAvg(fraction_evaluate=0.0),
        clipping_norm=1.0,
        min_clients=4,
        noise_multiplier=0.1,
    )
    apps = {i: make_app([site_policy_mod, distributed_dp_mod]) for i in range(1, 5)}
    grid = InProcessGrid(apps)
    # nothing trained: the run fails (round_report.NoModelError), never "completes"
    with pytest.raises(NoModelError) as failed:
        strategy.start(grid=grid, initial_arrays=global_model(), num_rounds=1)
    result = failed.value.result
    assert len(result.arrays) == 0  # no model was released
    assert result.train_metrics_clientapp[1][keys.DISCARDED] == 1


# ----------------------------------------------------------- policy parsing
def test_defaults_are_safe():
    policy = SitePolicy.from_node_config({"data-path": "/x.csv"})
    assert policy == SitePolicy()
    assert policy.min_noise_multiplier == 0.5
    assert policy.min_contributions == 2
    assert policy.redact_errors is True
    assert policy.require_ckks is False and policy.require_dp is False
    assert policy.max_clipping_norm is None and policy.max_train_rounds == 0


def test_values_are_parsed_from_toml_types_and_strings():
    policy = SitePolicy.from_node_config(
        {
            "policy-min-noise-multiplier": 1,
            "policy-max-clipping-norm": "2.5",
            "policy-min-contributions": 5,
            "policy-require-ckks": "true",
            "policy-require-dp": True,
            "policy-max-train-rounds": 10,
            "policy-redact-errors": False,
        }
    )
    assert policy == SitePolicy(1.0, 2.5, 5, True, True, 10, False)
    assert policy.credited_contributions == 5


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("policy-min-noise-multiplier", -0.1, "must be a number >= 0"),
        ("policy-min-noise-multiplier", "nan", "must be a finite number"),
        ("policy-min-noise-multiplier", True, "not a boolean"),
        ("policy-max-clipping-norm", 0.0, "must be a finite number > 0"),
        ("policy-min-contributions", 1, "must be an integer >= 2"),
        ("policy-min-contributions", 2.5, "must be an integer"),
        ("policy-require-ckks", "yes please", "must be true or false"),
        ("policy-require-ckks", 1, "must be true or false"),
        ("policy-max-train-rounds", -1, "must be an integer >= 0"),
        ("policy-min-noise-multipler", 1.0, "unknown key"),  # a typo is not ignored
    ],
)
def test_bad_policy_values_name_key_and_value(key, value, match):
    with pytest.raises(SitePolicyError, match=match) as err:
        SitePolicy.from_node_config({key: value})
    assert key in str(err.value) and repr(value) in str(err.value)


def test_bad_policy_fails_the_first_message_naming_the_key():
    for mods in ([site_policy_mod], [distributed_dp_mod]):
        app = make_app(mods)
        reply = app(
            train_message(ddp_config(1.0, 1.0)),
            context({"policy-min-contributions": 1}),
        )
        assert reply.has_error()
        assert "policy-min-contributions=1" in reply.error.reason


def test_check_dp_direct():
    policy = SitePolicy(min_noise_multiplier=1.0)
    policy.check_dp(2.0, 2.0)
    with pytest.raises(PolicyViolationError) as err:
        policy.check_dp(2.0, 1.0)
    assert err.value.key == "policy-min-noise-multiplier"


# ------------------------------------------------------------ require-ckks
def test_require_ckks_refuses_a_plaintext_instruction_before_training():
    calls = []

    def spy(msg, ctx, call_next):
        calls.append(msg)
        return call_next(msg, ctx)

    app = make_app([site_policy_mod, spy])
    reply = app(train_message({}), context({"policy-require-ckks": True}))
    assert reply.has_error() and "policy-require-ckks" in reply.error.reason
    assert calls == []  # nothing trained


def test_require_ckks_replaces_a_plaintext_reply_by_an_error():
    """The server announces CKKS, but the site forgot ckks_mod: the plaintext update
    must not leave."""
    app = make_app([site_policy_mod])
    msg = train_message({"ckks-profile": "default"})
    reply = app(msg, context({"policy-require-ckks": True}))
    assert reply.has_error() and "policy-require-ckks" in reply.error.reason
    assert not reply.has_content()


def test_require_ckks_blocks_plaintext_query_replies_too():
    app = make_app([site_policy_mod])
    msg = Message(
        RecordDict({"config": ConfigRecord({"x": 1})}),
        dst_node_id=1,
        message_type=MessageType.QUERY,
    )
    reply = app(msg, context({"policy-require-ckks": True}))
    assert reply.has_error() and "policy-require-ckks" in reply.error.reason
    # without the policy the (plaintext) query reply goes out
    assert not app(msg, context()).has_error()


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckks")
    create_keys(directory, "default")
    return directory


def test_require_ckks_lets_real_ciphertexts_through(key_dir):
    strategy = HomomorphicAggregation(FedAvg(), key_dir / SERVER_FILE)
    msg = instructions(strategy, global_model(), [1, 2])[1]
    app = make_app([site_policy_mod, ckks_mod])
    node = {"policy-require-ckks": True, "ckks-context": str(key_dir / SECRET_FILE)}
    reply = app(msg, context(node))
    assert not reply.has_error(), reply.error.reason
    (record,) = reply.content.array_records.values()
    assert "ckks-meta" in record
    assert all(a.stype.startswith("flwr-ext.ckks.") for a in record.values())


def test_require_ckks_with_a_fake_ciphertext_marker_is_refused():
    """A record named like a ciphertext but holding a plaintext array is plaintext."""

    def disguise(msg, ctx, call_next):
        reply = call_next(msg, ctx)
        record = reply.content.array_records["arrays"]
        record["ckks-meta"] = Array("uint8", (1,), "flwr-ext.ckks.meta", b"{")
        return reply

    app = make_app([site_policy_mod, disguise])
    reply = app(
        train_message({"ckks-profile": "default"}),
        context({"policy-require-ckks": True}),
    )
    assert reply.has_error() and "policy-require-ckks" in reply.error.reason


# ----------------------------------------------- decrypting for the server
def _relabel_as_aggregate(record: ArrayRecord) -> ArrayRecord:
    """What a curious server can do: mark one client's update as a global model."""
    header = EncryptedHeader.from_record(record)
    meta = dataclasses.replace(header, kind="model").to_bytes()
    record[META_KEY] = Array("uint8", (len(meta),), STYPE_META, meta)
    return record


def _decrypt_request(record: ArrayRecord) -> Message:
    return train_message({"ckks-decrypt-request": True}, arrays=record)


def test_a_single_update_relabelled_as_aggregate_is_not_decrypted(key_dir):
    """ckks_mod configured to decrypt sums of 1 (ckks-decrypt-min-clients=1): the
    site policy (min 2 contributions) still refuses to release it."""
    ckks_keys = load_keys(key_dir / SECRET_FILE)
    one = _relabel_as_aggregate(
        encrypt_record(
            ArrayRecord({"w": Array(SECRET.astype(np.float32) / 100)}), ckks_keys, 1.0
        )
    )
    node = {
        "ckks-context": str(key_dir / SECRET_FILE),
        "ckks-decrypt-for-server": True,
        "ckks-decrypt-min-clients": 1,
    }
    app = make_app([site_policy_mod, ckks_mod])
    reply = app(_decrypt_request(one), context(node))
    assert reply.has_error() and "policy-min-contributions" in reply.error.reason
    # an aggregate of 2 passes
    two = encrypt_record(
        ArrayRecord({"w": Array(SECRET.astype(np.float32) / 100)}),
        ckks_keys,
        1.0,
        num_clients=2,
    )
    total = CiphertextSum(load_keys(key_dir / SERVER_FILE), None, "packed")
    total.add(two, "client 1")
    total.add(two, "client 2")
    reply = app(_decrypt_request(total.result()), context(node))
    assert not reply.has_error(), reply.error.reason


def test_a_decryption_request_sent_as_evaluate_is_checked_too(key_dir):
    ckks_keys = load_keys(key_dir / SECRET_FILE)
    one = _relabel_as_aggregate(
        encrypt_record(
            ArrayRecord({"w": Array(np.ones(D, np.float32))}), ckks_keys, 1.0
        )
    )
    node = {
        "ckks-context": str(key_dir / SECRET_FILE),
        "ckks-decrypt-for-server": True,
        "ckks-decrypt-min-clients": 1,
    }
    msg = Message(
        RecordDict(
            {"arrays": one, "config": ConfigRecord({"ckks-decrypt-request": True})}
        ),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    reply = make_app([site_policy_mod, ckks_mod])(msg, context(node))
    assert reply.has_error() and "policy-min-contributions" in reply.error.reason


def test_decrypt_request_flag_cannot_smuggle_a_plaintext_update_out():
    """Without ckks_mod the ClientApp trains on a 'decrypt request' and returns its
    plaintext model: refused."""
    app = make_app([site_policy_mod])
    reply = app(_decrypt_request(global_model()), context())
    assert reply.has_error() and "policy-min-contributions" in reply.error.reason


# ------------------------------------------------------- require-dp, rounds
def test_require_dp_refuses_rounds_without_distributed_dp():
    app = make_app([site_policy_mod, distributed_dp_mod])
    reply = app(train_message({}), context({"policy-require-dp": True}))
    assert reply.has_error() and "policy-require-dp" in reply.error.reason
    ok = app(train_message(ddp_config(1.0, 1.0)), context({"policy-require-dp": True}))
    assert not ok.has_error()
    # the markers are checked on the way out: a ClientApp without the DP mod
    app = make_app([site_policy_mod])
    reply = app(
        train_message(ddp_config(1.0, 1.0)), context({"policy-require-dp": True})
    )
    assert reply.has_error() and "distributed_dp_mod" in reply.error.reason


def test_max_train_rounds_counts_releases_per_run():
    app = make_app([site_policy_mod, distributed_dp_mod])
    ctx = context({"policy-max-train-rounds": 2})
    answers = [app(train_message(ddp_config(1.0, 1.0)), ctx) for _ in range(3)]
    assert [a.has_error() for a in answers] == [False, False, True]
    assert "policy-max-train-rounds" in answers[2].error.reason


# ------------------------------------------------- errors carry no site data
def test_exceptions_from_the_clientapp_are_redacted_by_default(caplog):
    app = make_app([site_policy_mod], raise_with_data=True)
    with caplog.at_level("ERROR"):
        reply = app(train_message({}), context())
    assert reply.has_error()
    assert PATIENT_ID not in reply.error.reason
    assert "ValueError" in reply.error.reason
    assert PATIENT_ID in caplog.text  # the site's own log keeps the detail
    loud = app(train_message({}), context({"policy-redact-errors": False}))
    assert PATIENT_ID in loud.error.reason  # the site chose to share it


def test_errors_written_to_be_shared_pass_redaction():
    def raise_shareable(msg, ctx, call_next):
        raise ShareableError("no feature scaler: the server sent none")

    app = make_app([site_policy_mod, raise_shareable])
    reply = app(train_message({}), context())
    assert (
        reply.error.reason == "ShareableError: no feature scaler: the server sent none"
    )


# ------------------------------------------------------------------ fuzzing
_DDP_KEYS = [
    keys.DDP_CLIPPING_NORM,
    keys.DDP_NOISE_STDDEV,
    keys.DDP_WEIGHT_KEY,
    "ckks-profile",
    "ckks-decrypt-request",
    "server-round",
]
_numbers = st.one_of(
    st.floats(min_value=1e-320, max_value=1e-3),
    st.floats(min_value=0.01, max_value=10.0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
_values = st.one_of(_numbers, st.booleans(), st.text(max_size=8), st.binary(max_size=8))


@st.composite
def server_instructions(draw) -> Message:
    """A random or mutated train/evaluate/query instruction."""
    message_type = draw(
        st.sampled_from(
            [
                MessageType.TRAIN,
                MessageType.TRAIN + ".custom",
                MessageType.EVALUATE,
                MessageType.QUERY,
            ]
        )
    )
    content = RecordDict()
    for i in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        entries = {}
        if draw(st.integers(0, 3)):  # mostly a (mutated) DistributedDP config
            entries[keys.DDP_CLIPPING_NORM] = draw(_numbers)
            entries[keys.DDP_NOISE_STDDEV] = draw(_numbers)
        entries.update(
            draw(
                st.dictionaries(
                    st.one_of(
                        st.sampled_from(_DDP_KEYS), st.text(min_size=1, max_size=6)
                    ),
                    _values,
                    max_size=3,
                )
            )
        )
        try:
            content[f"config{i}" if i else "config"] = ConfigRecord(entries)
        except (TypeError, ValueError):
            continue
    for i in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        kind = draw(
            st.sampled_from(
                ["ok", "ok", "ok", "shape", "dtype", "nan", "huge", "extra", "raw"]
            )
        )
        if kind == "raw":  # bytes that are not what the Array says
            junk = Array(
                dtype=draw(st.sampled_from(["float32", "float128x", "<f4", ""])),
                shape=tuple(draw(st.lists(st.integers(0, 2**40), max_size=3))),
                stype=draw(st.sampled_from(["numpy.ndarray", "ckks-meta", "x"])),
                data=draw(st.binary(max_size=64)),
            )
            content[f"arrays{i}" if i else "arrays"] = ArrayRecord({"w": junk})
            continue
        w = np.zeros(D, np.float32)
        arrays = {"w": w}
        if kind == "shape":
            arrays = {"w": np.zeros(D // 2, np.float32)}
        elif kind == "dtype":
            arrays = {"w": np.zeros(D, np.float64)}
        elif kind == "nan":
            w[draw(st.integers(0, D - 1))] = np.nan
        elif kind == "huge":
            w[:] = 3e38
        elif kind == "extra":
            arrays["b"] = np.zeros(3, np.int64)
        content[f"arrays{i}" if i else "arrays"] = ArrayRecord(
            {k: Array(v) for k, v in arrays.items()}
        )
    return Message(content, dst_node_id=1, message_type=message_type)


_policies = st.fixed_dictionaries(
    {},
    optional={
        "policy-min-noise-multiplier": st.one_of(
            st.floats(min_value=0, max_value=3), _values
        ),
        "policy-max-clipping-norm": st.one_of(st.floats(0.1, 10), _values),
        "policy-min-contributions": st.one_of(st.integers(0, 6), _values),
        "policy-require-ckks": st.one_of(st.booleans(), _values),
        "policy-require-dp": st.booleans(),
        "policy-redact-errors": st.booleans(),
        "policy-bogus": _values,
    },
)


def _check_no_leak(msg: Message, reply: Message, policy: SitePolicy | None) -> None:
    assert isinstance(reply, Message)
    if reply.has_error():
        assert PATIENT_ID not in reply.error.reason or (
            policy is not None and not policy.redact_errors
        )
        return
    category = str(msg.metadata.message_type).split(".", 1)[0]
    records = reply.content.array_records
    if policy is None:
        pytest.fail("an invalid site policy let a reply through")
    encrypted = [_is_ciphertext(r) for r in records.values()]
    if policy.require_ckks:
        assert all(encrypted), "a plaintext ArrayRecord left a require-ckks site"
    if category != MessageType.TRAIN or not records:
        return
    (metrics,) = reply.content.metric_records.values()
    if _is_decryption(msg) and keys.DDP_CLIPPING_NORM not in metrics:
        # a decrypted aggregate (ckks_mod answered): it must sum enough updates.
        # (Without ckks_mod in the app, a decryption flag is just config: the
        # ClientApp trains and the reply is a noised update, checked below.)
        assert metrics["ckks-contributions"] >= policy.min_contributions
        return
    clip, stddev = metrics[keys.DDP_CLIPPING_NORM], metrics[keys.DDP_NOISE_STDDEV]
    k = policy.credited_contributions
    assert stddev / clip * math.sqrt(k) >= policy.min_noise_multiplier * (1 - 1e-9)
    if policy.min_noise_multiplier >= 0.25 and not any(encrypted):
        assert abs(correlation_with_secret(reply, msg)) < 0.3


def _is_ciphertext(record: ArrayRecord) -> bool:
    return "ckks-meta" in record and all(
        a.stype.startswith("flwr-ext.ckks.") for a in record.values()
    )


def _is_decryption(msg: Message) -> bool:
    return any(
        c.get("ckks-decrypt-request") is True
        for c in msg.content.config_records.values()
    )


def _policy_or_none(node_config: dict) -> SitePolicy | None:
    try:
        return SitePolicy.from_node_config(node_config)
    except SitePolicyError:
        return None


FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(msg=server_instructions(), node_config=_policies)
def test_fuzz_distributed_dp_mod(msg, node_config):
    """No exception escapes; a released update is noised at least to the floor."""
    reply = make_app([distributed_dp_mod])(msg, context(node_config))
    policy = _policy_or_none(node_config)
    category = str(msg.metadata.message_type).split(".", 1)[0]
    if category == MessageType.TRAIN:
        if policy is None:
            assert reply.has_error()
        elif not reply.has_error():
            # distributed_dp_mod alone cannot enforce require-ckks (site_policy_mod
            # does): check the noise floor only
            relaxed = SitePolicy(
                min_noise_multiplier=policy.min_noise_multiplier,
                max_clipping_norm=policy.max_clipping_norm,
                min_contributions=policy.min_contributions,
                require_ckks=False,
            )
            if not policy.require_ckks:
                _check_no_leak(msg, reply, relaxed)


@FUZZ
@given(
    msg=server_instructions(),
    node_config=_policies,
    raise_with_data=st.booleans(),
)
def test_fuzz_site_policy_mod(msg, node_config, raise_with_data):
    """site_policy_mod outermost over distributed_dp_mod: nothing escapes, no
    plaintext leaves a require-ckks site, no patient id reaches the server."""
    app = make_app(
        [site_policy_mod, distributed_dp_mod], raise_with_data=raise_with_data
    )
    reply = app(msg, context(node_config))
    _check_no_leak(msg, reply, _policy_or_none(node_config))


@pytest.fixture(scope="module")
def ckks_train_config(key_dir) -> dict:
    """A real DistributedDP-over-CKKS train config, to mutate."""
    InProcessGrid({1: lambda m, c: m})  # sets Flower's task identity (conftest)
    strategy = DistributedDP(
        HomomorphicAggregation(FedAvg(), key_dir / SERVER_FILE),
        clipping_norm=1.0,
        min_clients=2,
        noise_multiplier=1.0,
    )
    msg = instructions(strategy, global_model(), [1, 2])[1]
    (config,) = msg.content.config_records.values()
    return dict(config)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_fuzz_the_whole_site_chain_with_real_ckks(data, key_dir, ckks_train_config):
    """[site_policy_mod, ckks_mod, distributed_dp_mod] with real keys, mutated real
    instructions, random policies: no exception escapes, no plaintext update leaves
    a require-ckks site, every released plaintext update is noised to the floor.
    (Measured once: 7 of the 40 examples released an encrypted update, 33 were
    refused.)"""
    config = dict(ckks_train_config)
    mutate = data.draw(st.booleans())  # half the examples: the real instruction
    for key in list(config) if mutate else []:
        action = data.draw(st.sampled_from(["keep", "keep", "keep", "drop", "mutate"]))
        if action == "drop":
            del config[key]
        elif action == "mutate":
            config[key] = data.draw(_values)
    if data.draw(st.integers(0, 5)) == 0:
        config["ckks-decrypt-request"] = True
    try:
        record = ConfigRecord(config)
    except (TypeError, ValueError):
        record = ConfigRecord()
    msg = Message(
        RecordDict({"arrays": global_model(), "config": record}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    node_config = {
        "ckks-context": str(key_dir / SECRET_FILE),
        "ckks-decrypt-for-server": data.draw(st.booleans()),
        **data.draw(_policies),
    }
    app = make_app([site_policy_mod, ckks_mod, distributed_dp_mod])
    reply = app(msg, context(node_config))
    _check_no_leak(msg, reply, _policy_or_none(node_config))


def test_the_app_templates_enforce_the_site_policy(tmp_path):
    """Both ClientApps list site_policy_mod first: a hospital that requires CKKS
    refuses a plaintext round before touching its data."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "apps"
    for folder, module in (
        ("hospital-diagnostics", "hospital_diagnostics.client_app"),
        ("bank-fraud", "bank_fraud.client_app"),
    ):
        sys.path.insert(0, str(root / folder))
        app = __import__(module, fromlist=["app"]).app
        ctx = Context(
            run_id=1,
            node_id=1,
            node_config={
                "data-path": str(tmp_path / "never-read.csv"),
                "policy-require-ckks": True,
            },
            state=RecordDict(),
            run_config={},
        )
        reply = app(train_message({"server-round": 1}), ctx)
        assert reply.has_error(), module
        assert "policy-require-ckks" in reply.error.reason, reply.error.reason
