"""The Kubernetes manifests under ``deploy/``, run as far as this machine can.

There is no cluster here, so the test does the kubelet's part by hand: it
writes the ConfigMap's and the Secret's files where their volumes are
mounted, expands ``$(VAR)`` in the arguments, and runs each container's
command as a real process. Host paths and the mirror's ports move into the
test's own directory and free ports, and the example TCR upstream becomes
a real docker-registry; everything else is what the manifests say. What
must hold: the init container points containerd at the mirror's address;
the node serves the pull API there, its probes answer 200 on the paths and
ports they name, Prometheus finds ``/metrics`` on the port the PodMonitor
names, every series the alert rules use is one the node exposes, the
rules fire on the samples their comments describe (with promtool, where it
is installed), a second node on the same data directory does not start (so
the rollout must not surge), and SIGTERM ends the node cleanly within the
grace period.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support.control_sim import sim_env, sim_process
from support.images import PushedImage, push_image
from support.processes import stop_process
from support.registry import Registry, free_port
from support.waiting import wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NODE_SECRET = "node-secret-deploy-test-5c1e"
# Bounds waits only.
TIMEOUT = 30.0


def documents(name: str) -> dict[str, dict[str, Any]]:
    """The manifests of one file, by kind."""
    with (DEPLOY / name).open() as file:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(file) if doc}


@dataclass
class Kubelet:
    """What the test plays of the kubelet: volumes as directories, and
    the rewrites that keep a run on this machine.

    Attributes:
        root: Where the volumes' directories go.
        rewrites: Text replaced in arguments and in the files written.
        secrets: The files of each Secret, as the manifests' header
            comments tell the operator to create them.
    """

    root: Path
    rewrites: dict[str, str]
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)

    def mount(self, pod: dict[str, Any], *containers: dict[str, Any]) -> None:
        """Make each of the containers' volumes a directory of the test,
        then fill those of the ConfigMap and the Secret (whose files name
        the others' paths)."""
        mounts = [m for c in containers for m in c.get("volumeMounts", [])]
        for mount in mounts:
            directory = self.root / mount["name"]
            directory.mkdir(exist_ok=True)
            self.rewrites[mount["mountPath"]] = str(directory)
        volumes = {v["name"]: v for v in pod["volumes"]}
        for mount in mounts:
            directory = self.root / mount["name"]
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                config_map = documents("node.yaml")["ConfigMap"]
                assert volume["configMap"]["name"] == config_map["metadata"]["name"]
                for key, text in config_map["data"].items():
                    (directory / key).write_text(self.rewrite(text))
            if "secret" in volume:
                for key, text in self.secrets[volume["secret"]["secretName"]].items():
                    (directory / key).write_text(text)

    def rewrite(self, text: str) -> str:
        # Longest first: a mount path may be the prefix of another.
        for old in sorted(self.rewrites, key=len, reverse=True):
            text = text.replace(old, self.rewrites[old])
        return text

    def command(self, container: dict[str, Any], env: dict[str, str]) -> list[str]:
        args = [self.rewrite(arg) for arg in container["args"]]
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], arg) for arg in args]
        return [sys.executable, "-m", "tcr_mirror", *args]


@dataclass
class RunningNode:
    kubelet: Kubelet
    process: subprocess.Popen[bytes]
    log: Path
    mirror_port: int
    metrics_port: int


@pytest.fixture(scope="module")
def image(module_registry: Registry) -> PushedImage:
    return push_image(module_registry, "deploy/app", "v1", layer_sizes=[4096])


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory,
    module_registry: Registry,
    image: PushedImage,
) -> Iterator[RunningNode]:
    daemon_set = documents("node.yaml")["DaemonSet"]
    pod = daemon_set["spec"]["template"]["spec"]
    mirror_port, metrics_port = free_port(), free_port()
    kubelet = Kubelet(
        tmp_path_factory.mktemp("kubelet"),
        {
            "127.0.0.1:5000": f"127.0.0.1:{mirror_port}",
            ":9105": f":{metrics_port}",
            "https://example.tencentcloudcr.com": module_registry.url,
        },
        {"tcr-mirror-upstream": {"upstream.credentials": "user:secret\n"}},
    )
    (init,) = pod["initContainers"]
    (container,) = pod["containers"]
    kubelet.mount(pod, init, container)

    configured = subprocess.run(
        kubelet.command(init, {}), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert configured.returncode == 0, configured.stderr

    env = {"NODE_IP": "127.0.0.1"}  # status.hostIP, here
    log = kubelet.root / "node.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            kubelet.command(container, env), stdout=sink, stderr=sink
        )
    try:
        wait_until(lambda: b"node_listening" in log.read_bytes(), "the node to listen")
        yield RunningNode(kubelet, process, log, mirror_port, metrics_port)
    finally:
        stop_process(process)


