"""Topology files: shipped ones load, and every mistake names the bad key."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from deploy.cli import main
from deploy.roles import ROLES
from deploy.topology import SHIPPED, TopologyError, fill_config, load_topology, parse_topology
from nodes.learner import FlowLearnerConfig
from tests.deploy.conftest import synthetic_table, write_topology


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
        (("relay", "hosts"), ["a", 5], "topology.relay.hosts[1]: expected str, got 5"),
        (("relay", "hosts"), 5, "topology.relay.hosts: expected a list, got 5"),
        (("relay", "config"), 5, "topology.relay.config: expected a table, got 5"),
        (("relay", "drop_when_full"), 1, "topology.relay.drop_when_full: expected bool, got 1"),
        (("relay", "port"), -1, "topology.relay.port: must be in [0, 65535], got -1"),
        (("farm", "name"), 3, "topology.farm.name: expected str, got 3"),
        (("farm", "chain"), [], "topology.farm.chain: needs at least one stage"),
        (("farm", "chain"), ["source", 1], "topology.farm.chain[1]: expected str, got 1"),
        (("farm", "sndhwm"), "1", "topology.farm.sndhwm: expected int, got '1'"),
        (("farm", "colour"), "red", "topology.farm.colour: unknown key; known: ["),
        (("security",), 1, "topology.security: expected a table, got 1"),
    ],
)
def test_errors_name_the_bad_key(path: tuple[str, ...], value: object, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(_mutate(path, value), roles=ROLES)
    assert str(info.value).startswith(message), str(info.value)


def test_missing_stage_table_and_wrong_order() -> None:
    table = synthetic_table()
    del table["sink"]
    with pytest.raises(TopologyError, match=r"^topology\.sink: missing table"):
        parse_topology(table)
    table = synthetic_table()
    table["farm"]["chain"] = ["relay", "source", "sink"]
    with pytest.raises(TopologyError, match=r"^topology\.relay\.role: the first stage"):
        parse_topology(table, roles=ROLES)


def test_deep_validation_checks_role_configs() -> None:
    bad_type = _mutate(("source", "config", "batch_size"), "big")
    with pytest.raises(TopologyError, match=r"^topology\.source\.config\.batch_size: expected int"):
        parse_topology(bad_type, roles=ROLES, deep=True)
    unknown = _mutate(("source", "config", "colour"), 1)
    with pytest.raises(TopologyError, match=r"^topology\.source\.config\.colour: unknown key"):
        parse_topology(unknown, roles=ROLES, deep=True)
    bad_value = _mutate(("source", "config", "events"), 0)
    with pytest.raises(
        TopologyError, match=r"^topology\.source\.config\.events: must be >= 1, got 0$"
    ):
        parse_topology(bad_value, roles=ROLES, deep=True)
    # shallow loading leaves role configs to the node processes
    parse_topology(unknown, roles=ROLES)


def test_real_source_config_is_validated() -> None:
    table = load_topology("default")
    assert table.stage("source").config["signal"] == ["wprime"]

    with pytest.raises(
        TopologyError,
        match=r"^topology\.source\.config\.signal_fraction: must be < 1\.0, got 2\.0$",
    ):
        ROLES["source"].make_config(
            {"signal": ["wprime"], "signal_fraction": 2.0}, "topology.source.config"
        )
    with pytest.raises(
        TopologyError, match=r"^topology\.source\.config\.signal\[1\]: component 'higgs' is neither"
    ):
        ROLES["source"].make_config({"signal": ["wprime", "higgs"]}, "topology.source.config")
    for spec in ("wprime?m_x_gev=-5", {"process": "wprime", "m_x_gev": -5.0}):
        with pytest.raises(TopologyError) as info:
            ROLES["source"].make_config({"signal": [spec]}, "topology.source.config")
        assert (
            str(info.value) == "topology.source.config.signal[0].m_x_gev: must be > 0.0, got -5.0"
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


def test_values_keep_their_types() -> None:
    table = synthetic_table()
    table["farm"]["heartbeat_interval_s"] = 1  # an int is a float
    farm = parse_topology(table).farm
    assert farm.heartbeat_interval_s == 1.0 and isinstance(farm.heartbeat_interval_s, float)
    assert farm.chain == ("source", "relay", "sink")


def test_a_missing_farm_key_is_named() -> None:
    table = synthetic_table()
    del table["farm"]["name"]
    with pytest.raises(TopologyError, match=r"^topology\.farm\.name: missing$"):
        parse_topology(table)


def test_roles_are_checked_only_against_the_registry_given() -> None:
    table = _mutate(("relay", "role"), "l3")
    assert parse_topology(table).stage("relay").role == "l3"  # the structure alone is fine
    with pytest.raises(TopologyError, match=r"^topology\.relay\.role: unknown role 'l3'"):
        parse_topology(table, roles=ROLES)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            {"tag_thresholds": {"w": "high"}},
            "topology.hlt.config.tag_thresholds.w: expected float, got 'high'",
        ),
        ({"anomaly_threshold": "x"}, "topology.hlt.config.anomaly_threshold: expected float"),
        ({"batch_size": True}, "topology.hlt.config.batch_size: expected int, got True"),
    ],
)
def test_role_config_errors_name_the_nested_key(table: dict, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        ROLES["hlt"].make_config(table, "topology.hlt.config")
    assert str(info.value).startswith(message), str(info.value)


def test_learner_tables_are_validated_deeply() -> None:
    table = load_topology("default")
    hlt = table.stage("hlt")
    assert hlt.learner is not None
    bad = {**hlt.learner, "signal_region_gev": [3300.0, "x"]}
    with pytest.raises(
        TopologyError, match=r"^topology\.hlt\.learner\.signal_region_gev\[1\]: expected float"
    ):
        ROLES["hlt"].check(
            table.with_changes(hlt={"learner": bad}).stage("hlt"), "topology.hlt", deep=True
        )


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"buffer_size": 0}, "topology.hlt.learner.buffer_size: must be >= 1, got 0"),
        ({"average_decay": 1}, "topology.hlt.learner.average_decay: must be < 1.0, got 1"),
        (
            {"average_store": "rank0"},
            "topology.hlt.learner.average_store: must be 'node0' or 'external', got 'rank0'",
        ),
        (
            {"average_address": "tcp://hlt-0"},
            "topology.hlt.learner.average_address: must name a host and a port, got 'tcp://hlt-0'",
        ),
        ({"buffer_size": 16}, "topology.hlt.learner: batch_size 256 exceeds buffer_size 16"),
    ],
)
def test_config_values_are_named_in_one_line(table: dict, message: str) -> None:
    """The config dataclass's own pydantic checks, after the table's types."""
    with pytest.raises(TopologyError) as info:
        fill_config(FlowLearnerConfig, table, "topology.hlt.learner")
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("events", 0, "must be >= 1, got 0"),
        ("batch_size", 0, "must be >= 1, got 0"),
        ("rate_hz", -1.0, "must be >= 0.0, got -1.0"),
    ],
)
def test_synthetic_source_values_are_named(key: str, value: object, problem: str) -> None:
    with pytest.raises(TopologyError) as info:
        ROLES["synthetic-source"].make_config({key: value}, "topology.source.config")
    assert str(info.value) == f"topology.source.config.{key}: {problem}"


def test_with_changes_validates_the_changed_fields() -> None:
    topology = load_topology("default")
    with pytest.raises(TopologyError, match=r"^topology\.hlt\.count: must be >= 1, got 0"):
        topology.with_changes(hlt={"count": 0})
    with pytest.raises(TopologyError, match=r"^topology\.farm: no such stage"):
        topology.with_changes(farm={"stall_after_s": 1.0})


@pytest.mark.parametrize("command", [["run", "--topology"], ["node", "relay", "--config"]])
@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (("relay", "count"), "two", "topology.relay.count"),
        (("farm", "linger_s"), -1.0, "topology.farm.linger_s"),
        (("relay", "role"), "l3", "topology.relay.role"),
    ],
)
def test_the_cli_prints_one_line_naming_the_key(
    tmp_path, command: list[str], path: tuple[str, ...], value: object, key: str
) -> None:
    topology = write_topology(tmp_path / "t.toml", _mutate(path, value))
    result = CliRunner().invoke(main, [*command, str(topology)])
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert result.output.strip().splitlines()[-1].startswith(f"Error: {key}: "), result.output
