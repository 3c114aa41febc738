"""Builds bench/data/debian_topics.tsv: a second classification task, topics, from public text none of our
prompts were written for: the one-line descriptions of Debian packages, labelled by their archive section.

    python -m bench.topics_data [--per-label 200]   # needs `apt-cache` with Debian's package lists

Five sections whose packages say what they are for (games, graphics, sound, mail, database); library,
data, documentation and debug packages are left out (their lines describe a file set, not a topic).
Each label gets the same number of lines, chosen by a hash of the package name (not alphabetically),
and a description two packages share is kept once. The file is committed, so benchmarks do not
depend on the machine's package lists.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "debian_topics.tsv"
SECTIONS = {"games": "games", "graphics": "graphics", "sound": "sound", "mail": "email", "database": "database"}
NOT_A_TOPIC = re.compile(r"^lib|-(data|doc|dev|dbg|common|dbgsym|l10n|locales?|i18n|examples|tests?)\b")


def packages() -> list[tuple[str, str, str]]:
    """(name, section, one-line description) of every package in the machine's lists."""
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    found = []
    for stanza in dump.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Section|Description): (.*)$", stanza, re.MULTILINE))
        if {"Package", "Section", "Description"} <= fields.keys():
            found.append((fields["Package"], fields["Section"].split("/")[-1], fields["Description"].strip()))
    return found


def build(per_label: int) -> list[tuple[str, str]]:
    by_label: dict[str, dict[str, str]] = {label: {} for label in SECTIONS.values()}
    for name, section, description in sorted(packages(), key=lambda p: hashlib.sha256(p[0].encode()).hexdigest()):
        label = SECTIONS.get(section)
        if label and not NOT_A_TOPIC.search(name) and len(description.split()) >= 3:
            by_label[label].setdefault(description.lower(), description)
    rows = []
    for turn in range(per_label):  # labels in turn, so any prefix of the file is balanced
        for label, descriptions in by_label.items():
            texts = list(descriptions.values())
            if turn < len(texts):
                rows.append((texts[turn], label))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.topics_data", description=__doc__.splitlines()[0])
    parser.add_argument("--per-label", type=int, default=200)
    args = parser.parse_args(argv)
    rows = build(args.per_label)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(f"{text}\t{label}\n" for text, label in rows), encoding="utf-8")
    print(f"{len(rows)} lines to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
