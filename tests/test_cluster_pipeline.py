"""The cluster (kind) target in code, offline: no KFP backend, no Kubernetes API server, no MinIO here.

- the pipeline compiled for the cluster (image, environment, secrets on every task), and the local one unchanged;
- checkpoint storage on S3 (`components.train.storage_for` and the pyarrow.fs helpers, against a local
  directory standing in for the bucket);
- the training backend chosen once by `settings.target`;
- KFP submit/follow and the outcome, against a fake KFP client (tests named `..._fake_kfp_client`);
- the RayJob runner and the kind training backend, against a fake Kubernetes API (`..._fake_kubernetes_api`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.fs as pafs
import pytest
import yaml
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from kubernetes.client.exceptions import ApiException

import components.train as train_module
from components import train_entry
from components.rayjob import (
    OUTCOME_ANNOTATION,
    RayJobFailed,
    RayJobRunner,
    RayJobTimeout,
    RayJobTraining,
    job_state,
)
from components.steps import LocalTraining, training_backend
from components.train import (
    TrainOutcome,
    TrainParams,
    copy_tree,
    read_text,
    s3_options,
    storage_exists,
    storage_for,
    write_text,
)
from core.settings import Settings, get_settings
from pipelines import cluster
from pipelines.cluster import (
    PLATFORM_SECRET,
    ClusterRunError,
    compile_for_cluster,
    failed_task,
    follow,
    run_on_cluster,
    submit,
)
from pipelines.runner import RunResult, compile_pipeline

REPO = Path(__file__).resolve().parents[1]
IMAGE = "registry.example:5000/mlops-template:9.9.9"
DOMAIN = "mlops.svc.cluster.local"
EXPECTED_ENV = {
    "MLOPS_TARGET": "kind",
    "MLOPS_MLFLOW_TRACKING_URI": f"http://mlflow.{DOMAIN}:5000",
    "MLOPS_CONTROL_PLANE_URL": f"http://control-plane.{DOMAIN}:8700",
    "MLOPS_CONTROLLER_URL": f"http://controller.{DOMAIN}:8730",
    "MLFLOW_S3_ENDPOINT_URL": f"http://minio.{DOMAIN}:9000",
}
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "minio-root-user",
    "AWS_SECRET_ACCESS_KEY": "minio-root-password",
    "MLOPS_CONTROL_PLANE_TOKEN": "control-plane-token",
    "MLOPS_LABELS_TOKEN": "labels-token",
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(target="kind", home=tmp_path / "home", image=IMAGE, kfp_host="http://kfp.test:8888")


def _documents(path: Path) -> list[dict[str, Any]]:
    return list(yaml.safe_load_all(path.read_text()))


@pytest.fixture(scope="module")
def cluster_ir(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = tmp_path_factory.mktemp("cluster-ir")
    settings = Settings(target="kind", home=root / "home", image=IMAGE)
    return _documents(compile_for_cluster(root / "cluster.yaml", settings))


# --- the pipeline compiled for the cluster --------------------------------------------------------------


def test_every_executor_runs_the_settings_image(cluster_ir: list[dict[str, Any]]) -> None:
    executors = cluster_ir[0]["deploymentSpec"]["executors"]
    assert len(executors) == 7
    assert {name: executor["container"]["image"] for name, executor in executors.items()} == dict.fromkeys(
        executors, IMAGE
    )


def test_every_task_gets_the_cluster_addresses_and_target(cluster_ir: list[dict[str, Any]]) -> None:
    for name, executor in cluster_ir[0]["deploymentSpec"]["executors"].items():
        env = {item["name"]: item["value"] for item in executor["container"]["env"]}
        assert EXPECTED_ENV.items() <= env.items(), name
        assert env["MLOPS_NAMESPACE"] == "mlops" and env["MLOPS_IMAGE"] == IMAGE


def test_a_non_default_namespace_moves_every_address_into_it(tmp_path: Path) -> None:
    """The service domain is derived from the namespace: a platform in `team-a` is reached in `team-a`
    (before, the domain defaulted to `mlops.svc.cluster.local` whatever the namespace)."""
    settings = Settings(target="kind", home=tmp_path / "home", image=IMAGE, namespace="team-a")
    env = cluster.cluster_env(settings)
    assert env["MLOPS_NAMESPACE"] == "team-a"
    assert env["MLOPS_CLUSTER_SERVICE_DOMAIN"] == "team-a.svc.cluster.local"
    for key in (
        "MLOPS_MLFLOW_TRACKING_URI",
        "MLOPS_CONTROL_PLANE_URL",
        "MLOPS_CONTROLLER_URL",
        "MLFLOW_S3_ENDPOINT_URL",
    ):
        assert ".team-a.svc.cluster.local:" in env[key], (key, env[key])
    explicit = Settings(target="kind", home=tmp_path / "home", namespace="team-a", cluster_service_domain="x.example")
    assert cluster.cluster_env(explicit)["MLOPS_MLFLOW_TRACKING_URI"] == "http://mlflow.x.example:5000"


def test_the_namespace_and_domain_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_NAMESPACE", "team-b")
    settings = Settings(target="kind", home=tmp_path / "home")
    assert settings.namespace == "team-b" and settings.service_domain == "team-b.svc.cluster.local"
    assert cluster.cluster_env(settings)["MLOPS_CONTROLLER_URL"] == "http://controller.team-b.svc.cluster.local:8730"


def test_every_task_reads_minio_and_token_credentials_from_the_platform_secret(
    cluster_ir: list[dict[str, Any]],
) -> None:
    ir, platform = cluster_ir
    secret_template = (REPO / "infra" / "helm" / "mlops-platform" / "templates" / "secret.yaml").read_text()
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(ir["deploymentSpec"]["executors"])
    for name, config in executors.items():
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == PLATFORM_SECRET, name
        assert {item["envVar"]: item["secretKey"] for item in secret["keyToEnv"]} == SECRET_ENV
        assert config["imagePullPolicy"] == "IfNotPresent"
    assert all(f"  {key}:" in secret_template for key in SECRET_ENV.values())  # keys the chart generates


def test_the_train_executor_takes_the_rayjob_path_on_kind(cluster_ir: list[dict[str, Any]], settings: Settings) -> None:
    executor = cluster_ir[0]["deploymentSpec"]["executors"]["exec-train-op"]
    source = " ".join(executor["container"]["command"] + executor["container"].get("args", []))
    assert "components.rayjob" in source and "from components.steps import train" in source
    env = {item["name"]: item["value"] for item in executor["container"]["env"]}
    step_settings = Settings(target=env["MLOPS_TARGET"], home=settings.home, image=env["MLOPS_IMAGE"])
    assert isinstance(training_backend(step_settings), RayJobTraining)


def test_the_cluster_ir_has_the_same_steps_as_the_local_one(tmp_path: Path, cluster_ir: list[dict[str, Any]]) -> None:
    local = _documents(compile_pipeline(tmp_path / "local.yaml"))[0]
    assert set(cluster_ir[0]["root"]["dag"]["tasks"]) == set(local["root"]["dag"]["tasks"])
    assert cluster_ir[0]["root"]["inputDefinitions"] == local["root"]["inputDefinitions"]
    assert cluster_ir[0]["pipelineInfo"]["name"] == local["pipelineInfo"]["name"]


def test_local_target_unchanged(tmp_path: Path, settings: Settings) -> None:
    before = compile_pipeline(tmp_path / "before.yaml").read_text()
    compile_for_cluster(tmp_path / "cluster.yaml", settings)
    after = compile_pipeline(tmp_path / "after.yaml").read_text()
    assert before == after  # compiling for the cluster changes nothing shared
    documents = list(yaml.safe_load_all(after))
    assert len(documents) == 1  # no Kubernetes platform config locally
    for executor in documents[0]["deploymentSpec"]["executors"].values():
        assert executor["container"]["image"] == get_settings().image
        assert "env" not in executor["container"]


# --- storage: local directories as before, S3 through pyarrow.fs -------------------------------------------


def test_storage_for_a_local_directory_is_its_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage_for("ckpt") == (str((tmp_path / "ckpt").resolve()), None)
    assert storage_for(tmp_path / "a" / ".." / "b") == (str(tmp_path / "b"), None)


def test_storage_for_s3_strips_the_scheme_and_points_at_minio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://minio.mlops.svc.cluster.local:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "user")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    path, filesystem = storage_for("s3://checkpoints/runs/")
    assert path == "checkpoints/runs"
    assert isinstance(filesystem, pafs.S3FileSystem)
    options = filesystem.__reduce__()[1][0]  # the options it was made with (what Ray pickles to workers)
    assert options["endpoint_override"] == "minio.mlops.svc.cluster.local:9000"
    assert options["scheme"] == "http"
    assert (options["access_key"], options["secret_key"]) == ("user", "secret")
    assert options["force_virtual_addressing"] is False  # path-style, as MinIO wants


def test_s3_options_precedence_and_defaults() -> None:
    env = {"AWS_ENDPOINT_URL_S3": "https://s3.local:443/", "MLFLOW_S3_ENDPOINT_URL": "http://minio:9000"}
    assert s3_options(env) == {"region": "us-east-1", "endpoint_override": "s3.local:443", "scheme": "https"}
    assert s3_options({"MLFLOW_S3_ENDPOINT_URL": "minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}) == {
        "region": "eu-west-1",
        "endpoint_override": "minio:9000",
        "scheme": "https",
    }
    assert s3_options({}) == {"region": "us-east-1"}  # plain AWS: the SDK's own credential chain


@pytest.fixture
def fake_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`s3://bucket/key` -> `<root>/bucket/key`: a local directory behind the pyarrow filesystem interface,
    creating parents on write like S3 (which has no directories)."""
    root = tmp_path / "s3"
    root.mkdir()
    handler = pafs.FSSpecHandler(DirFileSystem(path=str(root), fs=LocalFileSystem(auto_mkdir=True)))
    monkeypatch.setattr(train_module, "s3_filesystem", lambda env=None: pafs.PyFileSystem(handler))
    return root


