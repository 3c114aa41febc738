"""The classification flags of `gristmill run` and `gristmill submit`, and their translation for the API."""

from __future__ import annotations

import argparse
from typing import Any

from schema.classify import load_labels_file, split_labels
from schema.errors import InputError


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["generate", "classify"], default="generate",
                   help="classify: give each line {custom_id|id, text, labels?} a label and its probabilities")
    p.add_argument("--labels", help="classify: comma-separated labels, e.g. positive,negative")
    p.add_argument("--labels-file", help="classify: a YAML list of labels (or a mapping with a 'labels' list)")
    p.add_argument("--instruction", help="classify: the question asked about each text; {labels} lists them")
    p.add_argument("--method", choices=["score", "choice"], default="score",
                   help="classify: score every label (default), or guided generation of one")
    p.add_argument("--no-calibrate", action="store_true",
                   help="classify: raw label probabilities, without contextual calibration")
    p.add_argument("--multi-label", action="store_true", help="classify: each label yes or no on its own")
    p.add_argument("--threshold", type=float, default=0.5, help="classify --multi-label: a label applies from here")


def api_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The api.submit keyword arguments of these flags (none for a generation batch)."""
    if args.task != "classify":
        if args.labels or args.labels_file or args.multi_label or args.instruction:
            raise InputError("--task", None, None, "--labels, --labels-file, --instruction and --multi-label "
                                                   "need --task classify")
        return {}
    if args.labels is not None and args.labels_file:
        raise InputError("--labels", None, None, "give --labels or --labels-file, not both")
    labels = load_labels_file(args.labels_file) if args.labels_file else (
        split_labels(args.labels) if args.labels is not None else None)
    return {"task": "classify", "labels": labels, "instruction": args.instruction, "method": args.method,
            "calibrate": not args.no_calibrate, "multi_label": args.multi_label, "threshold": args.threshold}
