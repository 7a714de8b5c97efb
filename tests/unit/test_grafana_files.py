"""The provisioned Grafana files hold together: formats, references, commands, mounts.

Grafana itself does not run here; what it would refuse at start-up is checked
instead, against the fields its file provisioning reads (datasources,
dashboard providers, alert rules, apiVersion 1). The SQL of every panel and
rule runs against a real database in tests/integration/test_read_models.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
import yaml
from grafana_files import (
    COMPOSE,
    DASHBOARDS,
    DEPLOY,
    alert_rules,
    dashboards,
    datasources,
    panel_queries,
)

from sagaworks.entrypoints.cli.app import app

pytestmark = pytest.mark.unit

DATASOURCE_TYPE = "grafana-postgresql-datasource"
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
NO_DATA_STATES = {"NoData", "Alerting", "OK", "KeepLast"}
EXEC_ERR_STATES = {"Error", "Alerting", "OK", "KeepLast"}
PANEL_TYPES = {"stat", "table", "timeseries"}
REQUIRED_ALERTS = {
    "sagaworks-needs-attention",
    "sagaworks-stuck",
    "sagaworks-outbox-lag",
    "sagaworks-timer-lag",
    "sagaworks-breaker-open-long",
    "sagaworks-dead-letters-growing",
    "sagaworks-no-live-worker",
}


def grafana_service() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    return service


def mounts() -> dict[str, str]:
    """Host path (resolved) -> container path of the Grafana service's bind mounts."""
    found = {}
    for volume in grafana_service()["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            found[str((COMPOSE.parent / source).resolve())] = target
    return found


def the_datasource() -> dict[str, Any]:
    (only,) = datasources()
    return only


def test_the_datasource_is_the_read_only_role_with_a_fixed_uid() -> None:
    assert (
        yaml.safe_load((DEPLOY / "provisioning/datasources/sagaworks.yaml").read_text())[
            "apiVersion"
        ]
        == 1
    )
    source = the_datasource()
    assert source["type"] == DATASOURCE_TYPE
    assert source["uid"] == "sagaworks-postgres"
    assert source["access"] == "proxy"
    assert source["user"] == "sagaworks_readonly"
    assert source["jsonData"]["database"] == "sagaworks"
    secret = re.fullmatch(r"\$__file\{/run/secrets/(\w+)\}", source["secureJsonData"]["password"])
    assert secret is not None, "the password is read from a mounted secret, never written here"
    assert secret.group(1) in grafana_service()["secrets"]


def test_grafana_is_pinned_and_mounts_what_it_provisions() -> None:
    image = grafana_service()["image"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", image), image
    targets = mounts()
    assert targets[str((DEPLOY / "provisioning").resolve())] == "/etc/grafana/provisioning"
    providers = yaml.safe_load((DEPLOY / "provisioning/dashboards/sagaworks.yaml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert targets[str(DASHBOARDS.resolve())] == provider["options"]["path"]


def test_there_are_the_four_dashboards_an_on_call_engineer_opens_first() -> None:
    titles = {board["title"] for board in dashboards().values()}
    assert titles == {
        "sagaworks: overview",
        "sagaworks: ports and recoverability",
        "sagaworks: dead letters and stuck sagas",
        "sagaworks: workers",
    }


@pytest.mark.parametrize("name", sorted(dashboards()))
def test_a_dashboard_has_what_grafana_loads(name: str) -> None:
    board = dashboards()[name]
    assert 0 < len(board["uid"]) <= 40
    assert isinstance(board["schemaVersion"], int)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique within a dashboard"
    reference = {"type": DATASOURCE_TYPE, "uid": the_datasource()["uid"]}
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES
        assert panel["title"]
        assert panel["description"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["w"] > 0
        assert grid["x"] + grid["w"] <= 24
        assert panel["datasource"] == reference
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == reference
            assert target["refId"]
            assert target["rawQuery"] is True
            assert target["rawSql"].strip()
            assert target["format"] in {"table", "time_series"}
            if target["format"] == "time_series":
                assert panel["type"] == "timeseries"


def test_dashboard_uids_are_unique() -> None:
    uids = [board["uid"] for board in dashboards().values()]
    assert len(uids) == len(set(uids))


def test_every_query_reads_only_the_read_models() -> None:
    for query in panel_queries():
        tables = re.findall(r"\b(?:FROM|JOIN)\s+([\w.]+)", query.sql, flags=re.IGNORECASE)
        assert tables, query.where
        assert all(t.startswith("sagaworks_read.") for t in tables), (query.where, tables)
        assert "$" not in query.sql, "Grafana would expand $ in provisioned text"


def rules() -> list[dict[str, Any]]:
    return [rule for group in alert_rules()["groups"] for rule in group["rules"]]


def test_the_alert_file_has_what_grafana_provisions() -> None:
    document = alert_rules()
    assert document["apiVersion"] == 1
    for group in document["groups"]:
        assert group["orgId"] == 1
        assert group["name"]
        assert group["folder"]
        assert DURATION.match(group["interval"])
    assert {rule["uid"] for rule in rules()} == REQUIRED_ALERTS


@pytest.mark.parametrize("uid", sorted(REQUIRED_ALERTS))
def test_an_alert_rule_is_complete_and_its_references_resolve(uid: str) -> None:
    (rule,) = [r for r in rules() if r["uid"] == uid]
    assert len(rule["uid"]) <= 40
    assert rule["title"]
    assert rule["noDataState"] in NO_DATA_STATES
    assert rule["execErrState"] in EXEC_ERR_STATES
    assert DURATION.match(rule["for"])
    refs = {query["refId"] for query in rule["data"]}
    assert rule["condition"] in refs
    for query in rule["data"]:
        assert query["model"]["refId"] == query["refId"]
        window = query["relativeTimeRange"]
        assert window["from"] > window["to"] >= 0
        if query["datasourceUid"] == "__expr__":
            assert query["model"]["expression"] in refs - {query["refId"]}
        else:
            assert query["datasourceUid"] == the_datasource()["uid"]
            assert query["model"]["format"] == "table"
    text = " ".join(str(v) for v in rule["annotations"].values())
    assert "$" not in text, "Grafana would expand $ in provisioned text"


def resolve(command_line: str) -> Any:
    """The command a `sagaworks ...` line names; its options must exist."""
    words = command_line.split()
    assert words[0] == "sagaworks"
    command: Any = typer.main.get_command(app)
    rest = words[1:]
    while hasattr(command, "get_command") and rest and not rest[0].startswith("-"):
        found = command.get_command(typer.Context(command), rest[0])
        assert found is not None, f"no command {rest[0]!r} in {command_line!r}"
        command, rest = found, rest[1:]
    options = {name for param in command.params for name in getattr(param, "opts", [])}
    for word in rest:
        if word.startswith("--"):
            assert word in options, f"{command_line!r}: {command.name} has no option {word}"
    return command


@pytest.mark.parametrize("uid", sorted(REQUIRED_ALERTS))
def test_each_alert_names_a_view_and_a_command_that_exists(uid: str) -> None:
    (rule,) = [r for r in rules() if r["uid"] == uid]
    annotations = rule["annotations"]
    assert annotations["summary"]
    assert annotations["description"]
    view = annotations["view"]
    assert view.startswith("sagaworks_read.")
    sql = " ".join(q["model"]["rawSql"] for q in rule["data"] if "rawSql" in q["model"])
    assert view in sql, "the view named is the one the rule reads"
    resolve(annotations["command"])


def test_the_dashboard_files_are_the_ones_on_disk() -> None:
    assert sorted(path.name for path in Path(DASHBOARDS).glob("*.json")) == sorted(dashboards())