def test_uri_helpers_work_locally_and_on_s3(tmp_path: Path, fake_s3: Path) -> None:
    for base in (str(tmp_path / "local"), "s3://checkpoints/run-1"):
        if not base.startswith("s3://"):
            Path(base).mkdir()
        assert not storage_exists(f"{base}/marker")
        write_text(f"{base}/marker", "worker 1 killed\n")
        assert storage_exists(f"{base}/marker")
        assert read_text(f"{base}/marker") == "worker 1 killed\n"
    assert (fake_s3 / "checkpoints" / "run-1" / "marker").read_text() == "worker 1 killed\n"
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "weights.pt").write_bytes(b"\x00\x01")
    (model / "sub" / "config.json").write_text("{}")
    copy_tree(model, "s3://checkpoints/run-1/model")
    copy_tree("s3://checkpoints/run-1/model", tmp_path / "back" / "model")
    assert (tmp_path / "back" / "model" / "weights.pt").read_bytes() == b"\x00\x01"
    assert (tmp_path / "back" / "model" / "sub" / "config.json").read_text() == "{}"


def test_training_frames_round_trip_through_s3(fake_s3: Path) -> None:
    from core.synthetic import generate_transactions

    frame = generate_transactions(200, seed=3)
    train_module._write_frame(frame, "s3://checkpoints/run-2/fit.parquet")
    assert (fake_s3 / "checkpoints" / "run-2" / "fit.parquet").exists()
    back = train_module._read_frame("s3://checkpoints/run-2/fit.parquet")
    assert back.equals(frame.reset_index(drop=True))


