"""The `prometheus` guardrail (monitoring/rollout/prometheus_guardrail.py): its spec fields refused with their
names, the pure judgement (a business bound on point estimates, at consecutive looks), the refusal of a spec
that needs Prometheus when no `MLOPS_PROMETHEUS_URL` is set, and the whole path against a REAL Prometheus
server (Debian's `prometheus`, which .ci/run installs) scraping a small real /metrics endpoint this test
serves: pass, fail, too few samples, nothing returned, several series, a PromQL error and an unreachable
server, the last four inconclusive with the reason recorded."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from core.processes import free_port
from core.settings import Settings, SettingsError, load_settings
from monitoring.rollout import prometheus_guardrail as pg
from monitoring.rollout.analysis import analyse
from monitoring.rollout.guardrails import error_budget, judged_pairs
from monitoring.rollout.process import build_controller
from monitoring.rollout.spec import PrometheusGuardrail, SpecError, fast_spec, load_spec
from tests.support import running_prometheus, wait_for_scrapes
from tests.test_analysis import write_canary_log
from tests.test_helm_chart import CHART, Helm, container_of, env_of, find, helm, render, run_helm  # noqa: F401

CHARGEBACKS: dict[str, Any] = {
    "name": "chargebacks",
    "kind": "prometheus",
    "applies_to": ["canary", "watch"],
    "query": 'good_ratio{variant="{variant}"}',
    "samples_query": 'payments_total{variant="{variant}"}',
    "min_samples": 500,
    "max_relative_increase": 0.1,
    "bound": 0.012,
    "looks": 3,
    "step_s": 1,
}


def spec_with(*guardrails: dict[str, Any]) -> dict[str, Any]:
    base = fast_spec().model_dump(mode="json", exclude_none=True)
    return {**base, "guardrails": [*base["guardrails"], *guardrails]}


def guardrail(**changes: Any) -> PrometheusGuardrail:
    return PrometheusGuardrail.model_validate({**CHARGEBACKS, **changes})


# --- the spec ------------------------------------------------------------------------------------------


def test_a_spec_with_a_prometheus_guardrail_loads() -> None:
    spec = load_spec(spec_with(CHARGEBACKS))
    (cfg,) = [g for g in spec.guardrails if g.kind == "prometheus"]
    assert cfg.looks == 3 and cfg.bound == 0.012 and not cfg.higher_is_better


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"query": 'rate(x[5m])'}, "query: must contain the {variant} placeholder"),
        ({"query_champion": "a"}, "query: give query (with {variant}) or query_champion and query_challenger"),
        ({"query": None, "query_champion": "a"}, "query: required"),
        ({"samples_query": "sum(payments_total)"}, "samples_query: must contain the {variant} placeholder"),
        ({"max_relative_increase": None, "bound": None, "applies_to": ["canary"]}, "give a relative margin"),
        ({"bound": None}, "bound: required when applies_to includes 'watch'"),
        ({"applies_to": ["shadow"]}, "prometheus cannot apply to 'shadow'"),
        ({"looks": 0}, "looks: must be >= 1"),
        ({"step_s": 0}, "step_s: must be > 0"),
        ({"max_relative_increase": -0.1}, "max_relative_increase"),
    ],
)  # fmt: skip
def test_bad_prometheus_guardrail_fields_are_refused_naming_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_spec(spec_with({**CHARGEBACKS, **changes}))
    assert "guardrails[" in str(caught.value) and message in str(caught.value), str(caught.value)


def test_prometheus_guardrails_take_no_share_of_the_false_rollback_budget() -> None:
    with_external, plain = load_spec(spec_with(CHARGEBACKS)), fast_spec()
    assert judged_pairs(with_external) == judged_pairs(plain)
    assert {n: a for n, a in error_budget(with_external).items() if n in error_budget(plain)} == error_budget(plain)


# --- the pure judgement --------------------------------------------------------------------------------


def reading(challenger: list[float | None], champion: list[float | None], samples: float = 1000) -> pg.Reading:
    looks = [100.0 + i for i in range(len(challenger))]
    values = {"challenger": challenger, "champion": champion}
    return pg.Reading(looks=looks, values=values, samples={"challenger": samples, "champion": samples})


def test_a_relative_bound_passes_only_when_it_holds_at_every_look() -> None:
    cfg = guardrail()
    held = pg.judge(cfg, reading([0.0105, 0.0107, 0.0104], [0.010, 0.010, 0.010]), "canary", True)
    assert held.verdict == "pass" and held.limit == pytest.approx(0.011) and held.value == 0.0104
    broken = pg.judge(cfg, reading([0.02, 0.03, 0.02], [0.010, 0.010, 0.010]), "canary", True)
    assert broken.verdict == "fail" and "broken at all 3 looks" in broken.detail
    mixed = pg.judge(cfg, reading([0.0105, 0.02, 0.0105], [0.010, 0.010, 0.010]), "canary", True)
    assert mixed.verdict == "inconclusive" and "held at 2 of 3 looks" in mixed.detail


def test_higher_is_better_turns_the_margin_around() -> None:
    cfg = guardrail(higher_is_better=True, bound=0.5)  # e.g. a downstream approval rate
    assert pg.judge(cfg, reading([0.95, 0.95, 0.95], [0.97, 0.97, 0.97]), "canary", True).verdict == "pass"
    assert pg.judge(cfg, reading([0.80, 0.80, 0.80], [0.97, 0.97, 0.97]), "canary", True).verdict == "fail"


def test_the_watch_and_the_100_percent_step_use_the_absolute_bound() -> None:
    cfg = guardrail()
    watch = pg.Reading(looks=[1.0, 2.0, 3.0], values={"champion": [0.011] * 3}, samples={"champion": 900})
    assert pg.judge(cfg, watch, "watch", False).verdict == "pass"
    high = pg.Reading(looks=[1.0, 2.0, 3.0], values={"challenger": [0.02] * 3}, samples={"challenger": 900})
    assert pg.judge(cfg, high, "canary", champion_serves=False).verdict == "fail"
    relative_only = guardrail(bound=None, applies_to=["canary"])
    assert not pg.applies(relative_only, "canary", champion_serves=False)
    assert pg.applies(relative_only, "canary", champion_serves=True)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (pg.Reading(error="Prometheus at http://x unreachable: ConnectError"), "no reading: Prometheus at http://x"),
        (reading([0.01] * 3, [0.01] * 3, samples=100), "too few samples: challenger has 100, champion has 100 < 500"),
        (reading([0.01, None, 0.01], [0.01] * 3), "the query returned nothing at 1 of 3 looks"),
        (reading([0.01], [0.01]), "1 of 3 looks (1s apart) fit in the phase so far"),
        (pg.Reading(looks=[1.0, 2.0, 3.0], values={}, samples={"challenger": None, "champion": 5}),
         "samples_query returned nothing for challenger"),
    ],
)  # fmt: skip
def test_what_cannot_be_judged_is_inconclusive_with_its_reason(data: pg.Reading, reason: str) -> None:
    result = pg.judge(guardrail(), data, "canary", True)
    assert result.verdict == "inconclusive" and reason in result.detail, result.detail


def test_look_times_stay_within_the_phase() -> None:
    cfg = guardrail(looks=3, step_s=10)
    assert pg.look_times(cfg, since=0, at=100) == [80, 90, 100]
    assert pg.look_times(cfg, since=85, at=100) == [90, 100]


# --- settings and the controller's refusal -------------------------------------------------------------


@pytest.mark.slow  # builds the controller: ~10 s of imports
def test_a_spec_needing_prometheus_without_a_url_is_refused_when_the_controller_loads_it(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec_with(CHARGEBACKS)))
    settings = Settings(home=tmp_path / "home", rollout_spec=str(spec_file))
    with pytest.raises(SpecError) as caught:
        build_controller(settings)
    assert "guardrails[" in str(caught.value) and "(chargebacks).kind: prometheus needs a Prometheus server" in str(
        caught.value
    )
    assert "MLOPS_PROMETHEUS_URL" in str(caught.value)
    with_url = Settings(home=tmp_path / "home", rollout_spec=str(spec_file), prometheus_url="http://127.0.0.1:9")
    assert build_controller(with_url).prometheus is not None
    assert pg.source_problems(fast_spec(), "") == []  # a spec without one needs none


@pytest.mark.parametrize("url", ["localhost:9090", "ftp://prom:9090", "http://"])
def test_a_bad_prometheus_url_is_refused_naming_the_setting(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLOPS_PROMETHEUS_URL", url)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert "MLOPS_PROMETHEUS_URL" in str(caught.value) and "must be an http(s) URL with a host" in str(caught.value)


# --- against a real Prometheus -------------------------------------------------------------------------

METRICS = """# TYPE good_ratio gauge
good_ratio{variant="champion"} 0.010
good_ratio{variant="challenger"} 0.0105
# TYPE bad_ratio gauge
bad_ratio{variant="champion"} 0.010
bad_ratio{variant="challenger"} 0.025
# TYPE payments_total counter
payments_total{variant="champion"} 5000
payments_total{variant="challenger"} 600
"""


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus (Debian's package) on a free port, scraping a real /metrics endpoint every second."""

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = METRICS.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return

    exporter = ThreadingHTTPServer(("127.0.0.1", free_port()), Metrics)
    threading.Thread(target=exporter.serve_forever, daemon=True).start()
    try:
        root = tmp_path_factory.mktemp("prometheus")
        with running_prometheus(root, [f"127.0.0.1:{exporter.server_port}"], job="business") as url:
            wait_for_scrapes(url, "good_ratio", 4)  # enough scrapes that three looks a second apart all have data
            yield url
    finally:
        exporter.shutdown()
        exporter.server_close()


