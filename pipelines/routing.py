"""Multi-student routing: each condition belongs to exactly one student (MSD, spec 2.9).

    >>> from pipelines.routing import Router
    >>> captions = ["a red circle", "a blue square", "a small green triangle", "a large red star"]
    >>> router = Router.from_keywords(captions, ["circle", "square", "triangle", "star"], students=2)
    >>> [router.route(c) for c in captions]            # deterministic, balanced over the captions
    [0, 1, 1, 0]

``keywords`` routing (caption-attribute partitions): a caption goes to the group of the keyword
(one or more words) that occurs first in it (for the shapes captions, keywords "red circle" ...:
the first object's colour and shape); captions with no keyword go to ``fallback``. Groups are built greedily from
the training captions so the students get equal shares. The router is saved with the students
(``router.json``) and routes prompts at inference.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path


def _first_keyword(caption: str, keywords) -> str | None:
    """The keyword (one or more words) occurring earliest in ``caption``; ties go to the longer one."""
    text = " " + " ".join(re.findall(r"[a-z0-9]+", caption.lower())) + " "
    best, best_pos = None, None
    for k in keywords:
        pos = text.find(" " + k + " ")
        if pos >= 0 and (best_pos is None or pos < best_pos or (pos == best_pos and len(k) > len(best))):
            best, best_pos = k, pos
    return best


@dataclass
class Router:
    students: int
    groups: dict[str, int]            # keyword -> student
    fallback: int = 0

    def route(self, caption: str) -> int:
        hit = _first_keyword(caption, self.groups)
        return self.groups[hit] if hit is not None else self.fallback

    @classmethod
    def from_keywords(cls, captions: list[str], keywords: list[str], students: int) -> Router:
        """Assign keywords to ``students`` groups so each gets about the same number of captions."""
        if students < 1:
            raise ValueError(f"students must be >= 1, got {students}")
        if len(keywords) < students:
            raise ValueError(f"{len(keywords)} keywords cannot make {students} non-empty groups")
        counts = {k: 0 for k in keywords}
        for c in captions:
            hit = _first_keyword(c, counts)
            if hit is not None:
                counts[hit] += 1
        loads = [0] * students
        groups: dict[str, int] = {}
        for k in sorted(keywords, key=lambda w: (-counts[w], w)):       # largest first onto the lightest group
            s = min(range(students), key=lambda i: (loads[i], i))
            groups[k] = s
            loads[s] += counts[k]
        return cls(students, groups, fallback=min(range(students), key=lambda i: loads[i]))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"format": "msd-router", **asdict(self)}, indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Router:
        data = json.loads(Path(path).read_text())
        if data.pop("format", None) != "msd-router":
            raise ValueError(f"{path}: not an msd-router file")
        return cls(**data)