def test_the_training_entry_uploads_the_model_and_writes_the_outcome(
    tmp_path: Path, fake_s3: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (fake_s3 / "checkpoints" / "input").mkdir(parents=True)
    (fake_s3 / "checkpoints" / "input" / "data.parquet").write_bytes(b"PAR1")
    seen: dict[str, Any] = {}

    def fake_train_model(data_path: str, storage: str, run_name: str, params: TrainParams, model_dir: Path) -> Any:
        seen.update(data=Path(data_path).read_bytes(), storage=storage, run_name=run_name, params=params)
        model_dir.mkdir(parents=True)
        (model_dir / "model.pt").write_text("weights")
        return _outcome(run_name, str(model_dir))

    monkeypatch.setattr(train_entry, "train_model", fake_train_model)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = train_entry.main(
        [
            "--data", "s3://checkpoints/input/data.parquet",
            "--storage", "s3://checkpoints",
            "--run-name", "train-r1",
            "--model-out", "s3://checkpoints/train-r1/model",
            "--outcome", "s3://checkpoints/train-r1/outcome.json",
            "--workers", "3",
            "--inject-failure-at-epoch", "2",
        ]
    )  # fmt: skip
    assert code == 0
    assert seen["data"] == b"PAR1" and seen["storage"] == "s3://checkpoints" and seen["run_name"] == "train-r1"
    assert seen["params"].workers == 3 and seen["params"].inject_failure_at_epoch == 2
    assert (fake_s3 / "checkpoints" / "train-r1" / "model" / "model.pt").read_text() == "weights"
    written = json.loads((fake_s3 / "checkpoints" / "train-r1" / "outcome.json").read_text())
    assert written["model_dir"] == "s3://checkpoints/train-r1/model"
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(printed) == written


# --- the training backend, chosen once by the target ----------------------------------------------------


def test_the_backend_is_chosen_by_the_target(tmp_path: Path) -> None:
    assert isinstance(training_backend(Settings(target="local", home=tmp_path)), LocalTraining)
    assert isinstance(training_backend(Settings(target="kind", home=tmp_path)), RayJobTraining)


def test_local_training_is_attempts_under_the_checkpoint_root_with_the_cluster_retries_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import components.train_attempts as attempts

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(attempts, "train_in_fresh_clusters", lambda *args: calls.append(args) or "outcome")
    settings = Settings(target="local", home=tmp_path, train_cluster_retries=3)
    params = TrainParams(workers=1, epochs=1)
    assert LocalTraining(settings).train("data.parquet", "train-x", params, "model") == "outcome"
    assert calls == [("data.parquet", settings.checkpoint_root, "train-x", params, "model", 3, settings.logs_dir)]


# --- KFP: submit, follow, outcome (fake KFP client) ------------------------------------------------------


def _task(name: str, state: str, message: str | None = None, pod: str | None = None) -> SimpleNamespace:
    error = SimpleNamespace(message=message) if message else None
    return SimpleNamespace(display_name=name, state=state, error=error, pod_name=pod)


def _run(state: str, *tasks: SimpleNamespace, error: str | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        state=state,
        run_details=SimpleNamespace(task_details=list(tasks)),
        error=SimpleNamespace(message=error) if error else None,
    )


class FakeKfpClient:
    """`kfp.Client` as far as `pipelines.cluster` uses it; `get_run` plays back a script of run states."""

    def __init__(self, runs: list[SimpleNamespace] | None = None) -> None:
        self.runs = list(runs or [])
        self.created: list[dict[str, Any]] = []
        self.get_calls = 0

    def create_run_from_pipeline_package(self, pipeline_file: str, **kwargs: Any) -> SimpleNamespace:
        self.created.append({**kwargs, "package": _documents(Path(pipeline_file))})
        return SimpleNamespace(run_id="kfp-run-1")

    def get_run(self, run_id: str) -> SimpleNamespace:
        assert run_id == "kfp-run-1"
        self.get_calls += 1
        return self.runs.pop(0) if len(self.runs) > 1 else self.runs[0]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_submit_creates_a_run_of_the_cluster_pipeline_fake_kfp_client(settings: Settings) -> None:
    client = FakeKfpClient()
    assert submit(settings, {"rows": 20_000, "epochs": 2}, "20250102-030405-abc123", client) == "kfp-run-1"
    (created,) = client.created
    assert created["experiment_name"] == "card-fraud"
    assert created["enable_caching"] is False
    assert created["run_name"] == "card-fraud-training-20250102-030405-abc123"
    arguments = created["arguments"]
    assert arguments["run_id"] == "20250102-030405-abc123"
    assert (arguments["rows"], arguments["epochs"], arguments["workers"]) == (20_000, 2, settings.train_workers)
    executors = created["package"][0]["deploymentSpec"]["executors"]
    assert {executor["container"]["image"] for executor in executors.values()} == {IMAGE}


def test_submit_refuses_a_host_data_file_fake_kfp_client(settings: Settings) -> None:
    client = FakeKfpClient()
    with pytest.raises(ClusterRunError, match="--generate"):
        submit(settings, {"data_path": "/home/me/tx.parquet"}, "r1", client)
    assert client.created == []


def test_follow_reports_each_change_and_returns_the_final_state_fake_kfp_client() -> None:
    client = FakeKfpClient(
        [
            _run("PENDING"),
            _run("RUNNING", _task("ingest-op", "RUNNING")),
            _run("RUNNING", _task("ingest-op", "RUNNING")),
            _run("RUNNING", _task("ingest-op", "SUCCEEDED"), _task("validate-op", "RUNNING"), _task("root", "RUNNING")),
            _run("SUCCEEDED", _task("ingest-op", "SUCCEEDED"), _task("validate-op", "SUCCEEDED")),
        ]
    )
    clock, lines = FakeClock(), []
    state = follow(client, "kfp-run-1", 60, lines.append, poll_seconds=2, sleep=clock.sleep, clock=clock)
    assert state == "SUCCEEDED"
    assert lines == [
        "KFP run kfp-run-1: PENDING",
        "KFP run kfp-run-1: RUNNING",
        "  ingest: RUNNING",
        "  ingest: SUCCEEDED",
        "  validate: RUNNING",
        "KFP run kfp-run-1: SUCCEEDED",
        "  validate: SUCCEEDED",
    ]
    assert clock.sleeps == [2, 2, 2, 2]


def test_submit_says_where_it_could_not_reach_kfp_fake_kfp_client(settings: Settings) -> None:
    class Unreachable(FakeKfpClient):
        def create_run_from_pipeline_package(self, pipeline_file: str, **kwargs: Any) -> SimpleNamespace:
            raise ConnectionError("Connection refused")

    with pytest.raises(
        ClusterRunError, match=r"KFP API at http://kfp.test:8888 \(ConnectionError: Connection refused\)"
    ):
        submit(settings, {}, "r1", Unreachable())


def test_follow_rides_out_a_few_api_errors_fake_kfp_client() -> None:
    class Flaky(FakeKfpClient):
        def get_run(self, run_id: str) -> SimpleNamespace:
            self.get_calls += 1
            if self.get_calls in (2, 3):
                raise ConnectionError("port-forward dropped")
            return _run("RUNNING") if self.get_calls < 5 else _run("SUCCEEDED")

    client, clock = Flaky(), FakeClock()
    assert follow(client, "kfp-run-1", 600, None, poll_seconds=1, sleep=clock.sleep, clock=clock) == "SUCCEEDED"
    always = Flaky()
    always.get_run = lambda run_id: (_ for _ in ()).throw(ConnectionError("gone"))  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        follow(always, "kfp-run-1", 600, None, poll_seconds=1, sleep=clock.sleep, clock=clock)


def test_follow_gives_up_after_the_timeout_fake_kfp_client() -> None:
    client, clock = FakeKfpClient([_run("RUNNING")]), FakeClock()
    with pytest.raises(TimeoutError, match="still RUNNING after 10s"):
        follow(client, "kfp-run-1", 10, None, poll_seconds=3, sleep=clock.sleep, clock=clock)
    assert client.get_calls == 5  # t = 0, 3, 6, 9, 12


def test_a_failed_run_names_the_earliest_failed_step_fake_kfp_client() -> None:
    run = _run(
        "FAILED",
        _task("ingest-op", "SUCCEEDED"),
        _task("evaluate-op", "FAILED", "downstream"),
        _task("train-op", "FAILED", "RayJob mlops/train-x failed: AppFailed", pod="p-train-1"),
        error="run failed",
    )
    step, reason = failed_task(run)
    assert step == "train"
    assert reason == "RayJob mlops/train-x failed: AppFailed (logs: kubectl -n kubeflow logs p-train-1)"
    assert failed_task(_run("FAILED", error="pipeline spec invalid")) == (None, "pipeline spec invalid")


def test_run_on_cluster_fails_with_the_failed_step_fake_kfp_client(settings: Settings) -> None:
    client = FakeKfpClient([_run("RUNNING"), _run("FAILED", _task("validate-op", "FAILED", "3 expectations failed"))])
    lines: list[str] = []
    result = run_on_cluster(settings, {"rows": 5_000}, lines.append, run_id="r-1", client=client, poll_seconds=0)
    assert (result.status, result.run_id, result.failed_step) == ("FAILED", "r-1", "validate")
    assert result.reason == "3 expectations failed"
    assert result.model_version is None
    assert lines[0] == "submitted run r-1 to KFP at http://kfp.test:8888: KFP run kfp-run-1"


def test_run_on_cluster_reads_the_outcome_like_the_local_runner_fake_kfp_client(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Any, ...]] = []

    def fake_outcome(*args: Any) -> RunResult:
        calls.append(args)
        return RunResult("SUCCEEDED", args[1], settings.model_name, model_version="3", aliases=["challenger"])

    monkeypatch.setattr(cluster, "outcome", fake_outcome)
    client = FakeKfpClient([_run("SUCCEEDED")])
    result = run_on_cluster(settings, {}, lambda line: None, run_id="r-2", client=client, poll_seconds=0)
    assert (result.status, result.model_version, result.aliases) == ("SUCCEEDED", "3", ["challenger"])
    (args,) = calls
    assert args[:3] == (settings, "r-2", None)  # MLflow, by the run's `mlops.pipeline_run_id` tag


