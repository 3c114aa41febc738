"""compose.yaml is accepted by `docker compose config` (the production stack cannot run here)."""

from __future__ import annotations

import os
import shutil
import subprocess

from tests.conftest import REPO


def compose_command() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    legacy = shutil.which("docker-compose")
    assert legacy, "neither `docker compose` nor `docker-compose` is installed (.ci/run installs it)"
    return [legacy]


def test_compose_config_is_valid() -> None:
    env = {**os.environ, "REDIS_PASSWORD": "secret-r", "POSTGRES_PASSWORD": "secret-p"}
    proc = subprocess.run([*compose_command(), "-f", "compose.yaml", "config"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    for service in ("redis:", "postgres:", "api:", "beat:", "prometheus:", "producer:",
                    *(f"worker-gpu{gpu}:" for gpu in range(4))):
        assert service in proc.stdout
    assert "appendonly" in proc.stdout
    for gpu in range(4):  # each worker on its own GPU, with the stack's settings
        assert f"CUDA_VISIBLE_DEVICES: '{gpu}'" in proc.stdout or f'CUDA_VISIBLE_DEVICES: "{gpu}"' in proc.stdout
    assert proc.stdout.count("GRISTMILL_BROKER_URL") >= 4


def test_compose_requires_passwords() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_PASSWORD", "POSTGRES_PASSWORD")}
    proc = subprocess.run([*compose_command(), "-f", "compose.yaml", "config"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "REDIS_PASSWORD" in proc.stderr


def test_the_dashboard_asks_only_for_metrics_that_exist(sqlite_url: str, settings_for) -> None:  # type: ignore[no-untyped-def]
    """Every metric a Grafana panel names is one that a worker or `gristmill serve` exports."""
    import json
    import re

    from prometheus_client import REGISTRY

    import worker.metrics  # noqa: F401  # registers the worker's metrics
    from producer.api_metrics import MillCollector
    from schema.db import prepare_schema
    from schema.queue import Queue

    prepare_schema(sqlite_url)
    settings = settings_for(sqlite_url)
    families = [*REGISTRY.collect(), *MillCollector(settings, Queue(settings)).collect()]
    exported = {name for family in families if family.name.startswith("gristmill")
                for name in (family.name, family.name + "_total", family.name + "_bucket")}
    dashboard = json.loads((REPO / "examples" / "monitoring" / "grafana-dashboard.json").read_text())
    asked = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"gristmill_[a-z_]+", target["expr"])}
    assert asked and asked <= exported, asked - exported
