"""Shared set-up for the benchmarks: a throwaway MODELDECK_HOME and a catalog of N synthetic rows."""

from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def fresh_home() -> Path:
    home = Path(tempfile.mkdtemp(prefix="modeldeck-bench-"))
    os.environ["MODELDECK_HOME"] = str(home / "home")
    os.environ["HF_HOME"] = str(home / "hf")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return home


WORDS = ("chat code reasoning vision tiny small instruct base distilled multilingual tools embedding "
         "retrieval math story agent sql legal medical finance").split()


def add_synthetic_community_rows(db, count: int) -> None:
    from catalog.schema import CommunityModel

    rng = random.Random(0)
    with db.write() as session:
        for i in range(count):
            tags = sorted(set(rng.sample(WORDS, 4)))
            session.add(CommunityModel(
                repo_id=f"bench-org{i % 97}/model-{i}", name=f"Bench Model {i} {rng.choice(WORDS).title()}",
                link=f"https://huggingface.co/bench-org{i % 97}/model-{i}",
                description=" ".join(rng.choice(WORDS) for _ in range(10)), task="chat",
                tags_json=CommunityModel.dumps(tags), params=rng.randint(10**8, 7 * 10**10), license="apache-2.0",
                position=1000 + i))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