def judged(url: str, cfg: PrometheusGuardrail, phase_kind: str = "canary", champion_serves: bool = True) -> Any:
    client = pg.PrometheusClient(url)
    at = time.time()
    candidate, baseline = pg.roles(phase_kind, champion_serves)
    variants = [candidate, baseline] if baseline and cfg.max_relative_increase is not None else [candidate]
    return pg.judge(cfg, pg.read(client, cfg, variants, at - 60, at), phase_kind, champion_serves)


@pytest.mark.slow
def test_real_prometheus_a_challenger_within_the_margin_passes(prometheus: str) -> None:
    result = judged(prometheus, guardrail())
    assert result.verdict == "pass", result.detail
    assert result.value == pytest.approx(0.0105) and result.baseline == pytest.approx(0.010)
    assert result.samples == 600


@pytest.mark.slow
def test_real_prometheus_a_challenger_beyond_the_margin_fails(prometheus: str) -> None:
    result = judged(prometheus, guardrail(query='bad_ratio{variant="{variant}"}'))
    assert result.verdict == "fail", result.detail
    assert "broken at all 3 looks" in result.detail


@pytest.mark.slow
def test_real_prometheus_the_watch_holds_the_promoted_model_to_the_bound(prometheus: str) -> None:
    assert judged(prometheus, guardrail(), "watch", False).verdict == "pass"
    assert judged(prometheus, guardrail(bound=0.005), "watch", False).verdict == "fail"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"min_samples": 1000}, "too few samples: challenger has 600 < 1000"),
        ({"query": 'no_such_metric{variant="{variant}"}'}, "the query returned nothing at 3 of 3 looks"),
        ({"samples_query": 'no_such_count{variant="{variant}"}'}, "samples_query returned nothing"),
        ({"query": 'good_ratio{variant!="{variant}x"}'}, "query returned 2 series"),
        ({"query": 'good_ratio{variant="{variant}"'}, "Prometheus answered HTTP 400"),
    ],
)
def test_real_prometheus_what_cannot_be_judged_is_inconclusive_with_the_reason(
    prometheus: str, changes: dict[str, Any], reason: str
) -> None:
    result = judged(prometheus, guardrail(**changes))
    assert result.verdict == "inconclusive" and reason in result.detail, result.detail


