"""The provisioned Grafana files, read for the tests (not a test module).

Every panel and alert rule comes out as a `GrafanaQuery`: where it is, the SQL
it runs, and what shape of result its panel or rule needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ALERT_RULES",
    "COMPOSE",
    "DASHBOARDS",
    "DATASOURCES",
    "DEPLOY",
    "GrafanaQuery",
    "alert_rules",
    "dashboards",
    "datasources",
    "panel_queries",
    "rule_queries",
]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "grafana"
COMPOSE = ROOT / "compose.yaml"
DATASOURCES = DEPLOY / "provisioning" / "datasources" / "sagaworks.yaml"
DASHBOARDS = DEPLOY / "dashboards"
ALERT_RULES = DEPLOY / "provisioning" / "alerting" / "sagaworks.yaml"


@dataclass(frozen=True)
class GrafanaQuery:
    where: str
    """`<dashboard uid> / <panel title>` or `alert <rule uid>`."""
    sql: str
    shape: str
    """`time_series`, `table` (a table panel), `stat` (numbers to show) or `alert` (one number)."""
    title: str


def datasources() -> list[dict[str, Any]]:
    loaded: list[dict[str, Any]] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    return loaded


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def alert_rules() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(ALERT_RULES.read_text())
    return loaded


def panel_queries() -> list[GrafanaQuery]:
    found = []
    for board in dashboards().values():
        for panel in board["panels"]:
            for target in panel["targets"]:
                shape = "time_series" if target["format"] == "time_series" else panel["type"]
                found.append(
                    GrafanaQuery(
                        f"{board['uid']} / {panel['title']}",
                        target["rawSql"],
                        shape,
                        panel["title"],
                    )
                )
    return found


def rule_queries() -> list[GrafanaQuery]:
    found = []
    for group in alert_rules()["groups"]:
        for rule in group["rules"]:
            for query in rule["data"]:
                if query["datasourceUid"] != "__expr__":
                    found.append(
                        GrafanaQuery(
                            f"alert {rule['uid']}", query["model"]["rawSql"], "alert", rule["title"]
                        )
                    )
    return found
