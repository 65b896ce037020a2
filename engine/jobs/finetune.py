"""Fine-tune job: `python -m engine.jobs.finetune DB JOB_ID` runs (or, on a cluster, follows) a fine-tune
where its target says, recording progress in the database; `python -m engine.jobs.finetune --spec FILE`
is the run itself where there is no database (a Job on Kubernetes, a batch job on SLURM), telling its
progress in its log (engine/jobs/training.py, run_from_spec)."""

from __future__ import annotations

import sys
from pathlib import Path

from engine.jobs.harness import JobContext, main


def work(ctx: JobContext) -> None:
    from engine import targets

    targets.resolve(ctx.params.get("target", "")).run_finetune(ctx)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--spec"]:
        from engine.jobs.training import run_from_spec

        sys.exit(run_from_spec(Path(sys.argv[2])))
    main(work)
