"""The per-event counters' children are looked up once, and count into the same series as
`labels(...)` would."""

from __future__ import annotations

from prometheus_client import generate_latest

from poolkeeper.metrics import Metrics


def test_children_are_remembered_and_count_into_the_labelled_series() -> None:
    metrics = Metrics()
    assert metrics.transition("Pod", "up") is metrics.transition("Pod", "up")
    for _ in range(3):
        metrics.transition("Pod", "up").inc()
    metrics.transitions.labels(kind="Pod", to="up").inc()
    metrics.backend_action("AddMember", "true").inc()
    metrics.reconciled("error").inc()
    text = generate_latest(metrics.registry).decode()
    assert 'poolkeeper_transitions_total{kind="Pod",to="up"} 4.0' in text
    assert 'poolkeeper_backend_actions_total{action="AddMember",ok="true"} 1.0' in text
    assert 'poolkeeper_reconciles_total{result="error"} 1.0' in text
