"""The Kubernetes manifests of a model server (generated only: nothing here talks to a cluster)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from kiln.tasks.fleet.kubernetes import render_manifests, render_manifests_yaml, split_replicas
from kiln.tasks.fleet.kubernetes_config import IN_FLIGHT_METRIC, KubernetesConfig, ManifestError
from kiln.tasks.serving.deployment import Canary, Deployment, ModelRef
from kiln.tasks.serving.scaling import ReplicaSettings

CHAMPION = ModelRef("3", "s3://models/penguins_species/v3")
CANARY = Canary("4", "s3://models/penguins_species/v4", 0.25)


def config(min_: int = 2, max_: int = 8, **changes) -> KubernetesConfig:
    """A config whose deployment file says ``replicas`` min 2, max 8 (unless ``changes`` replace it)."""
    deployment = Deployment("penguins_species", CHAMPION, replicas=ReplicaSettings(min=min_, max=max_))
    base = KubernetesConfig(pipeline="penguins_species", image="registry.example.com/ml/kiln-serve:1.4",
                            deployment=deployment)
    return replace(base, **changes)


def with_canary(min_: int = 2, max_: int = 8, **changes) -> KubernetesConfig:
    replicas = ReplicaSettings(min=min_, max=max_)
    return config(deployment=Deployment("penguins_species", CHAMPION, CANARY, replicas=replicas), **changes)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def by_role(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["labels"]["kiln.dev/role"]: d for d in of_kind(docs, kind)}


def server(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_yaml_parses_back_into_the_same_documents_without_aliases():
    text = render_manifests_yaml(with_canary(kserve=True))
    assert "&id" not in text and "*id" not in text  # anchors confuse some tools and every human reader
    docs = list(yaml.safe_load_all(text))
    assert docs == render_manifests(with_canary(kserve=True))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler"] * 2 + [
        "Service", "InferenceService"]
    assert all(d["apiVersion"] and d["metadata"]["name"].startswith("kiln-penguins-species") for d in docs)


def test_the_service_selects_the_pods_of_every_version_and_each_deployment_its_own():
    docs = render_manifests(with_canary())
    service = of_kind(docs, "Service")[0]
    deployments = by_role(docs, "Deployment")
    for role, dep in deployments.items():
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items(), role
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(), role
        assert "kiln.dev/version" not in dep["spec"]["selector"]["matchLabels"]  # a selector cannot change later
    other = deployments["canary"]["spec"]["template"]["metadata"]["labels"]
    assert not deployments["champion"]["spec"]["selector"]["matchLabels"].items() <= other.items()
    assert service["spec"]["ports"][0]["targetPort"] == server(deployments["champion"])["ports"][0]["name"]


def test_each_pod_reads_a_deployment_file_that_serves_its_own_version_from_the_fetched_bundle():
    docs = render_manifests(with_canary())
    maps, deployments = by_role(docs, "ConfigMap"), by_role(docs, "Deployment")
    for role, version in (("champion", "3"), ("canary", "4")):
        served = Deployment.from_dict(yaml.safe_load(maps[role]["data"]["deployment.json"]))
        assert (served.champion, served.canary) == (ModelRef(version, f"/bundles/v{version}"), None)
        pod = deployments[role]["spec"]["template"]["spec"]
        assert pod["volumes"][0]["configMap"]["name"] == maps[role]["metadata"]["name"]
        fetch = pod["initContainers"][0]["command"]
        assert fetch[-2:] == [f"s3://models/penguins_species/v{version}/", f"/bundles/v{version}/"]


def test_bundles_given_as_paths_come_from_a_read_only_claim():
    docs = render_manifests(config(deployment=Deployment("penguins_species", ModelRef("3", "/srv/kiln/bundles/v3")),
                                   bundles_claim="kiln-bundles"))
    pod = of_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "bundles", "persistentVolumeClaim": {"claimName": "kiln-bundles", "readOnly": True}} \
        in pod["volumes"]
    assert '"/srv/kiln/bundles/v3"' in of_kind(docs, "ConfigMap")[0]["data"]["deployment.json"]


@pytest.mark.parametrize(("signal", "metric"), [
    ("in_flight", {"type": "Pods", "pods": {"metric": {"name": IN_FLIGHT_METRIC},
                                            "target": {"type": "AverageValue", "averageValue": "8"}}}),
    ("cpu", {"type": "Resource", "resource": {"name": "cpu",
                                              "target": {"type": "Utilization", "averageUtilization": 70}}}),
], ids=["in-flight", "cpu"])
def test_the_autoscaler_keeps_min_to_max_pods_on_the_chosen_signal(signal, metric):
    docs = render_manifests(config(autoscale_on=signal, replicas=ReplicaSettings(min=2, max=8, scale_up_s=2.5,
                                                                                  scale_down_s=120)))
    hpa, deployment = of_kind(docs, "HorizontalPodAutoscaler")[0], of_kind(docs, "Deployment")[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert deployment["spec"]["replicas"] == 2
    assert hpa["spec"]["metrics"] == [metric]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
    assert hpa["spec"]["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 3


@pytest.mark.parametrize(("total", "share", "split"), [
    (4, 0.25, (3, 1)), (10, 0.2, (8, 2)), (2, 0.1, (1, 1)), (3, 1.0, (1, 2)), (5, None, (5, 0)),
], ids=["quarter", "fifth", "floor-of-one-pod-each", "all-but-one", "no-canary"])
def test_replicas_split_by_the_canary_share_with_a_pod_for_each_version(total, share, split):
    assert split_replicas(total, share) == split


def test_the_canary_deployment_and_its_autoscaler_get_its_share_of_the_pods():
    docs = render_manifests(with_canary(4, 12))
    deployments, hpas = by_role(docs, "Deployment"), by_role(docs, "HorizontalPodAutoscaler")
    assert {r: d["spec"]["replicas"] for r, d in deployments.items()} == {"champion": 3, "canary": 1}
    assert {r: (h["spec"]["minReplicas"], h["spec"]["maxReplicas"]) for r, h in hpas.items()} == {
        "champion": (3, 9), "canary": (1, 3)}


def test_a_canary_share_the_pods_cannot_approximate_is_warned_about(caplog):
    render_manifests(with_canary(2))  # 25 % asked, 1 of 2 pods = 50 %
    assert "50 % of the requests instead of 25 %" in caplog.text


def test_the_token_comes_from_a_secret_and_never_appears_inline():
    docs = render_manifests(with_canary(s3_secret="kiln-serve-s3", kserve=True))
    for dep in of_kind(docs, "Deployment"):
        env = {e["name"]: e for e in server(dep)["env"]}
        assert env["KILN_SERVE_TOKEN"] == {"name": "KILN_SERVE_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "kiln-penguins-species-token", "key": "token"}}}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "kiln-serve-s3", "key": key}
        assert {"KILN_SERVE_HOST", "KILN_SERVE_PORT", "KILN_SERVE_RUNTIME"} <= env.keys()
    assert not of_kind(docs, "Secret")


def test_a_deployment_without_replicas_runs_one_pod():
    docs = render_manifests(config(deployment=Deployment("penguins_species", CHAMPION)))
    hpa = of_kind(docs, "HorizontalPodAutoscaler")[0]
    assert (of_kind(docs, "Deployment")[0]["spec"]["replicas"], hpa["spec"]["minReplicas"],
            hpa["spec"]["maxReplicas"]) == (1, 1, 1)


def test_pods_probe_ready_and_health_and_drain_before_they_stop():
    replicas = ReplicaSettings(min=2, max=8, drain_timeout_s=20)
    dep = of_kind(render_manifests(config(endpoints_delay_s=7, replicas=replicas)), "Deployment")[0]
    container, pod = server(dep), dep["spec"]["template"]["spec"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert pod["terminationGracePeriodSeconds"] == 7 + 20 + 1  # endpoints update, then in-flight requests finish
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_resources_request_cores_and_memory_and_limit_gpus():
    replicas = ReplicaSettings(min=2, max=8, cpus=2)
    container = server(of_kind(render_manifests(config(replicas=replicas, memory_mib=2048, gpus=1)), "Deployment")[0])
    assert container["resources"] == {"requests": {"cpu": "2", "memory": "2048Mi", "nvidia.com/gpu": "1"},
                                      "limits": {"memory": "2048Mi", "nvidia.com/gpu": "1"}}
    assert container["args"][-2:] == ["--threads", "2"]


def test_kserve_serves_the_canary_with_its_traffic_percent_on_concurrency():
    isvc = of_kind(render_manifests(with_canary(kserve=True)), "InferenceService")[0]
    predictor = isvc["spec"]["predictor"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert (predictor["canaryTrafficPercent"], predictor["scaleMetric"], predictor["scaleTarget"]) == (
        25, "concurrency", 8)
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 8)
    assert predictor["containers"][0]["name"] == "kserve-container"
    assert "/bundles/v4/" in predictor["initContainers"][0]["command"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"replicas": {"min": 1, "max": 2}}, "replicas must be a ReplicaSettings or None"),
    ({"image": ""}, "image must be an image reference"),
    ({"image": "kiln serve"}, "image must be an image reference"),
    ({"name": "Kiln_Serve"}, "name 'Kiln_Serve' is not a DNS-1035 label"),
    ({"pipeline": "p" * 70}, "pipeline must be a pipeline name of at most 63"),
    ({"namespace": "ML"}, "namespace must be a DNS-1123 name"),
    ({"token_secret": "a_b"}, "token_secret must be a DNS-1123 name"),
    ({"autoscale_on": "memory"}, "autoscale_on must be one of in_flight, cpu"),
    ({"target_cpu_percent": 0}, "target_cpu_percent must be an integer between 1 and 1000"),
    ({"port": 70000}, "port must be an integer between 1 and 65535"),
    ({"runtime": "tensorrt"}, "runtime must be one of auto, onnx, torch"),
    ({"pipeline": "iris"}, "deployment serves 'penguins_species', not the pipeline 'iris'"),
    ({"deployment": Deployment("penguins_species", ModelRef("3", "/tmp/bundle"))},
     "deployment.champion.bundle must be an s3:// URI"),
    ({"deployment": Deployment("penguins_species", CHAMPION, CANARY)},
     "replicas.min must be at least 2 with a canary"),
    ({"replicas": ReplicaSettings(min=1, max=3), "deployment": Deployment("penguins_species", CHAMPION, CANARY)},
     "replicas.min must be at least 2 with a canary"),
], ids=["replicas-not-settings", "no-image", "image-with-space", "bad-name", "long-pipeline",
        "bad-namespace", "bad-secret", "bad-signal", "zero-cpu-target", "bad-port", "bad-runtime", "other-pipeline",
        "local-bundle-without-claim", "canary-needs-two-pods", "canary-needs-two-pods-given"])
def test_bad_inputs_are_refused_naming_the_field(changes, message):
    with pytest.raises(ManifestError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        config(**changes)


def test_replicas_given_to_the_config_win_over_the_deployment_file():
    hpa = of_kind(render_manifests(config(replicas=ReplicaSettings(min=3, max=5))), "HorizontalPodAutoscaler")[0]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 5)


def test_a_derived_name_too_long_for_a_label_is_refused_with_the_fix():
    pipeline = "p" * 50
    with pytest.raises(ManifestError, match="pass a shorter name"):
        config(pipeline=pipeline, deployment=Deployment(pipeline, CHAMPION))
    assert config(pipeline=pipeline, deployment=Deployment(pipeline, CHAMPION), name="kiln-p").base_name == "kiln-p"
