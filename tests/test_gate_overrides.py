"""Per-task gate thresholds and hyperparameter bounds, through the real gateway (uvicorn, real Redis).

Only an admin key may set `hyperparameters.gate_thresholds`, and only to make a gate stricter; how the
gates measure (bootstrap_samples, confidence, ...) is not a task's to set; every training knob is bounded.
"""

import httpx
import pytest
from gateway_helpers import running_gateway, tiny_settings

from sculptor.config import ApiKey
from sculptor.gate_report import STRICTER, GateThresholds

KEYS = [ApiKey(name="app", key="app-secret", scopes=["tasks"]),
        ApiKey(name="ops", key="ops-secret", scopes=["admin"])]
EXAMPLES = [{"prompt": f"reverse {w}", "completion": w[::-1]} for w in ("abc", "hello", "gate", "lamp", "stone")]
# What issue 15 sent: every global gate switched off for one candidate.
GATES_OFF = {"harmful_refusal_max_drop": 1, "benign_over_refusal_max_rise": 1000, "ifeval_max_drop": 1,
             "perplexity_max_ratio": 1e9, "general_chat_max_nll_rise": 100, "collapse_min_ratio": 0}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, redis_url, tiny_model_dir):
    settings = tiny_settings(tmp_path_factory.mktemp("gate-overrides") / "var", redis_url, tiny_model_dir,
                             api_keys=KEYS, rate_limit_uploads_per_min=0)
    with running_gateway(settings) as (url, ctx):
        yield url, ctx


