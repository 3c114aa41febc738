"""The Celery app: JSON only, late acks, one queue per model. Configured from schema.settings."""

from __future__ import annotations

import re
import ssl
from typing import Any

from celery import Celery

from schema.settings import EMBEDDED_BROKER, Settings, get_settings

app = Celery("gristmill", include=["worker.tasks"])
RUN_CHUNK = "gristmill.run_chunk"  # by name, so a producer needs no engine code to enqueue


def queue_for(model: str) -> str:
    """A queue per model, so a worker only takes work for the model it has loaded."""
    return "gristmill." + re.sub(r"[^A-Za-z0-9_.\-]+", "_", model).strip("_")[-180:]


def broker_options(settings: Settings) -> tuple[str, dict[str, Any]]:
    if settings.broker_url != EMBEDDED_BROKER:
        # Redelivery of an unacked message happens only after this long: longer than any chunk runs.
        return settings.broker_url, {"visibility_timeout": settings.visibility_timeout_s}
    folder = settings.broker_folder.resolve()
    for sub in ("queue", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    options = {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "control_folder": str(folder / "control"),
        "polling_interval": 0.2,
    }
    return EMBEDDED_BROKER, options


def tls_options(url: str) -> dict[str, Any] | None:
    """`rediss://` URLs: verify the server's certificate unless the URL itself says otherwise."""
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


def configure(settings: Settings | None = None) -> Celery:
    """(Re)apply settings to the app; the CLI calls this after reading flags."""
    settings = settings or get_settings()
    url, options = broker_options(settings)
    app.conf.update(
        broker_use_ssl=tls_options(url),
        broker_url=url,
        broker_transport_options=options,
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],  # a pickled message is refused, never executed
        result_accept_content=["json"],
        task_acks_late=True,  # a chunk is acked only after its results are in SQL
        task_reject_on_worker_lost=True,  # a killed worker's chunk goes back to the queue
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_default_queue=queue_for(settings.model),
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


configure()
