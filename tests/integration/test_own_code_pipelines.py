"""Pipelines that bring their own code, end to end through real Airflow (``dag.test()``: task instances, Airflow's
own retry of a failed task), a real 2-rank torchrun on gloo, MLflow and kiln's model server.

In each run one DDP rank is SIGKILLed (as the OOM killer would) right after the job's second checkpoint: the gang
stops, the ``train`` task fails, and Airflow's retry resumes from the checkpoint the loop saved.
``penguins_resmlp`` is the user's network in kiln's loop (the loop of the built-in networks too): it resumes to the
final weights of a job that was never interrupted and goes on through the whole rollout. ``penguins_ownloop`` is
the user's own loop, resumed from the checkpoint it saved through the training API (its bit-identical resume is
tested in-process in tests/unit/test_training_api.py), registered and gated.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = ["ingest", "validate", "clean", "build_features", "train", "evaluate", "register", "gate"]
ROLLOUT = ["infra_validate", "deploy", "verify", "promote"]
KILL_AFTER_EPOCH = 2


class RankKiller(threading.Thread):
    """SIGKILLs rank 1 of ``dag_id``'s training job once the job's checkpoint of ``KILL_AFTER_EPOCH`` exists."""

    def __init__(self, artifact_root: Path, dag_id: str):
        super().__init__(daemon=True)
        self.dag_id, self.root, self.killed, self.error = dag_id, artifact_root / dag_id, None, None
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 300
        pattern = f"*/checkpoints/epoch_{KILL_AFTER_EPOCH:04d}.pt"
        worker = None
        while not self.stop.is_set() and time.monotonic() < deadline:
            # Found while the job starts, so that the kill follows the checkpoint within one poll.
            worker = worker if worker is not None and worker.is_running() else self._rank(1)
            if worker is not None and any(self.root.glob(pattern)):
                worker.send_signal(signal.SIGKILL)
                self.killed = worker.pid
                return
            time.sleep(0.01)
        self.error = "the checkpoint never appeared, or rank 1 was gone before it could be killed"

    def _rank(self, rank: int) -> psutil.Process | None:
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or [])
                if "kiln.tasks.training" in cmd and self.dag_id in cmd and "torchrun" not in cmd \
                        and proc.environ().get("RANK") == str(rank):
                    return proc
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return None


def _run_with_a_killed_rank(dag_id: str, conf: dict) -> tuple:
    from airflow.dag_processing.dagbag import DagBag

    from kiln.tasks.settings import get_settings

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    killer = RankKiller(Path(get_settings().artifact_root), dag_id)
    killer.start()
    try:
        dr = bag.dags[dag_id].test(run_conf=conf)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, killer.error
    return dr, {ti.task_id: ti for ti in dr.get_task_instances()}


def _uninterrupted_weights(run_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Train once more from the run's own published config, uninterrupted, in a folder of its own."""
    from kiln.tasks.launch.torchrun import LocalTorchrunLauncher
    from kiln.tasks.training.job import CONFIG_FILE, TrainConfig

    config = TrainConfig.from_json((run_dir / "train" / CONFIG_FILE).read_text())
    config = replace(config, output_dir=str(tmp_path / "out"), checkpoint_dir=str(tmp_path / "ckpt"),
                     mlflow_run_id=None, fence_token=None)
    LocalTorchrunLauncher().launch(config, nproc=2, workdir=tmp_path / "work")
    return torch.load(tmp_path / "out" / "model.pt", weights_only=False)["state_dict"]


def _assert_resumed(dr, tis: dict, expected_states: dict[str, str], epochs: int) -> Path:
    """Every step ended as expected, ``train`` on its second try, resumed from a checkpoint after the kill."""
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import read_json, run_key

    assert {t: str(ti.state) for t, ti in tis.items()} == expected_states
    assert str(dr.state) == "success"
    assert tis["train"].try_number == 2, "the killed rank must fail the first try, and Airflow's retry finish it"
    trained = tis["train"].xcom_pull(task_ids="train")
    assert trained["resumed_from_epoch"] is not None and trained["resumed_from_epoch"] >= KILL_AFTER_EPOCH
    run_dir = Path(get_settings().artifact_root) / run_key(dr.dag_id, dr.run_id)
    history = read_json(run_dir / "train" / "train_metrics.json")["history"]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))  # contiguous across the resume
    assert (run_dir / "train" / "model.pt2").is_file()
    return run_dir