def test_the_init_container_points_containerd_at_the_mirror(
    node: RunningNode,
) -> None:
    certs_dir = Path(node.kubelet.rewrites["/etc/containerd/certs.d"])
    hosts = tomllib.loads(
        (certs_dir / "example.tencentcloudcr.com" / "hosts.toml").read_text()
    )
    assert hosts["server"] == "https://example.tencentcloudcr.com"
    assert list(hosts["host"]) == [f"http://127.0.0.1:{node.mirror_port}"]


def test_the_node_pulls_and_answers_its_probes(
    node: RunningNode, image: PushedImage
) -> None:
    pod = documents("node.yaml")["DaemonSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        port = node.mirror_port if check["port"] == 5000 else check["port"]
        answer = httpx.get(
            f"http://{check['host']}:{port}{check['path']}", timeout=TIMEOUT
        )
        assert answer.status_code == 200, (probe, answer.text)

    digest, data = image.layers[0]
    blob = httpx.get(
        f"http://127.0.0.1:{node.mirror_port}/v2/deploy/app/blobs/{digest}",
        timeout=TIMEOUT,
    )
    assert blob.status_code == 200
    assert blob.content == data


def test_prometheus_finds_every_series_the_alerts_use(node: RunningNode) -> None:
    monitoring = documents("monitoring.yaml")
    pod_template = documents("node.yaml")["DaemonSet"]["spec"]["template"]
    (container,) = pod_template["spec"]["containers"]
    (endpoint,) = monitoring["PodMonitor"]["spec"]["podMetricsEndpoints"]
    selector = monitoring["PodMonitor"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_template["metadata"]["labels"].items()
    (port,) = [p for p in container["ports"] if p["name"] == endpoint["port"]]
    assert port["containerPort"] == 9105

    # Labelled series appear with their first sample: one pull through.
    pulled = httpx.get(
        f"http://127.0.0.1:{node.mirror_port}/v2/deploy/app/manifests/v1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        timeout=TIMEOUT,
    )
    assert pulled.status_code == 200
    page = httpx.get(
        f"http://127.0.0.1:{node.metrics_port}{endpoint['path']}", timeout=TIMEOUT
    )
    assert page.status_code == 200
    exposed = set(re.findall(r"^(tcr_mirror_\w+)", page.text, re.MULTILINE))
    rules = [
        rule
        for group in monitoring["PrometheusRule"]["spec"]["groups"]
        for rule in group["rules"]
    ]
    used = {
        name for rule in rules for name in re.findall(r"tcr_mirror_\w+", rule["expr"])
    }
    assert used, "the rules name no series of the mirror"
    assert used <= exposed, used - exposed


def test_the_rollout_stops_the_old_pod_before_the_new_starts(
    node: RunningNode,
) -> None:
    """A new pod beside the old one, as a surge would start it, finds the
    data directory locked and exits; so the DaemonSet must not surge."""
    daemon_set = documents("node.yaml")["DaemonSet"]
    pod = daemon_set["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    rolling = daemon_set["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling.get("maxSurge", 0) in (0, "0%")

    second = subprocess.run(
        node.kubelet.command(container, {"NODE_IP": "127.0.0.1"}),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert second.returncode != 0
    assert "in use by another tcr-mirror" in second.stdout + second.stderr
    assert node.process.poll() is None


# Samples for promtool, one minute apart, as (series, pod, its other
# labels, values): what each rule's comment says it catches, and what it
# must not.
UPSTREAM_REQUESTS = "tcr_mirror_upstream_requests_total"
LAST_SUCCESS = "tcr_mirror_upstream_last_success_timestamp_seconds"
RULE_SERIES = [
    # Errors since a success 40 minutes old; errors (5xx) and no success
    # ever (no gauge); errors, but a success a minute ago.
    (UPSTREAM_REQUESTS, "a", 'upstream="u",status="error"', "0+1x40"),
    (LAST_SUCCESS, "a", 'upstream="u"', "0x40"),
    (UPSTREAM_REQUESTS, "b", 'upstream="u",status="503"', "0+1x40"),
    (UPSTREAM_REQUESTS, "c", 'upstream="u",status="error"', "0+1x40"),
    (LAST_SUCCESS, "c", 'upstream="u"', "0+60x40"),
    # One 507 at minute 20, its series' first sample; one long ago.
    (
        "tcr_mirror_requests_total",
        "a",
        'kind="blob",method="GET",status="507"',
        "_x20 1x40",
    ),
    ("tcr_mirror_requests_total", "b", 'kind="blob",method="GET",status="507"', "1x60"),
    # Twice the budget evicted per hour; a tenth of it.
    ("tcr_mirror_store_evicted_bytes_total", "a", "", "0+2000x200"),
    ("tcr_mirror_store_budget_bytes", "a", "", "60000x200"),
    ("tcr_mirror_store_evicted_bytes_total", "b", "", "0+100x200"),
    ("tcr_mirror_store_budget_bytes", "b", "", "60000x200"),
]
RULE_EXPECTED = [
    ("30m", "TcrMirrorUpstreamUnreachable", ["a", "b"]),
    ("25m", "TcrMirrorStoreFull", ["a"]),
    ("50m", "TcrMirrorStoreFull", []),
    ("150m", "TcrMirrorEvictionChurn", ["a"]),
]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_the_alert_rules_fire_as_their_comments_say(tmp_path: Path) -> None:
    rule = documents("monitoring.yaml")["PrometheusRule"]
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    by_name = {
        r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]
    }

    def alert(name: str, pod: str) -> dict[str, Any]:
        labels = {"instance": f"{pod}:9105", "pod": pod, **by_name[name]["labels"]}
        if name == "TcrMirrorUpstreamUnreachable":
            labels["upstream"] = "u"
        if name == "TcrMirrorStoreFull":
            labels.update(kind="blob", method="GET", status="507")
        # The summaries name only labels the alert keeps.
        summary = re.sub(
            r"\{\{ \$labels\.(\w+) \}\}",
            lambda m: labels[m[1]],
            by_name[name]["annotations"]["summary"],
        )
        return {"exp_labels": labels, "exp_annotations": {"summary": summary}}

    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": f'{name}{{instance="{pod}:9105",pod="{pod}"'
                        + (f",{labels}}}" if labels else "}"),
                        "values": values,
                    }
                    for name, pod, labels, values in RULE_SERIES
                ],
                "alert_rule_test": [
                    {
                        "eval_time": at,
                        "alertname": name,
                        "exp_alerts": [alert(name, pod) for pod in pods],
                    }
                    for at, name, pods in RULE_EXPECTED
                ],
            }
        ],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(test))
    checked = subprocess.run(
        ["promtool", "test", "rules", str(tmp_path / "test.yaml")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_sigterm_ends_the_node_within_its_grace_period(node: RunningNode) -> None:
    """Last in the module: it stops the shared node."""
    pod = documents("node.yaml")["DaemonSet"]["spec"]["template"]["spec"]
    node.process.send_signal(signal.SIGTERM)
    status = node.process.wait(timeout=pod["terminationGracePeriodSeconds"])
    assert status == 0
    assert b"Traceback" not in node.log.read_bytes()


def test_the_control_plane_hands_nodes_tokens_from_tcr(tmp_path: Path) -> None:
    """``control serve`` as the Deployment runs it, with the simulator as
    TCR's API and its instance as the registry."""
    docs = documents("control.yaml")
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (env_from,) = container["envFrom"]
    assert env_from["secretRef"]["name"] == "tcr-mirror-cloud"
    assert docs["Service"]["spec"]["selector"].items() <= (
        docs["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    )
    port = free_port()
    with sim_process("deploy-test") as sim:
        instances = sim["instances"]
        assert isinstance(instances, dict)
        kubelet = Kubelet(
            tmp_path,
            {
                "0.0.0.0:8750": f"127.0.0.1:{port}",
                "tcr-xxxxxxxx": instances["deploy-test"],
            },
            {"tcr-mirror-node-secret": {"node-secret": NODE_SECRET}},
        )
        kubelet.mount(pod, container)
        # The one change for a machine without TCR: its API is the simulator.
        command = [*kubelet.command(container, {}), f"--endpoint={sim['endpoint']}"]
        log = tmp_path / "control.log"
        with log.open("wb") as sink:
            # sim_env() holds the cloud Secret's two keys.
            process = subprocess.Popen(command, env=sim_env(), stdout=sink, stderr=sink)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_until(
                lambda: b"control_serve_listening" in log.read_bytes(),
                "control serve to listen",
            )
            probe = container["readinessProbe"]["httpGet"]
            assert probe["port"] == 8750
            assert (
                httpx.get(f"{base}{probe['path']}", timeout=TIMEOUT).status_code == 200
            )

            def credentials() -> httpx.Response:
                return httpx.get(
                    f"{base}/v1/credentials",
                    params={"registry": "example.tencentcloudcr.com"},
                    headers={"Authorization": f"Bearer {NODE_SECRET}"},
                    timeout=TIMEOUT,
                )

            wait_until(lambda: credentials().status_code == 200, "a token for nodes")
            assert credentials().json()["password"]
            audit = (
                Path(kubelet.rewrites["/var/lib/tcr-mirror-control"]) / "audit.jsonl"
            )
            assert "CreateInstanceToken" in audit.read_text()

            process.send_signal(signal.SIGTERM)
            status = process.wait(timeout=pod["terminationGracePeriodSeconds"])
            assert status == 0
            assert NODE_SECRET.encode() not in log.read_bytes()
        finally:
            stop_process(process)
