"""Typed records at every boundary: every route documents its answer, and stored records are validated on read."""

import json

import pytest

from sculptor.config import Settings
from sculptor.gate_report import GateReport, GateThresholds, JobGates
from sculptor.records import CorruptRecord, JobRecord, JobStore, TaskStore, ModelVersion, VersionStore
from sculptor.subspace_records import SubspaceRecords, record_key
from sculptor.training_summary import TrainingSummary
from service.app import create_app


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    settings = Settings(var_dir=tmp_path_factory.mktemp("var"), redis_url="redis://127.0.0.1:1/0",
                        engine="transformers")
    return create_app(settings).openapi()  # no lifespan: nothing connects


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _object(spec: dict, schema: dict) -> dict:
    """The object schema behind a $ref or an optional (anyOf [..., null])."""
    schema = _resolve(spec, schema)
    for option in schema.get("anyOf", []):
        option = _resolve(spec, option)
        if option.get("type") == "object":
            return option
    return schema


def test_every_route_documents_its_answer(spec):
    undocumented = []
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            answers = {code: r for code, r in operation["responses"].items() if code in ("200", "201", "202")}
            content = [c for r in answers.values() for c in r.get("content", {}).items()]
            json_schemas = [schema.get("schema") for kind, schema in content if kind == "application/json"]
            other = [kind for kind, _ in content if kind != "application/json"]
            # A JSON answer names a schema that is not the empty one FastAPI writes for an undeclared answer.
            if not any(s for s in json_schemas) and not other:
                undocumented.append(f"{method.upper()} {path}")
    assert not undocumented, f"routes without a documented answer: {undocumented}"


def test_the_main_answers_are_named_models(spec):
    def answer(path, method="get"):
        responses = spec["paths"][path][method]["responses"]
        ok = next(r for code, r in responses.items() if code.startswith("2"))
        return ok["content"]["application/json"]["schema"].get("$ref", "").rsplit("/", 1)[-1]

    assert answer("/jobs/{job_id}") == "JobRecord"
    assert answer("/jobs") == "JobPage"
    assert answer("/tasks", "post") == "TaskAccepted"
    assert answer("/tasks") == "TaskPage"
    assert answer("/registry/{version}") == "RegistryVersion"
    assert answer("/models") == "Lineage"
    assert answer("/readyz") == "Readiness"
    assert answer("/generate", "post") == "GenerateAnswer"


def test_job_records_gates_and_training_are_objects_with_named_properties(spec):
    job = spec["components"]["schemas"]["JobRecord"]["properties"]
    gates, training = _object(spec, job["gates"]), _object(spec, job["training"])
    assert {"passed", "failed", "summary", "gates", "thresholds", "lineage", "forced"} <= set(gates["properties"])
    assert {"steps", "final_loss", "learning_rate", "method", "constraint", "subspace"} <= set(training["properties"])
    subspace = _object(spec, training["properties"]["subspace"])
    assert {"matrices", "tasks", "config", "method"} <= set(subspace["properties"])
    matrix = _resolve(spec, subspace["properties"]["matrices"]["additionalProperties"])
    assert {"m", "k", "protected_ratio", "spent"} <= set(matrix["properties"])
    version = spec["components"]["schemas"]["VersionView"]["properties"]  # GET /models: a ModelVersion, and more
    assert {"passed", "forced"} <= set(_object(spec, version["gate_summary"])["properties"])


def test_no_answer_schema_shows_a_webhook_secret_but_the_upload_answer(spec):
    schemas = spec["components"]["schemas"]
    assert "webhook_secret" in schemas["TaskAccepted"]["properties"]
    for name in ("TaskView", "TaskDetail"):
        assert not any(p.startswith("webhook") for p in schemas[name]["properties"])


def gate_report(passed: bool = True, **extra) -> JobGates:
    report = GateReport(passed=passed, new_task_id="task_1", failed=[] if passed else ["new_task:task_1"],
                        summary="ok" if passed else "rejected", gates=[], thresholds=GateThresholds(),
                        candidate={}, parent={})
    return JobGates.model_validate({**report.model_dump(), **extra})


def test_a_stored_job_of_the_wrong_shape_is_refused_on_read(redis_client):
    jobs = JobStore(redis_client)
    jobs.add(JobRecord(job_id="job_1", task_id="task_1"))
    jobs.update("job_1", status="rejected", gates=gate_report(passed=False))
    assert isinstance(jobs.get("job_1").gates, JobGates) and jobs.get("job_1").gates.failed == ["new_task:task_1"]

    stored = json.loads(redis_client.get("sculptor:job:job_1"))
    stored["gates"]["passed"] = "maybe"
    redis_client.set("sculptor:job:job_1", json.dumps(stored))
    for read in (lambda: jobs.get("job_1"), lambda: jobs.page_for(0, 10), lambda: jobs.update("job_1", attempts=2)):
        with pytest.raises(CorruptRecord, match=r"sculptor:job:job_1 is not a valid JobRecord: gates\.passed"):
            read()


