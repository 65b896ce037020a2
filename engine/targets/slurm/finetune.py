"""A fine-tune on SLURM: modeldeck's own fine-tune entry point in a batch job, followed from here.

The run's folder in the shared work directory holds its spec (finetune.json), its own copy of the data,
the batch script and SLURM's output file, where the entry point tells its progress as events
(engine/jobs/reported.py); the adapter is written to the work directory's models/ folder, which this
machine reads too. The batch job asks for SIGUSR1 a while before its time limit and saves a checkpoint
then; requeued (a preemption) or retried (`r`), the run resumes from its newest checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from catalog.schema import Model
from engine import hub
from engine.finetune import latest_checkpoint
from engine.jobs import JobCancelled
from engine.jobs.harness import JobContext, JobFailure
from engine.jobs.reported import RunEvents
from engine.jobs.training import Stopping, copy_dataset, succeed_with
from engine.localmodel import output_folders
from engine.targets.slurm import SlurmTarget, commands
from engine.targets.slurm.run import POLL_S, BatchJob

STOP_WAIT_S = 45.0  # a stopped run saves a checkpoint as it ends: wait for that (within the stop's deadline)
SILENT_S = 120.0  # a running batch job that has written nothing this long may not see the work directory
PHASE_EVERY_S = 5.0  # an unchanged phase (queued for hours, say) is written again at most this often


class SlurmFinetune:
    def __init__(self, ctx: JobContext, target: SlurmTarget):
        self.ctx, self.target, self.params = ctx, target, ctx.params
        with ctx.db.read() as session:
            adapter = session.get(Model, ctx.model_id)
        self.name, self.output, self.on = adapter.name, Path(adapter.path), adapter.meta["slurm"]
        self.run_dir = Path(self.on["run"])
        os.umask(0o077)  # what this supervisor writes in the work directory (the run's spec and data): the user's
        self.stopping = Stopping()
        self.events = RunEvents(ctx, self.set_phase)
        self.batch = BatchJob(ctx, self.run_dir, self.params.get("attempt", 1), self.on["gpus"] > 0)
        self.phase: tuple[str, float, float] | None = None  # its name, since when, when last written

    def set_phase(self, name: str) -> None:
        """The run's phase and the time in it: written when it changes, else every PHASE_EVERY_S (a job can
        wait in the queue for days: not a database write a second)."""
        stamp = time.monotonic()
        if self.phase is None or self.phase[0] != name:
            self.phase = (name, stamp, 0.0)
        elif stamp - self.phase[2] < PHASE_EVERY_S:
            return
        self.phase = (name, self.phase[1], stamp)
        self.ctx.report(metrics={"phase": name, "elapsed_s": round(stamp - self.phase[1])})

    def run(self) -> None:
        """Whatever ends the follow but the batch job's own end (a stop, an outage that lasted, a fault here)
        ends the batch job too: nothing of the run goes on that nobody follows."""
        try:
            if self.batch.job_id is None:
                self.submit()
            else:
                self.ctx.log(f"following batch job {self.batch.job_id} again ({self.run_dir})")
            self.follow()
        except BaseException:
            self.batch.end(STOP_WAIT_S)
            raise

    def submit(self) -> None:
        """The run's folder (its spec, its own copy of the data) and its batch job."""
        base = self.ctx.wait_for_model(self.params["base_id"], "the base model", self.stopping.check)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)  # the data and the script are the user's alone
        source = Path(self.params["dataset"])
        copy = self.run_dir / ("dataset" + source.suffix)
        if not copy.exists():
            copy_dataset(source, copy)
        spec = {"base_name": base.name, "base_repo": base.repo_id, "revision": base.revision, "base_path": base.path,
                "dataset": str(copy), "dataset_name": source.name, "hyperparameters": self.params["hyperparameters"],
                "gpus": self.params["gpus"], "output": str(self.output), "attempt": self.params.get("attempt", 1)}
        (self.run_dir / "finetune.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
        text = self.target.finetune_script(self.name, self.run_dir, self.on["options"], self.on["gpus"],
                                           downloads=not base.path)
        env = {}
        if not base.path and (token := hub.token()):  # the job downloads its base: the user's token goes with it
            env["HF_TOKEN"] = token
        self.set_phase("submitting its batch job")
        try:
            self.batch.submit(text, env)
        except commands.SlurmError as exc:
            raise JobFailure(str(exc)) from None

    def follow(self) -> None:
        running_since = None
        while True:
            if self.stopping.requested:
                self.stop()
            if (now := self.batch.watch()) is None:  # the controller is away; the run goes on meanwhile
                self.pause()
                continue
            for line, new in self.batch.new_lines():
                self.events.line(line, echo=new)
            self.events.flush()
            if now.state == "pending":
                running_since = None
                self.set_phase(now.queued)
            elif now.state == "running":
                running_since = running_since or time.monotonic()
                if not self.events.training:
                    self.set_phase(self.events.run_phase or now.starting)
                if not self.batch.read_to and time.monotonic() - running_since > SILENT_S:
                    self.set_phase(f"running on {now.node}, but nothing of it reached {self.run_dir} after "
                                   f"{SILENT_S:.0f} s: is the work directory shared with the compute nodes?")
            else:
                for line, new in self.batch.new_lines():  # what it wrote last
                    self.events.line(line, echo=new)
                self.events.flush()
                self.ended(now)
                return
            self.pause()

    def ended(self, now) -> None:
        outcome = self.events.outcome or {}
        if "done" in outcome:
            lineage = outcome["done"]
            self.ctx.log(f"adapter written to {self.output}")
            succeed_with(self.ctx, lineage, lineage.get("size_bytes") or hub.snapshot_size(self.output))
            return
        if self.stopping.requested:
            raise JobCancelled()
        if now.ending.succeeded:
            raise JobFailure("the batch job completed, but its log does not say the adapter was written "
                             f"(see {self.batch.log_file})")
        reason = outcome.get("failed") or now.ending.reason
        if outcome.get("cancelled") and not now.ending.cancelled and now.raw_state != "TIMEOUT":
            reason = f"{now.ending.reason}: the run stopped, saving a checkpoint"
        checkpoint = latest_checkpoint(output_folders(self.output)[1] / "checkpoints")
        if checkpoint is not None:
            reason += f"; r resumes from its checkpoint at step {checkpoint.name.split('-')[-1]}"
        raise JobFailure(reason)

    def stop(self) -> None:
        """Cancel the batch job (in `run`): SLURM signals the run, which saves a checkpoint as it stops."""
        self.ctx.log(f"cancelling batch job {self.batch.job_id}")
        raise JobCancelled()

    def pause(self) -> None:
        for _ in range(int(POLL_S / 0.1)):  # a stop is seen within 0.1 s
            if self.stopping.requested:
                return
            time.sleep(0.1)
