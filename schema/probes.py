"""Probes in SQL: classifiers learned from labelled texts on a model's hidden states (`--method probe`).

At submission a training set becomes a probe row, named by its content's hash, and the batch's items
carry only the id; the first worker that needs the probe trains it (worker.kinds.probe) and stores its
weights in the row; every batch naming the id after that reuses them, across batches and nightly runs.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from schema.errors import InputError
from schema.tables import Probe

if TYPE_CHECKING:  # schema.kinds.classify imports this module
    from schema.kinds.classify import ClassifySpec


def new_probe(spec: ClassifySpec, model: str, now: datetime) -> dict[str, Any]:
    """The row of the probe `spec.train` asks for, untrained; the same content gives the same id."""
    assert spec.train is not None and spec.labels is not None, "ClassifySpec checked them"
    training = [example.model_dump() for example in spec.train]
    content = json.dumps([model, spec.layer, spec.labels, spec.multi_label, training], sort_keys=True)
    return {"id": "probe_" + hashlib.sha256(content.encode()).hexdigest()[:24], "created_at": now, "model": model,
            "layer": spec.layer, "labels": spec.labels, "multi_label": spec.multi_label, "training": training}


def reused(session: Session, spec: ClassifySpec, model: str) -> ClassifySpec:
    """The spec of a batch that names a probe learned before, with the probe's labels; InputError when
    there is no such probe, or it was learned on another model or for other labels."""
    probe = session.get(Probe, spec.probe)
    if probe is None:
        raise InputError("probe", None, None, f"there is no probe {spec.probe!r}; `gristmill probes` lists them")
    if probe.model != model:
        raise InputError("probe", None, None, f"probe {probe.id} reads the hidden states of {probe.model}, not {model}")
    if spec.labels is not None and spec.labels != probe.labels:
        raise InputError("labels", None, None, f"probe {probe.id} classifies into {probe.labels}, not {spec.labels}")
    if spec.multi_label != probe.multi_label:
        raise InputError("multi_label", None, None, f"probe {probe.id} was learned "
                                                    f"{'multi-label' if probe.multi_label else 'single-label'}")
    return spec.model_copy(update={"labels": probe.labels})


def listed(session: Session) -> list[Probe]:
    """Every probe, newest first."""
    return list(session.scalars(select(Probe).order_by(Probe.created_at.desc())))