def test_stored_training_and_versions_are_typed_and_checked(redis_client):
    summary = TrainingSummary.model_validate({
        "steps": 4, "final_loss": 0.5, "examples": 8, "learning_rate": 1e-3, "epochs": 2, "max_seq_len": 64,
        "method": "full", "constraint": {"method": "full", "trainable_matrices": 2}})
    jobs = JobStore(redis_client)
    jobs.add(JobRecord(job_id="job_1", task_id="task_1", training=summary))
    assert jobs.get("job_1").training.constraint.trainable_matrices == 2

    versions = VersionStore(redis_client)
    versions.add(ModelVersion(version="v1", checkpoint_uri="file:///v1", gate_summary={"passed": True}))
    assert versions.get("v1").gate_summary.passed is True
    redis_client.set("sculptor:version:v1", json.dumps({"version": "v1"}))  # no checkpoint_uri
    with pytest.raises(CorruptRecord, match="checkpoint_uri"):
        versions.get("v1")
    redis_client.set("sculptor:task:t", "{not json")
    with pytest.raises(CorruptRecord, match="sculptor:task:t"):
        TaskStore(redis_client).get("t")


def test_a_subspace_record_is_validated_when_read_and_keeps_its_config(redis_client):
    records = SubspaceRecords(redis_client)
    records.put({"version": "v1", "parent_version": "v0", "tasks": ["t"], "method": "osft",
                 "config": {"mean_protected_ratio": 0.8},
                 "matrices": {"model.layers.0.mlp.up_proj": {"m": 8, "shape": [16, 8], "k": 6,
                                                             "protected_ratio": 0.75, "spent": False}}})
    record = records.get("v1")
    assert record.config.mean_protected_ratio == 0.8 and record.config.max_protected_ratio == 0.95
    assert record.matrices["model.layers.0.mlp.up_proj"].k == 6
    assert records.summary("v1").layers["0"].protected_fraction == 0.75

    stored = json.loads(redis_client.get(record_key("v1")))
    stored["matrices"]["model.layers.0.mlp.up_proj"]["k"] = "six"
    redis_client.set(record_key("v1"), json.dumps(stored))
    with pytest.raises(CorruptRecord, match=r"SubspaceRecord: matrices\.model\.layers\.0\.mlp\.up_proj\.k"):
        records.get("v1")
    stored["matrices"]["model.layers.0.mlp.up_proj"]["k"] = 6
    redis_client.set(record_key("v1"), json.dumps({**stored, "config": {"mean_protected_ratio": 2.0}}))
    with pytest.raises(CorruptRecord, match="protected ratios"):  # OSFTConfig's own checks run on read too
        records.get("v1")


def test_the_gateway_answers_in_its_declared_shapes_and_names_a_corrupt_record(tmp_path, redis_url, tiny_model_dir):
    import httpx
    from gateway_helpers import running_gateway, tiny_settings

    settings = tiny_settings(tmp_path / "var", redis_url, tiny_model_dir, rate_limit_uploads_per_min=0)
    with running_gateway(settings) as (url, ctx), httpx.Client(base_url=url, timeout=30) as http:
        SubspaceRecords(ctx.redis).put({
            "version": "v0", "tasks": [], "method": "osft", "config": {},
            "matrices": {"model.layers.0.mlp.up_proj": {"m": 8, "shape": [16, 8], "k": 6, "protected_ratio": 0.75,
                                                        "spent": False}}})
        one = http.get("/registry/v0").json()
        assert one["matrices"]["model.layers.0.mlp.up_proj"]["k"] == 6 and one["layers"]["0"]["protected_fraction"]
        assert [v["version"] for v in http.get("/registry").json()["versions"]] == ["v0"]
        assert set(http.get("/readyz").json()) >= {"ready", "engine_loaded", "replicas", "redis"}

        accepted = http.post("/tasks", json={"name": "t", "examples": [
            {"prompt": f"say {w}", "completion": w} for w in ("a", "b", "c", "d")]})
        assert accepted.status_code == 202 and set(accepted.json()) == {"task_id", "job_id", "status", "status_url"}
        job_id = accepted.json()["job_id"]
        task = http.get(f"/tasks/{accepted.json()['task_id']}").json()
        assert task["jobs"] == [job_id] and not any(k.startswith("webhook") for k in task)
        assert http.get(f"/jobs/{job_id}").json()["gates"] is None

        ctx.redis.set(f"sculptor:job:{job_id}", json.dumps({"job_id": job_id, "task_id": 7}))
        refused = http.get(f"/jobs/{job_id}")
        assert refused.status_code == 500 and refused.json()["error"]["code"] == "corrupt_record"
        assert f"sculptor:job:{job_id} is not a valid JobRecord: task_id" in refused.json()["error"]["message"]


def test_a_task_answer_names_every_stored_field_but_the_write_only_ones():
    """A field added to TaskRecord is a conscious choice: shown (add it to TaskView) or kept back (here)."""
    from service.api.routes.tasks import TaskView

    from sculptor.records import TaskRecord

    write_only = {"webhook_url", "webhook_secret"}
    assert set(TaskView.model_fields) == set(TaskRecord.model_fields) - write_only | {"has_webhook"}
