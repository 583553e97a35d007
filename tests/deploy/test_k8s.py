"""Kubernetes manifests from a topology, validated against the official client's API models."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from deploy.cli import main
from deploy.k8s import manifests
from deploy.security import generate_keys
from deploy.topology import load_topology, parse_topology

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes client is in the dev extra")

MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Service"): "V1Service",
    ("v1", "Secret"): "V1Secret",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
}


def validate(obj: dict[str, Any]) -> None:
    """Deserialize into the API model (required fields, types) and check that nothing was
    lost on the way back, which catches misspelled or misplaced keys."""
    client = kubernetes.client.ApiClient()
    model = client._ApiClient__deserialize(obj, MODELS[(obj["apiVersion"], obj["kind"])])
    again = client.sanitize_for_serialization(model)
    assert again == obj


def test_default_topology_manifests_validate() -> None:
    topology = load_topology("default")
    objects = manifests(topology, image="registry.example/trigfarm:1", namespace="tf")
    for obj in objects:
        validate(obj)
    sets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "StatefulSet"}
    assert set(sets) == {"source", "l1", "hlt", "archive", "hlt-rendezvous"}
    rendezvous = sets["hlt-rendezvous"]["spec"]["template"]["spec"]["containers"][0]
    assert rendezvous["command"][:2] == ["trigfarm", "rendezvous"]
    assert rendezvous["livenessProbe"]["tcpSocket"] == {"port": 29400}
    assert sets["hlt"]["spec"]["replicas"] == 2
    annotations = sets["l1"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    claims = sets["archive"]["spec"]["volumeClaimTemplates"]
    assert claims[0]["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert "volumeClaimTemplates" not in sets["hlt"]["spec"]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    assert services["hlt"]["spec"]["clusterIP"] == "None"
    command = sets["hlt"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "trigfarm node hlt" in command and "--index ${HOSTNAME##*-}" in command


@pytest.mark.parametrize(("interval_s", "stall_s"), [(0.5, 60.0), (2.0, 7.0)])
def test_the_kubelet_expires_a_silent_pod_after_stall_after_s(
    interval_s: float, stall_s: float
) -> None:
    default = load_topology("default")
    farm = replace(default.farm, heartbeat_interval_s=interval_s, stall_after_s=stall_s)
    topology = replace(default, farm=farm)
    for obj in manifests(topology, namespace="tf"):
        if obj["kind"] != "StatefulSet" or obj["metadata"]["name"].endswith("-rendezvous"):
            continue
        validate(obj)
        container = obj["spec"]["template"]["spec"]["containers"][0]
        live, start = container["livenessProbe"], container["startupProbe"]
        for probe in (live, start):
            assert probe["httpGet"] == {"path": "/metrics", "port": 9100}
        period = live["periodSeconds"]
        assert period == max(1, interval_s)  # a heartbeat interval, at the kubelet's floor
        # silent for stall_after_s (rounded up to a whole probe period), then restarted
        assert stall_s <= period * live["failureThreshold"] < stall_s + period
        assert start["periodSeconds"] * start["failureThreshold"] >= 180


def test_cluster_topology_is_a_valid_topology() -> None:
    objects = manifests(load_topology("default"), namespace="tf")
    text = next(o for o in objects if o["kind"] == "ConfigMap")["data"]["topology.toml"]
    inside = parse_topology(tomllib.loads(text))
    hlt = inside.stage("hlt")
    assert hlt.hosts == ("hlt-0.hlt.tf.svc", "hlt-1.hlt.tf.svc")
    assert hlt.port > 0 and hlt.bind == "0.0.0.0"
    assert inside.stage("source").config["signal"] == ["wprime"]
    # the flows' averaging rendezvous is a pod of its own, so any HLT pod may restart
    assert inside.stage("hlt").learner == {
        "average_every_steps": 10,
        "average_address": "tcp://hlt-rendezvous-0.hlt-rendezvous.tf.svc:29400",
        "average_store": "external",
    }


def test_curve_keys_go_into_one_secret_per_stage(tmp_path: Path) -> None:
    topology = load_topology("multihost")
    generate_keys(tmp_path, topology.farm.chain)
    import dataclasses

    topology = dataclasses.replace(
        topology, security=dataclasses.replace(topology.security, keys_dir=str(tmp_path))
    )
    objects = manifests(topology)
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    assert set(secrets) == {f"trigfarm-keys-{s}" for s in topology.farm.chain}
    held = secrets["trigfarm-keys-hlt"]["stringData"]
    assert "hlt.key_secret" in held and "l1.key_secret" not in held and "l1.key" in held
    for obj in objects:
        validate(obj)


def test_cli_writes_one_file_per_object(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["deploy", "k8s", "--topology", "default", "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 2 + 2 * 4 + 2  # and the HLT stage's rendezvous
