"""deploy/prometheus/alerts.yml names only what coilguard exports: a renamed metric or label would leave an alert
that can never fire, and nobody would notice until the day it should have."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from services.metrics import METRICS

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> dict[str, set[str]]:
    """Each sample name coilguard's metrics export, with the labels it carries."""
    names: dict[str, set[str]] = {}
    for metric in vars(METRICS).values():
        if isinstance(metric, MetricWrapperBase):
            extra = {"le"} if metric._type == "histogram" else set()
            for suffix in SUFFIXES[metric._type]:
                names[metric._name + suffix] = set(metric._labelnames) | extra
    return names


def test_every_alert_reads_metrics_and_labels_coilguard_exports() -> None:
    rules = [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]
    metrics = exported()
    assert len(rules) >= 9 and all({"alert", "expr", "annotations"} <= rule.keys() for rule in rules)
    for rule in rules:
        used = re.findall(r"(coilguard_[a-z0-9_]+)(?:\{([^}]*)\})?", rule["expr"])
        assert used, rule["alert"]
        for name, selector in used:
            assert name in metrics, f"{rule['alert']}: {name} is not exported"
            labels = set(re.findall(r"([a-z_]+)\s*=~?", selector))
            grouped = set(re.findall(r"by \(([^)]*)\)", rule["expr"]))
            by = {label.strip() for group in grouped for label in group.split(",")}
            assert labels | by <= metrics[name], f"{rule['alert']}: {(labels | by) - metrics[name]} not on {name}"


def test_no_metric_carries_a_label_prometheus_sets_itself() -> None:
    """A scraped series gets `job` and `instance` from Prometheus; a metric's own label of that name is renamed to
    `exported_job`, and an alert selecting on it never fires (the scheduler's job metrics first had `job`)."""
    clashing = {
        name: labels & {"job", "instance"} for name, labels in exported().items() if labels & {"job", "instance"}
    }
    assert not clashing