def test_run_on_cluster_reports_a_timeout_as_a_failure_fake_kfp_client(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never_ends(*args: Any, **kwargs: Any) -> str:
        raise TimeoutError("KFP run kfp-run-1 still RUNNING after 5s; it goes on in KFP")

    monkeypatch.setattr(cluster, "follow", never_ends)
    result = run_on_cluster(settings, {}, lambda line: None, run_id="r-3", client=FakeKfpClient([_run("RUNNING")]))
    assert result.status == "FAILED" and "goes on in KFP" in (result.reason or "")


# --- the RayJob runner and the kind training backend (fake Kubernetes API) -------------------------------


class FakeCustomObjectsApi:
    """`CustomObjectsApi` for RayJobs: create (409 when the name exists), get (a script of statuses), delete."""

    def __init__(self, statuses: list[dict[str, Any]] | None = None, existing: dict[str, Any] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.objects: dict[str, dict[str, Any]] = {}
        if existing is not None:
            self.objects[existing["metadata"]["name"]] = existing
        self.created: list[dict[str, Any]] = []
        self.deleted: list[str] = []

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, body: Any) -> Any:
        assert (group, version, plural) == ("ray.io", "v1", "rayjobs")
        name = body["metadata"]["name"]
        if name in self.objects:
            raise ApiException(status=409, reason="Conflict")
        self.objects[name] = json.loads(json.dumps(body))
        self.created.append(self.objects[name])
        return body

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str, name: str) -> Any:
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        job = self.objects[name]
        if self.statuses:
            job["status"] = self.statuses.pop(0)
        return job

    def delete_namespaced_custom_object(
        self, group: str, version: str, namespace: str, plural: str, name: str, **kw: Any
    ) -> Any:
        if name not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        del self.objects[name]
        self.deleted.append(name)


