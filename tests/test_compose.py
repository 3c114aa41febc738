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
    for service in ("redis:", "postgres:", "worker-gpu0:", "api:", "beat:", "producer:"):
        assert service in proc.stdout
    assert "appendonly" in proc.stdout and "CUDA_VISIBLE_DEVICES" in proc.stdout


def test_compose_requires_passwords() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_PASSWORD", "POSTGRES_PASSWORD")}
    proc = subprocess.run([*compose_command(), "-f", "compose.yaml", "config"], cwd=REPO, env=env,
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "REDIS_PASSWORD" in proc.stderr