@pytest.fixture
def serving():
    """The model server the rollout starts is stopped after the test (later tests deploy on the same port)."""
    from conftest import stop_model_servers

    from kiln.tasks.settings import get_settings

    yield
    stop_model_servers(get_settings().serving_dir)


def test_a_custom_network_survives_a_killed_rank_and_is_served(airflow_db, serving, tmp_path: Path) -> None:
    from kiln.tasks.bundle.load import load_bundle, records_from_frame
    from kiln.tasks.pipeline.endpoint import Endpoint
    from kiln.tasks.serving.auth import resolve_token
    from kiln.tasks.serving.client import ServingClient
    from kiln.tasks.settings import get_settings
    from kiln.tasks.spec import spec_named
    from kiln.tasks.tracking.registry import Registry

    dr, tis = _run_with_a_killed_rank("penguins_resmlp", {"epochs": 12})
    run_dir = _assert_resumed(dr, tis, dict.fromkeys(STEPS + ROLLOUT, "success"), epochs=12)
    # Bit-identical, not merely close: the resumed try replays exactly the batches and dropout masks (every rank's
    # RNG state is in the checkpoint) that an uninterrupted job draws.
    resumed = torch.load(run_dir / "train" / "model.pt", weights_only=False)["state_dict"]
    fresh = _uninterrupted_weights(run_dir, tmp_path)
    assert resumed.keys() == fresh.keys()
    different = [name for name in fresh if not torch.equal(resumed[name], fresh[name])]
    assert different == [], f"resumed weights differ from an uninterrupted run's: {different}"
    assert tis["evaluate"].xcom_pull(task_ids="evaluate")["metrics"]["test/accuracy"] >= 0.9

    # The served model is the user's network: the endpoint answers raw records as the bundle predicts them.
    version = tis["gate"].xcom_pull(task_ids="gate")["candidate"]["version"]
    assert Registry(get_settings().mlflow_tracking_uri).champion("penguins_resmlp").version == version
    bundle = load_bundle(Endpoint.of(spec_named("penguins_resmlp")).current().champion.bundle)
    assert bundle.manifest["model"]["model_spec"]["factory"] == "resmlp:build"
    raw, expected = bundle.sample()
    with ServingClient(tis["deploy"].xcom_pull(task_ids="deploy")["url"], resolve_token(get_settings())) as client:
        served = client.predict(records_from_frame(raw))
    assert served["version"] == version
    want = bundle.format_predictions(expected)
    for got, exp in zip(served["predictions"], want, strict=True):
        assert got["label"] == exp["label"]
        assert got["probabilities"] == pytest.approx(exp["probabilities"], abs=1e-6)


def test_an_own_training_loop_resumes_from_its_checkpoint_on_airflows_retry(airflow_db) -> None:
    from kiln.tasks.settings import get_settings
    from kiln.tasks.storage.artifacts import read_json, run_key
    from kiln.tasks.tracking.registry import Registry

    # deployment none: the rollout steps pass without serving anything (registry only).
    dr, tis = _run_with_a_killed_rank("penguins_ownloop", {"epochs": 10, "deployment": "none"})
    run_dir = _assert_resumed(dr, tis, dict.fromkeys(STEPS + ROLLOUT, "success"), epochs=10)
    registered = tis["register"].xcom_pull(task_ids="register")
    version = Registry(get_settings().mlflow_tracking_uri).version("penguins_ownloop", registered["version"])
    assert version.tags["kiln.run_key"] == run_key(dr.dag_id, dr.run_id)
    # The version names the code that trained it, as the checkpoints' fingerprint did.
    assert version.tags["kiln.code_hash"] == read_json(run_dir / "train" / "train_config.json")["code_hash"]
