#!/usr/bin/env python3
"""Writes grafana-dashboard.json (next to this file): mantlegate's Grafana dashboard, kept as code so that its
queries read as a list. Run it after changing a panel; CI checks that the JSON is what this writes and that every
query parses (scripts/deploy-check).

Variables: the Prometheus data source, the projects shown, and the cost allocation tag that cost is split by
(project tags live on mantlegate_project_info and are joined onto cost by project)."""

from __future__ import annotations

import json
from pathlib import Path

RATE = "$__rate_interval"
P = 'project=~"$project"'


def ts(title, unit, targets, x, y, w=12, h=8, stack=False):
    return {
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"stacking": {"mode": "normal" if stack else "none"}, "fillOpacity": 20 if stack else 0},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]}},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend} for i, (expr, legend) in enumerate(targets)
        ],
    }


def stat(title, unit, expr, x, y, w=6, h=4, thresholds=None):
    steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in (thresholds or [])]
    return {
        "type": "stat",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}}, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"},
        "targets": [{"refId": "A", "expr": expr}],
    }


def row(title, y):
    return {"type": "row", "title": title, "collapsed": False, "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []}


# Project tags joined onto a per-project series: one project_info per project, whatever the number of instances.
def by_tag(expr):
    return f"sum by ($tag) ({expr} * on (project) group_left ($tag) max by (project, $tag) (mantlegate_project_info))"


panels = [
    row("Traffic", 0),
    stat("Requests / s", "reqps", f"sum(rate(mantlegate_requests_total{{{P}}}[{RATE}]))", 0, 1),
    stat(
        "5xx ratio",
        "percentunit",
        f'sum(rate(mantlegate_requests_total{{{P},status=~"5.."}}[{RATE}])) / sum(rate(mantlegate_requests_total{{{P}}}[{RATE}]))',
        6,
        1,
        thresholds=[(0.01, "orange"), (0.05, "red")],
    ),
    stat(
        "Unattributed / s",
        "reqps",
        f"sum(rate(mantlegate_unattributed_total[{RATE}]))",
        12,
        1,
        thresholds=[(1e-9, "red")],
    ),
    stat("Spend in range (USD)", "currencyUSD", f"sum(increase(mantlegate_cost_usd_total{{{P}}}[$__range]))", 18, 1),
    ts("Requests by project", "reqps", [(f"sum by (project) (rate(mantlegate_requests_total{{{P}}}[{RATE}]))", "{{project}}")], 0, 5, stack=True),
    ts(
        "Errors by status",
        "reqps",
        [(f'sum by (status) (rate(mantlegate_requests_total{{{P},status=~"[45].."}}[{RATE}]))', "{{status}}")],
        12,
        5,
    ),
    ts(
        "Latency (to the end of the response)",
        "s",
        [
            (f"histogram_quantile({q}, sum by (le) (rate(mantlegate_request_duration_seconds_bucket{{{P}}}[{RATE}])))", f"p{int(q * 100)}")
            for q in (0.5, 0.95, 0.99)
        ],
        0,
        13,
    ),
    ts(
        "Time to first byte",
        "s",
        [
            (f"histogram_quantile({q}, sum by (le) (rate(mantlegate_time_to_first_byte_seconds_bucket{{{P}}}[{RATE}])))", f"p{int(q * 100)}")
            for q in (0.5, 0.95, 0.99)
        ],
        12,
        13,
    ),
    ts(
        "Unattributed requests (never in the default project)",
        "reqps",
        [(f"sum by (outcome) (rate(mantlegate_unattributed_total[{RATE}]))", "{{outcome}}")],
        0,
        21,
    ),
    ts(
        "Upstream refusing the gateway's credential",
        "reqps",
        [(f"sum(rate(mantlegate_upstream_auth_failures_total[{RATE}]))", "refused")],
        12,
        21,
    ),
    row("Tokens and cost", 29),
    ts(
        "Tokens / min by project and kind",
        "short",
        [(f"60 * sum by (project, kind) (rate(mantlegate_tokens_total{{{P}}}[{RATE}]))", "{{project}} {{kind}}")],
        0,
        30,
        stack=True,
    ),
    ts(
        "Cost (USD / hour) by project",
        "currencyUSD",
        [(f"3600 * sum by (project) (rate(mantlegate_cost_usd_total{{{P}}}[{RATE}]))", "{{project}}")],
        12,
        30,
        stack=True,
    ),
    ts(
        "Cost (USD / hour) by $tag",
        "currencyUSD",
        [(f"3600 * {by_tag(f'sum by (project) (rate(mantlegate_cost_usd_total{{{P}}}[{RATE}]))')}", "{{$tag}}")],
        0,
        38,
        stack=True,
    ),
    ts(
        "Cost (USD / hour) by model",
        "currencyUSD",
        [(f"3600 * sum by (model) (rate(mantlegate_cost_usd_total{{{P}}}[{RATE}]))", "{{model}}")],
        12,
        38,
        stack=True,
    ),
    ts(
        "Responses not metered or not priced",
        "reqps",
        [
            (f"sum by (reason) (rate(mantlegate_unmetered_requests_total{{{P}}}[{RATE}]))", "unmetered: {{reason}}"),
            (f"sum by (model) (rate(mantlegate_unpriced_requests_total{{{P}}}[{RATE}]))", "unpriced: {{model}}"),
        ],
        0,
        46,
        w=24,
    ),
    row("Operations", 54),
    ts(
        "Config reloads",
        "short",
        [(f"sum by (result) (increase(mantlegate_config_reloads_total[{RATE}]))", "{{result}}")],
        0,
        55,
        w=8,
    ),
    ts(
        "Configs in force (instances per config hash)",
        "short",
        [("count by (sha256) (mantlegate_config_info)", "{{sha256}}")],
        8,
        55,
        w=8,
    ),
    ts(
        "Ledger lines dropped",
        "short",
        [(f"sum(increase(mantlegate_ledger_dropped_total[{RATE}]))", "dropped")],
        16,
        55,
        w=8,
    ),
    ts(
        "AWS credential refreshes",
        "short",
        [(f"sum by (result) (increase(mantlegate_aws_credential_refreshes_total[{RATE}]))", "{{result}}")],
        0,
        63,
    ),
    ts(
        "AWS credentials: time left",
        "s",
        [("min by (instance) (mantlegate_aws_credential_expiry_timestamp_seconds > 0) - time()", "{{instance}}")],
        12,
        63,
    ),
    ts(
        "Projects not as configured upstream (upstream.projects_check_interval)",
        "short",
        [('max by (project, status) (mantlegate_project_upstream_status{status!="active"} == 1)', "{{project}}: {{status}}")],
        0,
        71,
        w=24,
    ),
    row("Limits and budgets", 79),
    ts(
        "Requests refused by a limit (per min), by project and limit",
        "short",
        [(f"60 * sum by (project, limit) (rate(mantlegate_limit_rejections_total{{{P}}}[{RATE}]))", "{{project}}: {{limit}}")],
        0,
        80,
        stack=True,
    ),
    # Every replica reports the shared counter (Redis backend): max, not sum, over instances.
    ts(
        "Budgets: spent vs limit (USD)",
        "currencyUSD",
        [
            ('max by (subject, limit) (mantlegate_limit_used{limit=~"usd_per_day|usd_per_month"})', "{{subject}} {{limit}}: spent"),
            ('max by (subject, limit) (mantlegate_limit{limit=~"usd_per_day|usd_per_month"})', "{{subject}} {{limit}}: limit"),
        ],
        12,
        80,
    ),
    ts(
        "Limits backend up (per instance)",
        "short",
        [("min by (instance) (mantlegate_limit_backend_up)", "{{instance}}")],
        0,
        88,
        w=8,
    ),
    ts(
        "Limits backend errors, and what on_backend_error decided",
        "short",
        [
            (f"sum by (operation) (increase(mantlegate_limit_backend_errors_total[{RATE}]))", "failed: {{operation}}"),
            (f"sum by (decision) (increase(mantlegate_limit_backend_error_decisions_total[{RATE}]))", "requests {{decision}}"),
        ],
        8,
        88,
        w=8,
    ),
    ts(
        "Reservations in flight (per instance)",
        "short",
        [("sum by (instance) (mantlegate_limit_reservations_in_flight)", "{{instance}}")],
        16,
        88,
        w=8,
        stack=True,
    ),
]

dashboard = {
    "uid": "mantlegate",
    "title": "mantlegate",
    "description": (
        "Requests, errors, latency, tokens and cost by project and cost allocation tag, unattributed traffic, "
        "limits and budgets"
    ),
    "tags": ["mantlegate", "bedrock"],
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "templating": {
        "list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus"},
            {
                "name": "project",
                "label": "Project",
                "type": "query",
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "query": {"query": "label_values(mantlegate_project_info, project)", "refId": "project"},
                "definition": "label_values(mantlegate_project_info, project)",
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "refresh": 2,
            },
            {
                "name": "tag",
                "label": "Split cost by tag",
                "type": "custom",
                "query": "Application,Environment,Team,CostCenter",
                "current": {"text": "Team", "value": "Team"},
                "options": [],
            },
        ]
    },
    "panels": panels,
}

if __name__ == "__main__":
    out = Path(__file__).with_name("grafana-dashboard.json")
    out.write_text(json.dumps(dashboard, indent=2) + "\n")
