"""What the Docker launcher asks of the engine for a lease: device requests, cpuset, memory, ulimits, user and
hardening, mounts and the torchrun command. Pure functions; no Docker engine is involved (the real engine is
exercised by tests/integration/test_docker_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from docker.errors import APIError, ImageNotFound
from docker.types import DeviceRequest, Ulimit

from kiln.tasks.launch.base import get_launcher
from kiln.tasks.launch.containers import (
    PIDS_LIMIT,
    ROOT_FALLBACK_USER,
    bind_volumes,
    container_kwargs,
    container_user,
    containers_can_log,
    describe_refusal,
    torchrun_command,
)
from kiln.tasks.launch.docker_gang import DockerGangLauncher
from kiln.tasks.pools.allocation import Allocation, NodeAllocation
from kiln.tasks.spec import DockerSpec, ModelSpec, TrainingSpec
from kiln.tasks.training.job import TrainConfig

pytestmark = pytest.mark.docker

GIB = 1024**3


def kwargs_for(node: NodeAllocation, spec: DockerSpec | None = None, **overrides) -> dict:
    args = {"image": "kiln-train:cpu", "name": "kiln-job1-00", "command": ["python", "-m", "torch.distributed.run"],
            "network": "kiln-job1", "user": "1000:0", "volumes": {}, "labels": {"kiln.job": "job1"},
            "threads_per_proc": 2, "workdir": "/work", **overrides}
    return container_kwargs(node, spec or DockerSpec(), **args)


def test_a_gpu_lease_becomes_a_device_request_for_exactly_those_gpus():
    node = NodeAllocation("gpu-a", gpus=("2", "3"), cpus=(8, 9, 10, 11), memory=64 * GIB)
    kw = kwargs_for(node)
    assert kw["device_requests"] == [DeviceRequest(device_ids=["2", "3"], capabilities=[["gpu"]])]
    # The engine exposes the two leased GPUs as 0 and 1 inside the container.
    assert kw["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert kw["environment"]["NVIDIA_VISIBLE_DEVICES"] == "2,3"
    assert kw["cpuset_cpus"] == "8,9,10,11"
    assert kw["mem_limit"] == kw["memswap_limit"] == 64 * GIB


def test_a_cpu_lease_requests_no_device_and_hides_every_gpu():
    kw = kwargs_for(NodeAllocation("cpu-a", cpus=(0,), memory=2 * GIB))
    assert "device_requests" not in kw
    assert kw["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert kw["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"  # even where the NVIDIA runtime is the default
    assert kw["cpuset_cpus"] == "0"


def test_a_lease_without_cores_or_memory_sets_no_limit():
    kw = kwargs_for(NodeAllocation("laptop"))
    assert not {"cpuset_cpus", "mem_limit", "memswap_limit", "device_requests", "ulimits"} & set(kw)


def test_containers_run_unprivileged_and_hardened():
    kw = kwargs_for(NodeAllocation("n0"), user="1000:0")
    assert kw["user"] == "1000:0"
    assert kw["privileged"] is False
    assert kw["cap_drop"] == ["ALL"]
    assert kw["security_opt"] == ["no-new-privileges"]
    assert kw["read_only"] is True and "/tmp" in kw["tmpfs"]
    assert kw["pids_limit"] == PIDS_LIMIT
    assert kw["environment"]["HOME"] == "/tmp"
    assert kw["init"] is True  # signals reach torchrun, zombies are reaped
    assert kw["environment"]["OMP_NUM_THREADS"] == "2"


def test_shm_size_and_ulimits_come_from_the_docker_spec():
    spec = DockerSpec(shm_size="8g", ulimits={"stack": (67108864, 67108864), "memlock": (-1, -1)})
    kw = kwargs_for(NodeAllocation("n0"), spec)
    assert kw["shm_size"] == "8g"
    assert kw["ulimits"] == [Ulimit(name="memlock", soft=-1, hard=-1),
                             Ulimit(name="stack", soft=67108864, hard=67108864)]


@pytest.mark.parametrize(("network", "expected"), [
    ("bridge", {"network": "kiln-job1", "hostname": "kiln-job1-00"}),
    ("host", {"network_mode": "host"}),
], ids=["bridge-per-job-network", "host-network"])
def test_network_mode(network, expected):
    kw = kwargs_for(NodeAllocation("n0"), DockerSpec(network=network))
    assert {k: kw[k] for k in ("network", "hostname", "network_mode") if k in kw} == expected


def test_the_container_runs_torchrun_with_a_c10d_rendezvous():
    cmd = torchrun_command(nnodes=2, nproc=4, rdzv_endpoint="kiln-job1-00:29500", rdzv_id="job1-0",
                           config_path="/runs/r1/train/train_config.json", shutdown_timeout_s=3600)
    assert cmd == ["python", "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=4",
                   "--rdzv_backend=c10d", "--rdzv_endpoint=kiln-job1-00:29500", "--rdzv_id=job1-0",
                   "--max-restarts=0", "--shutdown-timeout=3600", "-m", "kiln.tasks.training", "--config",
                   "/runs/r1/train/train_config.json"]
    kw = kwargs_for(NodeAllocation("n0"), command=cmd)
    assert kw["entrypoint"] + kw["command"] == cmd


def test_on_the_host_network_a_node_announces_its_inventory_address():
    cmd = torchrun_command(nnodes=2, nproc=1, rdzv_endpoint="10.0.0.1:29500", rdzv_id="job1-0", config_path="/c.json",
                           local_addr="10.0.0.2")
    assert "--local_addr=10.0.0.2" in cmd and cmd.index("--local_addr=10.0.0.2") < cmd.index("-m", 3)


def make_config(root: Path, tracking_uri: str | None) -> TrainConfig:
    return TrainConfig(features_dir=str(root / "run" / "features"), output_dir=str(root / "run" / "train"),
                       checkpoint_dir=str(root / "run" / "checkpoints"), task="classification", model=ModelSpec(),
                       training=TrainingSpec(), mlflow_tracking_uri=tracking_uri)


@pytest.mark.parametrize("tracking", ["http://mlflow:5000", "sqlite:///{root}/mlflow.db", "file://{root}/run/mlruns"],
                         ids=["tracking-server", "sqlite-store", "file-store"])
def test_volumes_bind_only_the_runs_own_folders_at_the_same_absolute_paths(tmp_path, tracking):
    """Never kiln's home (its databases, the lease store, other runs), not even for a file-based MLflow store:
    the launcher logs for the containers then."""
    config = make_config(tmp_path, tracking.format(root=tmp_path))
    volumes = bind_volumes(config, Path(config.output_dir))  # the pipeline's work folder is the output folder
    assert all(v["bind"] == path for path, v in volumes.items())
    assert {str(Path(p).relative_to(tmp_path)): v["mode"] for p, v in volumes.items()} == {
        "run/features": "ro", "run/train": "rw", "run/checkpoints": "rw"}


@pytest.mark.parametrize(("uri", "network", "direct"), [
    ("http://mlflow.internal:5000", "bridge", True), ("http://127.0.0.1:5000", "bridge", False),
    ("http://localhost:5000", "bridge", False), ("http://127.0.0.1:5000", "host", True),
    ("sqlite:////var/kiln/mlflow.db", "host", False), ("file:///var/kiln/mlruns", "bridge", False),
    (None, "host", False),
])
def test_containers_log_to_mlflow_only_over_http_they_can_reach(uri, network, direct):
    assert containers_can_log(uri, network) is direct


def test_a_separate_work_folder_is_mounted_read_only(tmp_path):
    config = make_config(tmp_path, None)
    volumes = bind_volumes(config, tmp_path / "work")  # holds the config file; train.log is written by the launcher
    assert volumes[str(tmp_path / "work")] == {"bind": str(tmp_path / "work"), "mode": "ro"}


@pytest.mark.parametrize(("euid", "user", "expected"), [
    (0, None, ROOT_FALLBACK_USER),
    (1234, None, "1234:{gid}"),
    (0, "50000:0", "50000:0"),
], ids=["root-launcher-falls-back-to-uid-1000", "non-root-launcher-keeps-its-ids", "explicit-user"])
def testcontainer_user(monkeypatch, euid, user, expected):
    import os

    monkeypatch.setattr(os, "geteuid", lambda: euid)
    assert container_user(user) == expected.format(gid=os.getegid())


@pytest.mark.parametrize("user", ["0:0", "root", "1000"], ids=["uid-0", "a-name", "no-gid"])
def test_a_root_or_malformed_user_is_refused(user):
    with pytest.raises(ValueError, match="non-root 'uid:gid'"):
        container_user(user)


# Engine errors built from the messages dockerd 20.10 returns for these refusals (docker/README.md, "What this
# machine kind refuses"); they are values passed to a pure function, not a mocked engine.
@pytest.mark.parametrize(("error", "words"), [
    (APIError("500 Server Error", explanation='could not select device driver "" with capabilities: [[gpu]]'),
     ["no GPU runtime", "NVIDIA Container Toolkit", "training.resources.gpus: 0"]),
    (APIError("500 Server Error", explanation="OCI runtime create failed: error setting rlimit type 8: operation "
                                              "not permitted"),
     ["above the host's hard limit", "training.docker.ulimits", "CAP_SYS_RESOURCE"]),
    (ImageNotFound("No such image: kiln-train:cpu"), ["make image"]),
], ids=["no-gpu-runtime", "ulimit-not-permitted", "image-missing"])
def test_engine_refusals_are_explained_with_their_fix(error, words):
    message = describe_refusal(NodeAllocation("n0", docker_url="tcp://gpu-a:2376"), error)
    assert "tcp://gpu-a:2376" in message
    for word in words:
        assert word in message


def lease(*nodes: NodeAllocation) -> Allocation:
    return Allocation(lease_id="l1", pool="p", nodes=nodes)


@pytest.mark.parametrize(("training", "allocation", "message"), [
    ({"nodes": 2}, lease(NodeAllocation("a")), "training.nodes is 2 but the lease has 1"),
    ({"nodes": 2}, lease(NodeAllocation("a", docker_url="tcp://a:2376"), NodeAllocation("b", docker_url="tcp://b:2376")),
     "set training.docker.network: host"),
    ({"nodes": 1}, lease(NodeAllocation("a", gpus=("0",))), "2 ranks per node but only 1 leased GPU"),
    ({"nodes": 2, "docker": {"network": "host"}}, lease(NodeAllocation("a"), NodeAllocation("b")),
     "'host' needs a distinct address per node"),
], ids=["node-count-mismatch", "bridge-across-engines", "more-ranks-than-gpus", "host-network-shared-address"])
def test_a_lease_that_does_not_fit_is_refused_before_any_container(tmp_path, training, allocation, message):
    config = make_config(tmp_path, None)
    config = TrainConfig(**{**config.__dict__, "training": TrainingSpec(launcher="docker", **training)})
    with pytest.raises(ValueError, match=message):
        DockerGangLauncher().launch(config, nproc=2, workdir=tmp_path / "work", allocation=allocation)
    assert not (tmp_path / "work").exists()


def test_get_launcher_knows_the_docker_launcher():
    assert isinstance(get_launcher("docker"), DockerGangLauncher)