def post_task(gateway, key: str, hyperparameters: dict) -> httpx.Response:
    url, _ = gateway
    body = {"name": "reverse", "examples": EXAMPLES, "hyperparameters": hyperparameters}
    return httpx.post(f"{url}/tasks", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


def stored(gateway) -> tuple[int, int]:
    """How many tasks are recorded and how many jobs wait in the queue (no worker runs here)."""
    _, ctx = gateway
    return ctx.tasks.count(), ctx.redis.llen(ctx.settings.train_queue)


@pytest.mark.parametrize("overrides", [GATES_OFF, {"retention_max_drop": 0.01}])
def test_a_tasks_key_cannot_set_gate_thresholds(gateway, overrides):
    before = stored(gateway)
    r = post_task(gateway, "app-secret", {"gate_thresholds": overrides})
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "gate_thresholds_forbidden" and "only an admin key" in err["message"]
    assert stored(gateway) == before


def test_an_admin_may_tighten_a_gate_but_not_loosen_it(gateway):
    _, ctx = gateway
    before = stored(gateway)
    r = post_task(gateway, "ops-secret", {"gate_thresholds": {"retention_max_drop": 0.01, "perplexity_max_ratio": 1e9}})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "perplexity_max_ratio=1000000000.0" in message and "default 1.1" in message
    assert "retention_max_drop" not in message and "SCULPTOR_GATE_THRESHOLDS" in message
    # (collapse_min_ratio is lifted to 0 for the tiny-model tests, tests/conftest.py: no value is looser there)
    r = post_task(gateway, "ops-secret", {"gate_thresholds": {"require_significance": True,
                                                               "general_chat_max_nll_rise": 1.0}})
    assert r.status_code == 400 and "general_chat_max_nll_rise=1.0" in r.json()["error"]["message"]
    assert stored(gateway) == before

    stricter = {"retention_max_drop": 0.01, "require_significance": False, "collapse_min_ratio": 0.7,
                "benign_over_refusal_max_rise": 0, "new_task_min_gain": 0.05}
    r = post_task(gateway, "ops-secret", {"gate_thresholds": stricter})
    assert r.status_code == 202, r.text
    assert ctx.tasks.get(r.json()["task_id"]).hyperparameters.gate_thresholds == stricter


@pytest.mark.parametrize("overrides, named", [
    ({"bootstrap_samples": 10**9}, "bootstrap_samples"),  # would stall the worker for hours
    ({"confidence": 0.9999}, "confidence"),
    ({"power": 0.99, "seed": 3}, "power"),
    ({"retention_max_dorp": 0.01}, "retention_max_dorp"),
    ({"retention_max_drop": -0.5}, "retention_max_drop"),
])
def test_measurement_knobs_and_bad_values_are_refused(gateway, overrides, named):
    before = stored(gateway)
    r = post_task(gateway, "ops-secret", {"gate_thresholds": overrides})
    assert r.status_code == 422, r.text
    assert named in r.json()["error"]["message"]
    assert stored(gateway) == before


def test_nan_cannot_slip_past_the_comparison(gateway):
    """NaN compares false both ways: as a threshold it would pass every candidate."""
    url, ctx = gateway
    before = stored(gateway)
    raw = '{"name": "x", "examples": [{"prompt": "a", "completion": "b"}], ' \
          '"hyperparameters": {"gate_thresholds": {"perplexity_max_ratio": NaN}}}'
    r = httpx.post(f"{url}/tasks", content=raw, headers={"authorization": "Bearer ops-secret",
                                                          "content-type": "application/json"})
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"], r.text
    assert stored(gateway) == before


@pytest.mark.parametrize("hyperparameters, named", [
    ({"epochs": 65}, "epochs"), ({"epochs": 0}, "epochs"), ({"learning_rate": 0.5}, "learning_rate"),
    ({"batch_size": 257}, "batch_size"), ({"max_seq_len": 9000}, "max_seq_len"),
    ({"max_steps": 1_000_000}, "max_steps"), ({"seed": -1}, "seed"), ({"seed": 2**40}, "seed"),
    ({"mean_protected_ratio": 1.0}, "mean_protected_ratio"), ({"general_replay": 10}, "general_replay"),
    ({"min_protected_ratio": 0.9, "mean_protected_ratio": 0.6}, "min_protected_ratio"),
])
def test_training_knobs_are_bounded(gateway, hyperparameters, named):
    before = stored(gateway)
    r = post_task(gateway, "app-secret", hyperparameters)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_hyperparameters" and named in err["message"]
    assert stored(gateway) == before


def test_auto_and_in_range_values_are_accepted(gateway):
    _, ctx = gateway
    for hyperparameters in ({"epochs": "auto", "learning_rate": "auto"},
                            {"epochs": 64, "learning_rate": 0.1, "batch_size": 256, "max_seq_len": 8192,
                             "max_steps": 100_000, "seed": 2**32 - 1}):
        r = post_task(gateway, "app-secret", hyperparameters)
        assert r.status_code == 202, r.text
        stored = ctx.tasks.get(r.json()["task_id"]).hyperparameters
        assert stored.model_dump(include=set(hyperparameters)) == hyperparameters


def test_the_worker_never_loosens_a_gate():
    """A record stored before these rules (or written around the gateway) cannot loosen a gate either."""
    defaults = GateThresholds()
    applied = defaults.with_overrides({**GATES_OFF, "bootstrap_samples": 10**9, "require_significance": True,
                                       "new_task_min_gain": float("nan")})
    assert applied == defaults
    tightened = defaults.with_overrides({"ifeval_max_drop": 0.01, "collapse_min_ratio": 0.8,
                                         "require_significance": False})
    assert (tightened.ifeval_max_drop, tightened.collapse_min_ratio, tightened.require_significance) == (0.01, 0.8, False)


def test_stricter_is_relative_to_the_configured_gates():
    """A looser global gate (SCULPTOR_GATE_THRESHOLDS) is the admin's route; a task is judged against it."""
    configured = GateThresholds(perplexity_max_ratio=1.5, require_significance=False)
    assert configured.loosened({"perplexity_max_ratio": 1.3}) == []
    assert "make it false" in configured.loosened({"require_significance": True})[0]
    assert set(STRICTER) == set(GateThresholds.model_fields) - {"power", "confidence", "bootstrap_samples", "seed"}
