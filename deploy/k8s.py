"""Kubernetes manifests for a topology: a StatefulSet and headless Service per stage.

Each stage is a StatefulSet, so node ``i`` of stage ``hlt`` is the pod ``hlt-<i>`` with
the stable name ``hlt-<i>.hlt``: PUSH/PULL fan-in needs every downstream node to connect
to each upstream node by name, which a Deployment's interchangeable pods cannot give.
Pods run ``trigfarm node <stage> --index <ordinal>`` on a ConfigMap copy of the topology
whose hosts are rewritten to those names. The archive stage keeps its output on a
PersistentVolumeClaim per pod (``volumeClaimTemplates``). Pods carry the
``prometheus.io/scrape`` annotations; metrics listen on 0.0.0.0 inside the pod network.
The kubelet does in the cluster what ``trigfarm run`` does on one host: it polls each
node's metrics endpoint every heartbeat interval and restarts a pod that has not answered
for ``stall_after_s`` (stopped, hung or dead), once the pod has started.
With CURVE on, each stage's Secret holds its own secret key and every public key.
A stage whose learners average their flows gets a rendezvous pod (``<stage>-rendezvous``,
``trigfarm rendezvous``) hosting the averaging store, so that any of its pods may die and,
restarted, rejoin the group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deploy.roles import ROLES
from deploy.security import key_paths
from deploy.topology import FarmSettings, Topology, TopologyError

METRICS_PORT = 9100
RENDEZVOUS_PORT = 29400  # the averaging store of a learning stage (``trigfarm rendezvous``)
DEFAULT_BASE_PORT = 5550
TOPOLOGY_MOUNT = "/etc/trigfarm"
KEYS_MOUNT = "/etc/trigfarm/keys"
DATA_MOUNT = "/data"
LABEL = "app.kubernetes.io/name"
#: How long a pod may take to serve metrics after it starts (TensorFlow and torch imports,
#: model loading), as ``trigfarm run`` waits for its nodes (``start_timeout_s``).
START_TIMEOUT_S = 180


def _k8s_topology_toml(topology: Topology, namespace: str) -> str:
    """The topology as seen inside the cluster: pod DNS names, fixed ports, mounted keys."""
    lines = [
        "[farm]",
        f"name = {json.dumps(topology.farm.name)}",
        f"chain = {json.dumps(list(topology.farm.chain))}",
        f"heartbeat_interval_s = {topology.farm.heartbeat_interval_s}",
        f"drain_idle_s = {topology.farm.drain_idle_s}",
        f"stall_after_s = {topology.farm.stall_after_s}",
        f"sndhwm = {topology.farm.sndhwm}",
        f"rcvhwm = {topology.farm.rcvhwm}",
        "",
        "[security]",
        f"curve = {json.dumps(topology.security.curve)}",
        f"keys_dir = {json.dumps(KEYS_MOUNT)}",
        "",
        "[metrics]",
        'host = "0.0.0.0"',
        f"base_port = {METRICS_PORT}",
        "",
    ]
    for k, stage in enumerate(topology.stages):
        port = stage.port or DEFAULT_BASE_PORT + 10 * k
        hosts = [f"{stage.name}-{i}.{stage.name}.{namespace}.svc" for i in range(stage.count)]
        lines += [
            f"[{stage.name}]",
            f"role = {json.dumps(stage.role)}",
            f"count = {stage.count}",
            f"threads = {stage.threads}",
            f"hosts = {json.dumps(hosts)}",
            'bind = "0.0.0.0"',
            f"port = {port}",
            f"drop_when_full = {json.dumps(stage.drop_when_full)}",
            f"max_queue_batches = {stage.max_queue_batches}",
            f"config = {_inline(stage.config)}",
        ]
        if stage.learner is not None:
            learner = dict(stage.learner)
            if learner.get("average_every_steps"):
                # The averaging rendezvous is a pod of its own (``trigfarm rendezvous``), so
                # that any HLT pod may die and, restarted, rejoin the group.
                learner["average_address"] = (
                    f"tcp://{_rendezvous_host(stage.name, namespace)}:{RENDEZVOUS_PORT}"
                )
                learner["average_store"] = "external"
            lines.append(f"learner = {_inline(learner)}")
        lines.append("")
    return "\n".join(lines)


def _headless_service(
    name: str, namespace: str, labels: dict[str, str], ports: list[dict[str, Any]]
) -> dict[str, Any]:
    """A headless Service (stable pod names) exposing the containers' ``ports``."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "clusterIP": "None",
            "selector": labels,
            "ports": [
                {"name": p["name"], "port": p["containerPort"], "targetPort": p["containerPort"]}
                for p in ports
            ],
        },
    }


def _rendezvous_host(stage: str, namespace: str) -> str:
    name = f"{stage}-rendezvous"
    return f"{name}-0.{name}.{namespace}.svc"


def _rendezvous(stage: str, image: str, namespace: str) -> list[dict[str, Any]]:
    """The averaging store of ``stage``: a one-pod StatefulSet running ``trigfarm
    rendezvous`` and its headless Service, restarted by the kubelet if it stops
    answering on its port."""
    name = f"{stage}-rendezvous"
    labels = {LABEL: "trigfarm", "trigfarm/stage": name}
    port = {"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}
    probe = {"tcpSocket": {"port": RENDEZVOUS_PORT}, "periodSeconds": 5, "failureThreshold": 3}
    container = {
        "name": "rendezvous",
        "image": image,
        "command": ["trigfarm", "rendezvous", "--listen", f"tcp://0.0.0.0:{RENDEZVOUS_PORT}"],
        "ports": [port],
        "livenessProbe": probe,
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
    }
    return [
        _headless_service(name, namespace, labels, [port]),
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "serviceName": name,
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [container]},
                },
            },
        },
    ]


