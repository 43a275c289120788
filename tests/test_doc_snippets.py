"""Docs that run: every Python block of README.md, docs/*.md and apps/*/README.md.

Each fenced block marked ``python`` (or ``py``) is executed as written against the
installed package. A snippet may assume only the names a ServerApp's ``main`` or a
ClientApp function has at hand, which the fixture provides for real:

``grid``
    A Flower Grid: :class:`flwr_ext.inprocess.InProcessGrid` with 10 nodes running
    one ClientApp that trains a small model. Its mods follow the server: it
    encrypts with the real ``ckks_mod`` when the server announces CKKS and clips
    and noises with the real ``distributed_dp_mod`` when it announces distributed
    DP (each node holds the data owners' secret context).
``arrays``
    The initial model, an ``ArrayRecord`` (float32 ``w`` (4, 3) and ``b`` (3,)).
``context``
    The ServerApp's ``Context``: ``context.run_config`` has
    ``ckks-server-context`` (a real server context) and ``output-dir``.
``msg``
    A real train instruction (FedAvg's, to node 1), for ClientApp-side snippets.
``tmp_path``
    The snippet's working directory, a ``pathlib.Path``.

The working directory is a fresh folder holding ``keys/`` (a real key set, as
``flwr-ext keys create --out keys/`` writes it) and ``results/``.

After a block has run, what it built is exercised: a ``strategy`` it leaves
unused runs one round on ``grid`` (or, when the block defines a ClientApp ``app``
with a train function, on two nodes running that app from ``initial_arrays``),
so a snippet that builds a composition which fails at its first round fails here.
There is no skip list: a block that cannot run as written is a defect of the
docs.
"""

from __future__ import annotations

import re
from pathlib import Path

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
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg, Strategy

from flwr_ext.he import SECRET_FILE, SERVER_FILE, create_keys, save_encrypted_model
from flwr_ext.inprocess import InProcessGrid
from flwr_ext.strategy import HomomorphicAggregation

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "apps").glob("*/README.md")),
]
_FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.S | re.M)
NODES = 10


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """Return ``(first line, code)`` of every Python block in a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, match.start()) + 2, match.group(2))
        for match in _FENCE.finditer(text)
        if match.group(1).lower() in ("python", "py", "python3")
    ]


SNIPPETS = [
    pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}")
    for path in DOCS
    for line, code in python_blocks(path)
]


def test_the_snippets_are_found():
    """Guard against an extraction that silently finds nothing."""
    assert len(SNIPPETS) >= 12
    assert any("secure-aggregation" in p.id for p in SNIPPETS)
    assert any(p.id.startswith("README.md") for p in SNIPPETS)


# ----------------------------------------------------------------- fixture
def initial() -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.zeros((4, 3), np.float32)), "b": Array(np.zeros(3, np.float32))}
    )


def _train(msg: Message, context: Context) -> Message:
    """One local step: the model moves towards a site-specific target."""
    pid = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"]
    out = ArrayRecord(
        {
            key: Array((arrays[key].numpy() + 0.1 * (1 + pid % 3)).astype(np.float32))
            for key in arrays
        }
    )
    metrics = MetricRecord({"num-examples": 10 + pid, "loss": float(pid)})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    return Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 5, "loss": 1.0})}),
        reply_to=msg,
    )


def _announced(msg: Message, prefix: str) -> bool:
    return any(
        any(str(key).startswith(prefix) for key in record)
        for record in msg.content.config_records.values()
    )


def _follow_the_server(msg, context, call_next):
    """Run ckks_mod / distributed_dp_mod when the server's instruction uses them."""
    from flwr_ext.he import is_encrypted
    from flwr_ext.mods import ckks_mod, distributed_dp_mod

    inner = call_next
    if _announced(msg, "ddp-"):

        def inner(m, c):
            return distributed_dp_mod(m, c, call_next)

    encrypted = any(is_encrypted(r) for r in msg.content.array_records.values())
    if _announced(msg, "ckks-") or encrypted:
        return ckks_mod(msg, context, inner)
    return inner(msg, context)


def doc_client_app() -> ClientApp:
    app = ClientApp(mods=[_follow_the_server])
    app.train()(_train)
    app.evaluate()(_evaluate)
    return app


@pytest.fixture
def snippet_namespace(tmp_path, monkeypatch) -> dict:
    keys = create_keys(tmp_path / "keys", "compact")
    (tmp_path / "results").mkdir()
    # threshold CKKS: each simulated site keeps its share in its own file here
    (tmp_path / "shares").mkdir(mode=0o700)
    monkeypatch.setenv("FLWR_EXT_CKKS_THRESHOLD_DIR", str(tmp_path / "shares"))
    monkeypatch.chdir(tmp_path)
    grid = InProcessGrid(
        dict.fromkeys(range(1, NODES + 1), doc_client_app()),
        node_configs={
            n: {
                "partition-id": n - 1,
                "num-partitions": NODES,
                "ckks-context": str(keys.secret),
            }
            for n in range(1, NODES + 1)
        },
    )
    context = Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={
            "ckks-server-context": str(keys.server),
            "output-dir": str(tmp_path / "results"),
        },
    )
    assert (tmp_path / "keys" / SECRET_FILE).exists()
    assert (tmp_path / "keys" / SERVER_FILE).exists()
    msg = next(
        m
        for m in FedAvg().configure_train(1, initial(), ConfigRecord(), grid)
        if m.metadata.dst_node_id == 1
    )
    return {
        "__name__": "doc_snippet",
        "grid": grid,
        "arrays": initial(),
        "context": context,
        "msg": msg,
        "tmp_path": tmp_path,
    }


def _has_train(app: object) -> bool:
    return isinstance(app, ClientApp) and any(
        key.startswith("train") for key in app._registered_funcs
    )


@pytest.mark.parametrize("code", SNIPPETS)
def test_snippet_runs(code: str, snippet_namespace: dict, request) -> None:
    namespace = snippet_namespace
    saved = namespace["tmp_path"] / "results" / "final.ckks-model"
    if "final.ckks-model" in code and "decrypt" in code:
        # A data owner's snippet decrypts what a ServerApp saved: save one first.
        server = namespace["context"].run_config["ckks-server-context"]
        result = HomomorphicAggregation(FedAvg(), server).start(
            grid=namespace["grid"], initial_arrays=initial(), num_rounds=1
        )
        save_encrypted_model(result.arrays, saved)
    exec(compile(code, request.node.callspec.id, "exec"), namespace)

    strategy = namespace.get("strategy")
    if isinstance(strategy, Strategy) and "result" not in namespace:
        app = namespace.get("app")
        if _has_train(app):
            grid = InProcessGrid(
                {1: app, 2: app},
                node_configs={n: {"partition-id": n - 1} for n in (1, 2)},
            )
            start = namespace.get("initial_arrays", namespace["arrays"])
        else:
            grid, start = namespace["grid"], namespace["arrays"]
        result = strategy.start(grid=grid, initial_arrays=start, num_rounds=1)
        assert len(result.arrays) > 0