class FakeCoreApi:
    def __init__(self, log: str = "") -> None:
        self.log = log

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
        pod = SimpleNamespace(metadata=SimpleNamespace(name="train-x-abcde", creation_timestamp="2025-01-02T03:04:05Z"))
        return SimpleNamespace(items=[pod] if self.log else [])

    def read_namespaced_pod_log(self, name: str, namespace: str, tail_lines: int) -> str:
        return self.log


def _job(name: str = "train-x", status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "annotations": {OUTCOME_ANNOTATION: f"s3://checkpoints/{name}/outcome.json"}},
        "status": status or {},
    }


def _runner(
    api: FakeCustomObjectsApi, core: FakeCoreApi | None = None, **kwargs: Any
) -> tuple[RayJobRunner, FakeClock]:
    clock = FakeClock()
    runner = RayJobRunner(
        "mlops", api=api, core_api=core or FakeCoreApi(), sleep=clock.sleep, clock=clock, poll_seconds=5, **kwargs
    )
    return runner, clock


def test_job_state_waits_for_kuberay_to_decide_after_a_failed_attempt() -> None:
    assert job_state({}) == "running"
    assert job_state({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}) == "running"
    assert job_state({"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED"}) == "running"  # backoffLimit
    assert job_state({"jobDeploymentStatus": "Running", "jobStatus": "SUCCEEDED"}) == "succeeded"
    assert job_state({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}) == "succeeded"
    assert job_state({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}) == "failed"
    assert job_state({"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}) == "failed"
    assert job_state({"jobDeploymentStatus": "ValidationFailed"}) == "failed"


def test_wait_follows_the_job_and_returns_its_outcome_fake_kubernetes_api() -> None:
    api = FakeCustomObjectsApi(
        [
            {},
            {"jobDeploymentStatus": "Initializing"},
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            {"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": 1},
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "failed": 1},
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "failed": 1},
        ],
        existing=_job(),
    )
    read: list[str] = []
    runner, clock = _runner(api, read_outcome=lambda uri: read.append(uri) or {"epochs_completed": 4})
    lines: list[str] = []
    assert runner.wait("train-x", 600, lines.append) == {"epochs_completed": 4}
    assert read == ["s3://checkpoints/train-x/outcome.json"]  # the annotation build_rayjob sets
    assert lines == [
        "rayjob train-x: deployment=New job=-",
        "rayjob train-x: deployment=Initializing job=-",
        "rayjob train-x: deployment=Running job=RUNNING",
        "rayjob train-x: deployment=Retrying job=FAILED failed attempts=1",
        "rayjob train-x: deployment=Running job=RUNNING failed attempts=1",
        "rayjob train-x: deployment=Complete job=SUCCEEDED failed attempts=1",
    ]
    assert clock.sleeps == [5] * 5