def _probes(farm: FarmSettings) -> dict[str, Any]:
    """Liveness: the metrics endpoint polled every heartbeat interval (the kubelet's floor is
    1 s), the pod restarted after ``stall_after_s`` without an answer; it starts counting
    once the startup probe has seen the endpoint answer, within ``START_TIMEOUT_S``."""
    period = max(1, math.ceil(farm.heartbeat_interval_s))
    check = {"httpGet": {"path": "/metrics", "port": METRICS_PORT}, "timeoutSeconds": period}
    return {
        "startupProbe": {
            **check,
            "periodSeconds": period,
            "failureThreshold": math.ceil(START_TIMEOUT_S / period),
        },
        "livenessProbe": {
            **check,
            "periodSeconds": period,
            "failureThreshold": max(1, math.ceil(farm.stall_after_s / period)),
        },
    }


def _inline(table: Any) -> str:
    """A TOML inline value (JSON scalars and arrays are valid TOML; tables are rewritten)."""
    if isinstance(table, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_inline(v)}" for k, v in table.items()) + "}"
    if isinstance(table, list | tuple):
        return "[" + ", ".join(_inline(v) for v in table) + "]"
    return json.dumps(table)


def manifests(
    topology: Topology,
    *,
    image: str = "trigfarm:latest",
    namespace: str = "trigfarm",
    archive_storage: str = "10Gi",
) -> list[dict[str, Any]]:
    """All objects (plain dicts in API form) to run ``topology`` on a cluster.

    Raises:
        TopologyError: CURVE is on but a stage's key files are missing.
    """
    topo_text = _k8s_topology_toml(topology, namespace)
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "trigfarm-topology", "namespace": namespace},
            "data": {"topology.toml": topo_text},
        },
    ]
    for k, stage in enumerate(topology.stages):
        role = ROLES[stage.role]
        port = stage.port or DEFAULT_BASE_PORT + 10 * k
        labels = {LABEL: "trigfarm", "trigfarm/stage": stage.name}
        # A stage's nodes bind port + i: their outputs, or an archive's receipts.
        kind = "data" if role.output_port is not None else "receipts"
        data_ports = (
            [{"name": f"{kind}-{i}", "containerPort": port + i} for i in range(stage.count)]
            if role.output_port is not None or role.stores_records
            else []
        )
        metrics_port = {"name": "metrics", "containerPort": METRICS_PORT}
        objects.append(
            _headless_service(stage.name, namespace, labels, [*data_ports, metrics_port])
        )
        volumes: list[dict[str, Any]] = [
            {"name": "topology", "configMap": {"name": "trigfarm-topology"}}
        ]
        mounts: list[dict[str, Any]] = [
            {"name": "topology", "mountPath": TOPOLOGY_MOUNT + "/topology"}
        ]
        if topology.security.curve:
            objects.append(_key_secret(topology, stage.name, namespace))
            volumes.append(
                {
                    "name": "keys",
                    "secret": {"secretName": f"trigfarm-keys-{stage.name}", "defaultMode": 0o400},
                }
            )
            mounts.append({"name": "keys", "mountPath": KEYS_MOUNT, "readOnly": True})
        mounts.append({"name": "data", "mountPath": DATA_MOUNT})
        command = (
            f"exec trigfarm node {stage.name} --config {TOPOLOGY_MOUNT}/topology/topology.toml "
            f"--index ${{HOSTNAME##*-}} --out {DATA_MOUNT} --metrics-port {METRICS_PORT} "
            "--metrics-host 0.0.0.0"
        )
        container = {
            "name": "node",
            "image": image,
            "command": ["/bin/sh", "-c", command],
            "ports": [*data_ports, metrics_port],
            "volumeMounts": mounts,
            **_probes(topology.farm),
            "resources": {
                "requests": {"cpu": f"{stage.threads * 500}m", "memory": "1Gi"},
                "limits": {"cpu": str(stage.threads), "memory": "4Gi"},
            },
        }
        spec: dict[str, Any] = {
            "serviceName": stage.name,
            "replicas": stage.count,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "terminationGracePeriodSeconds": 120,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        }
        if role.out_dir_key:
            spec["volumeClaimTemplates"] = [
                {
                    "metadata": {"name": "data"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": archive_storage}},
                    },
                }
            ]
        else:
            volumes.append({"name": "data", "emptyDir": {}})
        objects.append(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": stage.name, "namespace": namespace, "labels": labels},
                "spec": spec,
            }
        )
        if (stage.learner or {}).get("average_every_steps"):
            objects += _rendezvous(stage.name, image, namespace)
    return objects


def _key_secret(topology: Topology, stage: str, namespace: str) -> dict[str, Any]:
    keys_dir = topology.keys_dir()
    data = {}
    _, secret = key_paths(keys_dir, stage)
    files = [secret] + [key_paths(keys_dir, s.name)[0] for s in topology.stages]
    for path in files:
        if not path.is_file():
            raise TopologyError(
                key="topology.security.keys_dir",
                problem=f"{path} is missing; run trigfarm keys first",
            )
        data[path.name] = path.read_text()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": f"trigfarm-keys-{stage}", "namespace": namespace},
        "type": "Opaque",
        "stringData": data,
    }


def write_manifests(objects: Iterable[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """One JSON file per object (``kubectl apply -f DIR`` reads JSON as well as YAML)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, obj in enumerate(objects):
        path = out / f"{index:02d}-{obj['kind'].lower()}-{obj['metadata']['name']}.json"
        path.write_text(json.dumps(obj, indent=2) + "\n")
        paths.append(path)
    return paths
