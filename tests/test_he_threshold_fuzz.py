"""Hostile input against threshold CKKS, both ways (hypothesis, bounded examples).

Replies to the server (encrypted updates, public shares, partial decryptions) and
instructions to a site (key generation, train, decrypt) are mutated at random:
nothing may raise out of the strategy or the mod, a bad reply costs only itself,
and a site never answers with anything but its protocol reply or an error.
"""

from __future__ import annotations

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

from flwr_ext.he.threshold import ThresholdContext
from flwr_ext.he.threshold_protocol import (
    KEY_CONTRIBUTIONS,
    KEY_KEYSET,
    KEY_OP,
    KEY_ROUND,
    KEY_SEED,
    OPS,
    decode_update,
    read_residue_record,
)
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.mods import ckks_mod
from flwr_ext.strategy import ThresholdHomomorphicAggregation

FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _model() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(50, np.float32))})


def _app() -> ClientApp:
    app = ClientApp(mods=[ckks_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        out = ArrayRecord({"w": Array(np.ones(50, np.float32))})
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    return app


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("threshold-fuzz")
    configs = {}
    for node in (1, 2, 3):
        (root / f"site{node}").mkdir()
        configs[node] = {
            "partition-id": node - 1,
            "ckks-threshold-dir": str(root / f"site{node}"),
        }
    grid = InProcessGrid({n: _app() for n in (1, 2, 3)}, node_configs=configs)
    strategy = ThresholdHomomorphicAggregation(FedAvg())
    strategy.setup(grid)
    instructions = list(strategy.configure_train(1, _model(), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(instructions))
    return strategy, grid, instructions, replies


_arrays = st.builds(
    lambda dtype, shape, data: Array(
        dtype=dtype, shape=shape, stype="numpy.ndarray", data=data
    ),
    st.sampled_from(["uint8", "uint64", "float32", "<u8", "|u1", "object", "x"]),
    st.lists(st.integers(-3, 2**31 - 1), max_size=3).map(tuple),  # proto: int32
    st.binary(max_size=300),
)


@FUZZ
@given(
    index=st.integers(0, 2),
    name=st.sampled_from(["ckks-threshold-meta", "ct-00000", "ct-00001", "other"]),
    replacement=_arrays,
    drop=st.booleans(),
)
def test_mutated_encrypted_replies_never_crash_the_server(
    federation, index, name, replacement, drop
):
    strategy, _, _, replies = federation
    fresh = [Message(RecordDict(dict(r.content)), metadata=r.metadata) for r in replies]
    record = ArrayRecord(dict(fresh[index].content["arrays"]))
    if drop and name in record:
        del record[name]
    else:
        record[name] = replacement
    fresh[index].content["arrays"] = record
    arrays, metrics = strategy.aggregate_train(1, fresh)
    assert metrics is not None and metrics["ckks-summed"] >= 2
    if arrays is not None:
        values = arrays["w"].numpy()
        assert values.dtype == np.float32 and np.isfinite(values).all()


@FUZZ
@given(
    meta=st.one_of(
        st.binary(max_size=200),
        st.sampled_from(
            [b"[]", b"null", b'"x"', b'{"keyset": 1e400}', b"[" * 5000, b"{}"]
        ),
    )
)
def test_update_metadata_parsing_is_total(meta):
    context = ThresholdContext()
    record = ArrayRecord(
        {
            "ckks-threshold-meta": Array(np.frombuffer(meta or b"x", np.uint8).copy()),
            "ct-00000": Array(np.zeros(10, np.uint8)),
        }
    )
    from flwr_ext.he.threshold import ThresholdError

    with pytest.raises(ThresholdError):
        decode_update(context, record, expected_values=52)


@FUZZ
@given(
    op=st.one_of(
        st.sampled_from(list(OPS)),
        st.text(max_size=5),
        st.integers(-(2**63), 2**63 - 1),
    ),
    keyset=st.one_of(st.just("0" * 32), st.text(max_size=40), st.integers(0, 9)),
    seed=st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=40)),
    server_round=st.one_of(st.integers(-5, 10**6), st.floats(), st.booleans()),
    contributions=st.one_of(st.integers(-5, 10**6), st.text(max_size=3)),
    arrays=st.dictionaries(
        st.sampled_from(["c1-00000", "c1-00001", "x"]), _arrays, max_size=2
    ),
)
def test_hostile_instructions_get_an_answer_or_an_error(
    federation, op, keyset, seed, server_round, contributions, arrays
):
    _, grid, _, _ = federation
    content = RecordDict(
        {
            "config": ConfigRecord(
                {
                    KEY_OP: op,
                    KEY_KEYSET: keyset,
                    KEY_SEED: seed,
                    KEY_ROUND: server_round,
                    KEY_CONTRIBUTIONS: contributions,
                }
            ),
            "c1": ArrayRecord(arrays),
        }
    )
    message = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    (answer,) = grid.send_and_receive([message])
    if not answer.has_error():
        # only a valid keygen can succeed here (no valid c1 arrays are generated)
        assert op == "keygen" and len(seed) == 32
        assert set(answer.content.array_records) == {"public-share"}


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, (1 << 60) - 1), min_size=0, max_size=40).filter(
        lambda v: len(v) % 2 == 0
    )
)
def test_60_bit_packing_round_trips(values):
    from flwr_ext.he.threshold_protocol import pack_residues, unpack_residues

    array = np.array(values, dtype=np.uint64)
    packed = pack_residues(array)
    assert packed.nbytes == 15 * len(values) // 2
    np.testing.assert_array_equal(unpack_residues(packed.tobytes(), len(values)), array)


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=64), count=st.integers(-3, 40))
def test_60_bit_unpacking_refuses_wrong_lengths(data, count):
    from flwr_ext.he.threshold import ThresholdError
    from flwr_ext.he.threshold_protocol import unpack_residues

    if count >= 0 and count % 2 == 0 and len(data) == 15 * count // 2:
        assert unpack_residues(data, count).max(initial=0) < 1 << 60
    else:
        with pytest.raises(ThresholdError):
            unpack_residues(data, count)


@FUZZ
@given(replacement=_arrays)
def test_residue_records_refuse_anything_but_residues(replacement):
    context = ThresholdContext()
    from flwr_ext.he.threshold import ThresholdError

    with pytest.raises(ThresholdError):
        read_residue_record(
            context, ArrayRecord({"h-00000": replacement}), "h", expected=1
        )