def test_wait_raises_with_kuberays_message_and_the_driver_log_fake_kubernetes_api() -> None:
    status = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed", "message": "Job failed"}
    api = FakeCustomObjectsApi([status], existing=_job())
    runner, _ = _runner(api, FakeCoreApi("epoch 3\nValueError: the training data has no fraud labels at all"))
    with pytest.raises(RayJobFailed) as caught:
        runner.wait("train-x", 600)
    message = str(caught.value)
    assert "RayJob mlops/train-x failed (deployment=Failed job=FAILED reason=AppFailed): Job failed" in message
    assert message.endswith("ValueError: the training data has no fraud labels at all")
    assert caught.value.status["reason"] == "AppFailed"


def test_wait_times_out_and_a_missing_job_is_an_error_fake_kubernetes_api() -> None:
    api = FakeCustomObjectsApi([{"jobDeploymentStatus": "Initializing"}], existing=_job())
    runner, clock = _runner(api)
    with pytest.raises(RayJobTimeout, match="still not done after 12s"):
        runner.wait("train-x", 12)
    assert clock.now == 15
    with pytest.raises(RayJobFailed, match="does not exist"):
        runner.wait("train-gone", 12)


def test_submit_creates_adopts_a_running_job_and_replaces_a_failed_one_fake_kubernetes_api() -> None:
    manifest = _job("train-y")
    api = FakeCustomObjectsApi()
    runner, _ = _runner(api)
    assert runner.submit(manifest) == "created"
    api.objects["train-y"]["status"] = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}
    assert runner.submit(manifest) == "adopted"  # a retried pipeline step follows the job it started
    assert api.deleted == []
    api.objects["train-y"]["status"] = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}
    assert runner.submit(manifest) == "replaced"  # same run name: the new job resumes from the checkpoints
    assert api.deleted == ["train-y"] and len(api.created) == 2
    assert runner.delete("train-y") is True and runner.delete("train-y") is False


