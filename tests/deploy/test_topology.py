"""Topology files: shipped ones load, and every mistake names the bad key."""

from __future__ import annotations

import pytest

from deploy.topology import SHIPPED, TopologyError, load_topology, parse_topology
from tests.deploy.conftest import synthetic_table


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_topologies_load(name: str) -> None:
    topology = load_topology(name)
    assert topology.stages[0].name == topology.farm.chain[0]
    assert all(stage.count >= 1 for stage in topology.stages)


def test_default_is_one_source_one_l1_two_hlt_one_archive() -> None:
    topology = load_topology()
    counts = {s.name: (s.role, s.count) for s in topology.stages}
    assert counts == {
        "source": ("source", 1),
        "l1": ("l1", 1),
        "hlt": ("hlt", 2),
        "archive": ("archive", 1),
    }
    assert topology.stage("hlt").learner is not None
    assert not topology.security.curve
    assert topology.metrics.host == "127.0.0.1"


def test_values_are_typed_and_frozen() -> None:
    topology = parse_topology(synthetic_table())
    relay = topology.stage("relay")
    assert relay.count == 2 and relay.hosts == ("127.0.0.1",)
    assert relay.node_names() == ["relay-0", "relay-1"]
    with pytest.raises(AttributeError):
        relay.count = 3  # type: ignore[misc]


def _mutate(path: tuple[str, ...], value: object) -> dict:
    table = synthetic_table()
    target = table
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = value
    return table


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("relay", "threads"), "x", "topology.relay.threads: expected int, got 'x'"),
        (("relay", "count"), 0, "topology.relay.count: must be >= 1, got 0"),
        (("relay", "count"), 1.5, "topology.relay.count: expected int, got 1.5"),
        (("relay", "colour"), "red", "topology.relay.colour: unknown key"),
        (("relay", "role"), "l3", "topology.relay.role: unknown role 'l3'"),
        (("relay", "hosts"), ["a", "b", "c"], "topology.relay.hosts: needs 1 or count=2"),
        (("relay", "port"), 65535, "topology.relay.port: must leave 2 ports"),
        (
            ("farm", "heartbeat_interval_s"),
            "fast",
            "topology.farm.heartbeat_interval_s: expected float",
        ),
        (("farm", "drain_idle_s"), 0, "topology.farm.drain_idle_s: must be > 0"),
        (("farm", "chain"), ["source", "source"], "topology.farm.chain: names a stage twice"),
        (("security", "curve"), "yes", "topology.security.curve: expected bool, got 'yes'"),
        (("metrics", "base_port"), 70000, "topology.metrics.base_port: must be in [0, 65535]"),
        (("extra",), {"count": 1}, "topology.extra: unknown key; add it to topology.farm.chain"),
        (("relay", "learner"), {}, "topology.relay.learner: role 'relay' takes no learner"),
    ],
)
def test_errors_name_the_bad_key(path: tuple[str, ...], value: object, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(_mutate(path, value))
    assert str(info.value).startswith(message), str(info.value)


def test_missing_stage_table_and_wrong_order() -> None:
    table = synthetic_table()
    del table["sink"]
    with pytest.raises(TopologyError, match=r"^topology\.sink: missing table"):
        parse_topology(table)
    table = synthetic_table()
    table["farm"]["chain"] = ["relay", "source", "sink"]
    with pytest.raises(TopologyError, match=r"^topology\.relay\.role: the first stage"):
        parse_topology(table)


def test_deep_validation_checks_role_configs() -> None:
    bad_type = _mutate(("source", "config", "batch_size"), "big")
    with pytest.raises(TopologyError, match=r"^topology\.source\.config\.batch_size: expected int"):
        parse_topology(bad_type, deep=True)
    unknown = _mutate(("source", "config", "colour"), 1)
    with pytest.raises(TopologyError, match=r"^topology\.source\.config\.colour: unknown key"):
        parse_topology(unknown, deep=True)
    bad_value = _mutate(("source", "config", "events"), 0)
    with pytest.raises(TopologyError, match=r"^topology\.source\.config: events and batch_size"):
        parse_topology(bad_value, deep=True)
    parse_topology(unknown)  # shallow loading leaves role configs to the node processes


def test_real_source_config_is_validated() -> None:
    table = load_topology("default")
    assert table.stage("source").config["signal"] == ["wprime"]
    from deploy.roles import ROLES

    with pytest.raises(TopologyError, match=r"signal_fraction must be in \[0, 1\)"):
        ROLES["source"].make_config(
            {"signal": ["wprime"], "signal_fraction": 2.0}, "topology.source.config"
        )


def test_unreadable_files_are_named(tmp_path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[farm\n")
    with pytest.raises(TopologyError, match="not valid TOML"):
        load_topology(bad)


def test_with_changes_overrides_stage_fields() -> None:
    topology = load_topology("default").with_changes(
        hlt={"count": 4}, source={"config": {"max_events": 10}}
    )
    assert topology.stage("hlt").count == 4
    assert topology.stage("source").config["max_events"] == 10
    assert topology.stage("source").config["signal"] == ["wprime"]