def test_an_unreachable_prometheus_is_inconclusive_never_a_pass() -> None:
    result = judged(f"http://127.0.0.1:{free_port()}", guardrail())
    assert result.verdict == "inconclusive"
    assert "unreachable" in result.detail and "ConnectError" in result.detail


@pytest.mark.slow
def test_real_prometheus_through_the_analysis_next_to_the_log_guardrails(prometheus: str, tmp_path: Path) -> None:
    """The controller's analysis: the prediction log's guardrails and the prometheus one in one result."""
    spec = load_spec(spec_with(CHARGEBACKS, {**CHARGEBACKS, "name": "chargebacks-bad",
                                              "query": 'bad_ratio{variant="{variant}"}'}))  # fmt: skip
    since = write_canary_log(tmp_path, 2_000, challenger_error_rate=0.0)
    at = time.time() + 2  # three looks a second apart, all after the window's start
    client = pg.PrometheusClient(prometheus)
    result = analyse(spec, "canary", 1, tmp_path, since, at=at, threshold=0.5, prometheus=client)
    assert result.verdicts["chargebacks"] == "pass", result.values["chargebacks"]["detail"]
    assert result.verdicts["chargebacks-bad"] == "fail"
    assert result.verdicts["error-rate"] == "pass"
    assert result.values["chargebacks"]["test"] == pg.TEST_NAME
    without = analyse(spec, "canary", 1, tmp_path, since, at=at, threshold=0.5)
    assert without.verdicts["chargebacks"] == "inconclusive"
    assert "no Prometheus configured" in without.values["chargebacks"]["detail"]


def test_on_kind_the_controller_reads_the_charts_prometheus(helm: Helm) -> None:  # noqa: F811
    docs = render(helm)
    url = env_of(container_of(docs, "controller"))["MLOPS_PROMETHEUS_URL"]
    assert Settings(prometheus_url=url).prometheus_url == url  # valid as a setting
    parts = urlsplit(url)
    assert find(docs, "Service", str(parts.hostname))["spec"]["ports"][0]["port"] == parts.port
    without = render(helm, "--set", "prometheus.enabled=false")
    assert "MLOPS_PROMETHEUS_URL" not in env_of(container_of(without, "controller"))


def test_on_kind_the_charts_prometheus_can_scrape_the_system_with_the_business_metrics(helm: Helm) -> None:  # noqa: F811
    extra = [{"job_name": "payments", "static_configs": [{"targets": ["payments.shop:9100"]}]}]
    docs = render(helm, "--set-json", f"prometheus.extraScrapeConfigs={json.dumps(extra)}")
    config = yaml.safe_load(find(docs, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["payments"] == extra[0] and {"gateway", "controller"} <= set(jobs)
    refused = run_helm(helm, "template", "mlops", str(CHART), "--set-json", 'prometheus.extraScrapeConfigs=[{"x":1}]')
    assert refused.returncode != 0 and "job_name" in refused.stderr