def test_the_kind_backend_runs_a_rayjob_and_brings_the_model_back_fake_kubernetes_api(
    tmp_path: Path, fake_s3: Path
) -> None:
    settings = Settings(target="kind", home=tmp_path / "home", image=IMAGE)
    data = tmp_path / "data.parquet"
    data.write_bytes(b"PAR1 data")
    run_name = "train-20250102-030405-abc123"
    api = FakeCustomObjectsApi(
        [
            {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        ]
    )

    def outcome_written_by_the_job(uri: str) -> dict[str, Any]:
        # What train_entry leaves on MinIO when the job succeeds: the model directory and the outcome.
        (fake_s3 / "checkpoints" / run_name / "model").mkdir(parents=True)
        (fake_s3 / "checkpoints" / run_name / "model" / "scorer.pt").write_text("weights")
        assert uri == f"s3://checkpoints/{run_name}/outcome.json"
        return _outcome(run_name, f"s3://checkpoints/{run_name}/model").to_dict()

    runner, _ = _runner(api, read_outcome=outcome_written_by_the_job)
    lines: list[str] = []
    backend = RayJobTraining(settings, runner=runner, on_progress=lines.append)
    model_dir = tmp_path / "outputs" / "model"
    outcome = backend.train(data, run_name, TrainParams(workers=2, epochs=3), model_dir)

    assert (fake_s3 / "checkpoints" / run_name / "input" / "data.parquet").read_bytes() == b"PAR1 data"
    (created,) = api.created
    assert (
        created["metadata"]["name"] == run_name
        and created["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1
    )
    assert (model_dir / "scorer.pt").read_text() == "weights"
    assert isinstance(outcome, TrainOutcome) and outcome.model_dir == str(model_dir)
    assert outcome.checkpoint == f"s3://checkpoints/{run_name}/checkpoint_000002"
    assert api.deleted == [run_name]  # a succeeded job is cleaned up
    assert lines[0] == f"rayjob mlops/{run_name} created: 2 Ray Train workers, run {run_name}"


def _outcome(run_name: str, model_dir: str) -> TrainOutcome:
    return TrainOutcome(
        run_name=run_name,
        checkpoint=f"s3://checkpoints/{run_name}/checkpoint_000002",
        model_dir=model_dir,
        epochs_completed=3,
        restarts=0,
        resumed_from_epoch=None,
        metrics={"val_pr_auc": 0.5},
        history=[{"epoch": 3, "val_pr_auc": 0.5}],
        wall_seconds=1.0,
        train_rows=100,
        rows_per_second=300.0,
        params={"workers": 2},
    )
