"""The GPU ledger and placement: who holds each GPU, which GPUs "auto" chooses, the NVLink preference and the
out-of-memory reason, all functions of what NVML reports (`Gpu` readings) and of what modeldeck runs, so they
are tested here on those types, with the process table and the database real. The NVML reader itself needs a
GPU: its tests are marked `gpu`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from catalog.schema import Deployment, DeploymentState, Job, JobKind, JobState
from engine import deployments
from engine.backends import DeploySettings
from engine.errors import EngineError
from engine.gpus import (
    Claim,
    Gpu,
    GpuProcess,
    GpuState,
    Holder,
    ProcessInfo,
    choose,
    claims_of,
    holders,
    ledger,
    ledger_in,
    list_gpus,
    out_of_memory_reason,
    place,
    process_info,
)
from engine.jobs import HERE

GIB = 1024  # MiB


def gpu(index, free_gib=80, total_gib=80, processes=(), nvlink=()):
    return Gpu(index, "NVIDIA H100 80GB HBM3", total_gib * GIB, (total_gib - free_gib) * GIB, 10, 40, 120.0, 700.0,
               tuple(processes), frozenset(nvlink))


def info(pid, user="alice", command="python train.py", parents=()):
    return ProcessInfo(pid, user, command, ((pid, 1000.0 + pid), *parents))


def state(g, *held_by):
    return GpuState(g, tuple(Holder(what, True) for what in held_by))


# -- who holds a GPU ---------------------------------------------------------------------------------------

def test_a_foreign_process_is_named_with_its_user_command_and_memory():
    g = gpu(0, free_gib=10, processes=[GpuProcess(4242, 70 * GIB)])
    [h] = holders(g, [], {4242: info(4242, "bob", "python big_job.py --gpus 0")})
    assert h == Holder("pid 4242 (bob): python big_job.py --gpus 0", False, 70 * GIB, (4242,), "bob",
                       "python big_job.py --gpus 0")


def test_a_server_under_a_deployments_job_is_that_deployments_with_all_its_workers_memory():
    job_pid, started = 100, 1100.0
    claim = Claim("deployment qwen", frozenset({0, 1}), job_pid, started)
    workers = {201: info(201, parents=((150, 1150.0), (job_pid, started))),  # server → worker
               202: info(202, parents=((150, 1150.0), (job_pid, started)))}
    g = gpu(0, processes=[GpuProcess(201, 30 * GIB), GpuProcess(202, 10 * GIB)])
    assert holders(g, [claim], workers) == (Holder("deployment qwen", True, 40 * GIB, (201, 202)),)


def test_a_deployment_given_a_gpu_holds_it_before_its_server_uses_it():
    claim = Claim("deployment qwen", frozenset({1}), 100, 1100.0)
    assert holders(gpu(1), [claim], {}) == (Holder("deployment qwen", True, None, ()),)
    assert holders(gpu(0), [claim], {}) == ()  # not given GPU 0, and nothing of it runs there


def test_a_reused_pid_is_not_taken_for_a_deployments_job():
    claim = Claim("deployment qwen", frozenset(), 100, 1100.0)
    stranger = info(300, "carol", "python x.py", parents=((100, 5000.0),))  # pid 100, but started later
    [h] = holders(gpu(0, processes=[GpuProcess(300, GIB)]), [claim], {300: stranger})
    assert not h.ours and h.user == "carol"


def test_a_process_not_visible_from_here_is_still_listed_and_the_biggest_come_first():
    g = gpu(0, processes=[GpuProcess(7, 2 * GIB), GpuProcess(8, None), GpuProcess(9, 50 * GIB)])
    found = holders(g, [], {9: info(9, "dave", "vllm serve")})
    assert [h.pids for h in found] == [(9,), (7,), (8,)]
    assert found[1].what == "pid 7 (not visible from here)" and found[2].memory_mb is None


def test_the_ledger_lists_each_gpu_with_its_holders():
    claim = Claim("fine-tune job 3 (lora)", frozenset({1}), 100, 1100.0)
    states = ledger([gpu(0, processes=[GpuProcess(9, GIB)]), gpu(1)], [claim], {9: info(9)})
    assert [s.held_by_us for s in states] == [[], ["fine-tune job 3 (lora)"]]
    assert [len(s.others) for s in states] == [1, 0]


# -- the live work that claims GPUs, from the database's rows -------------------------------------------

def test_claims_come_from_live_deployments_and_unfinished_fine_tunes_on_this_machine():
    here, there = "gpu-box", "login-2"
    rows = [
        Deployment(id=1, name="qwen", backend="vllm", state=DeploymentState.READY, gpus="0,1", job_id=10),
        Deployment(id=2, name="old", backend="vllm", state=DeploymentState.STOPPED, gpus="2", job_id=11),
        Deployment(id=3, name="ext", backend="external", state=DeploymentState.READY),
        Deployment(id=4, name="far", backend="transformers", state=DeploymentState.PENDING, gpus="3", job_id=12),
        Deployment(id=5, name="batch", backend="vllm", state=DeploymentState.READY, gpus="1", job_id=13,
                   settings_json='{"target": "slurm:gpu"}'),  # a SLURM job counts GPUs on its node
    ]
    jobs = [
        Job(id=10, kind=JobKind.SERVE, state=JobState.RUNNING, pid=500, pid_started_at=1.0, host=here),
        Job(id=12, kind=JobKind.SERVE, state=JobState.RUNNING, pid=501, host=there),
        Job(id=13, kind=JobKind.SERVE, state=JobState.RUNNING, pid=502, host=here),
        Job(id=20, kind=JobKind.FINETUNE, state=JobState.RUNNING, title="lora", params_json='{"gpus": "2"}', pid=600,
            host=here),
        Job(id=21, kind=JobKind.FINETUNE, state=JobState.SUCCEEDED, params_json='{"gpus": "3"}', pid=601, host=here),
        Job(id=22, kind=JobKind.DOWNLOAD, state=JobState.RUNNING, pid=602, host=here),
    ]
    found = claims_of(rows, jobs, here)
    assert found == [Claim("deployment qwen", frozenset({0, 1}), 500, 1.0),
                     Claim("deployment batch", frozenset(), 502, None),  # its processes only, if they are here
                     Claim("fine-tune job 20 (lora)", frozenset({2}), 600, None)]


def test_the_ledger_finds_a_real_jobs_child_process_through_the_database(db):
    """A real process tree and a real database: the process a job's child runs is that job's."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "print(c.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        with db.write() as session:
            job = Job(kind=JobKind.FINETUNE, state=JobState.RUNNING, title="lora", params_json='{"gpus": "0"}',
                      pid=parent.pid, pid_started_at=psutil.Process(parent.pid).create_time(),
                      host=HERE)
            session.add(job)
            session.flush()
            job_id = job.id
        readings = [gpu(0, processes=[GpuProcess(child, 3 * GIB), GpuProcess(os.getpid(), GIB)]), gpu(1)]
        with db.read() as session:
            states = ledger_in(session, readings)
        mine, other = states[0].holders
        assert mine == Holder(f"fine-tune job {job_id} (lora)", True, 3 * GIB, (child,))
        assert not other.ours and other.user == psutil.Process().username()
        assert other.command == " ".join(psutil.Process().cmdline())  # this test's own process, whoever runs it
        assert states[1].holders == ()
    finally:
        parent.kill()
        parent.wait()


def test_process_info_reads_the_user_command_and_parents():
    me = process_info([os.getpid(), 2**22 + 12345])  # the second is no process
    assert list(me) == [os.getpid()]
    assert me[os.getpid()].lineage[1][0] == os.getppid()


# -- what auto chooses -------------------------------------------------------------------------------------

def test_auto_avoids_a_gpu_another_user_fills():
    states = [GpuState(gpu(0, free_gib=4), (Holder("pid 9 (bob): python x.py", False, 76 * GIB),)),
              GpuState(gpu(1, free_gib=79), ())]
    chosen = choose(states, 1, 20 * 2**30)
    assert chosen.gpus == "1" and chosen.why == "auto: GPU 1, the most free memory (79 GiB of 80 GiB)"


def test_auto_never_takes_a_gpu_modeldeck_work_holds_even_the_freest():
    states = [state(gpu(0, free_gib=79), "deployment qwen"), state(gpu(1, free_gib=40))]
    chosen = choose(states, 1, 10 * 2**30)
    assert chosen.gpus == "1" and "held by modeldeck: GPU 0: deployment qwen" in chosen.why


def test_auto_refuses_when_modeldeck_holds_every_gpu_and_a_typed_gpu_may_share_one():
    states = [state(gpu(0), "deployment a"), state(gpu(1), "fine-tune job 2")]
    with pytest.raises(ValueError, match="auto needs a GPU that no modeldeck work holds.*GPU 0: deployment a; "
                                         "GPU 1: fine-tune job 2.*choose GPUs by number"):
        choose(states)
    shared = place("1", states)
    assert shared.gpus == "1" and shared.shared == "GPU 1 is held by fine-tune job 2 too" and not shared.why


def test_auto_prefers_gpus_that_fit_then_nvlink_then_the_most_free():
    # 0-1 linked with 40 GiB free each; 2-3 unlinked with 70 GiB free each
    states = [state(gpu(0, 40, nvlink={1})), state(gpu(1, 40, nvlink={0})), state(gpu(2, 70)), state(gpu(3, 70))]
    assert choose(states, 2, 60 * 2**30).gpus == "0,1"  # 30 GiB a GPU: both pairs fit, the linked one wins
    linked = choose(states, 2, 60 * 2**30)
    assert linked.why == "auto: GPUs 0,1, linked by NVLink (40 GiB, 40 GiB free)"  # not the most free: said so
    assert choose(states, 2, 120 * 2**30).gpus == "2,3"  # 60 GiB a GPU: only the unlinked pair fits
    assert choose(states, 1, None).gpus == "2"  # the most free; the lower number on a tie


def test_auto_says_when_nothing_has_room_and_takes_the_freest():
    states = [state(gpu(0, 10)), state(gpu(1, 20))]
    chosen = choose(states, 1, 50 * 2**30)
    assert chosen.gpus == "1" and chosen.why.endswith("; none left has room for it")


def test_auto_takes_vllms_share_of_each_gpu_into_account():
    states = [state(gpu(0, free_gib=80)), state(gpu(1, free_gib=75))]
    # vLLM may take 0.5 of each: 40 GiB on either, so neither fits 45 GiB
    assert choose(states, 1, 45 * 2**30, share=0.5).why.endswith("none left has room for it")
    # vLLM refuses to start on a GPU with less free than its share: 60 GiB free of 80 is not 0.9 of it
    half_used = [state(gpu(0, free_gib=60)), state(gpu(1, free_gib=75))]
    assert choose(half_used, 1, 10 * 2**30, share=0.9).gpus == "1"
    assert choose(half_used, 1, 10 * 2**30, share=0.95).why.endswith("none left has room for it")


def test_auto_leaves_mig_gpus_and_says_when_the_machine_has_too_few():
    import dataclasses

    states = [state(dataclasses.replace(gpu(0, free_gib=80), mig=True)), state(gpu(1, free_gib=10))]
    chosen = choose(states, 1, None)
    assert chosen.gpus == "1" and chosen.why.endswith("(left: GPU 0: MIG instances)")
    with pytest.raises(ValueError, match="auto needs 2 GPUs and this machine has 1; lower the tensor-parallel"):
        choose(states[1:], 2)


def test_auto_is_the_cpu_without_gpus_and_typed_gpus_are_checked():
    assert place("auto", []).gpus == "cpu" and place("auto", []).why == ""
    assert place("cpu", [state(gpu(0))]).gpus == "cpu"
    with pytest.raises(ValueError, match="no GPU 5 on this machine; GPUs here: 0"):
        place("5", [state(gpu(0))])
    with pytest.raises(ValueError, match="auto needs 2 GPUs that no modeldeck work holds, and 1 of 2 is free"):
        choose([state(gpu(0)), state(gpu(1), "deployment a")], 2)


def test_a_deploy_plan_chooses_a_gpu_no_deployment_holds(db, tiny):
    """The real plan, on readings of two GPUs: a Ready deployment holds GPU 0, so auto chooses GPU 1."""
    with db.write() as session:
        session.add(Deployment(name="busy", backend="vllm", state=DeploymentState.READY, gpus="0",
                               settings_json="{}"))
    readings = [gpu(0, free_gib=79), gpu(1, free_gib=30)]
    checked = deployments.plan(db, "tiny", DeploySettings(), readings)
    assert checked.gpus == "1" and checked.backend == "transformers"
    assert checked.serving.chosen_because == ("auto: GPU 1, the most free memory (30 GiB of 80 GiB) "
                                             "(held by modeldeck: GPU 0: deployment busy)")
    assert checked.fit.where == "GPU 1" and checked.fit.verdict == "fits"
    typed = deployments.plan(db, "tiny", DeploySettings(gpus="0"), readings)
    assert typed.gpus == "0" and "GPU 0 is held by deployment busy too" in typed.warnings
    with db.write() as session:
        session.add(Deployment(name="busy2", backend="vllm", state=DeploymentState.PENDING, gpus="1",
                               settings_json="{}"))
    with pytest.raises(EngineError, match="auto needs a GPU that no modeldeck work holds"):
        deployments.plan(db, "tiny", DeploySettings(), readings)


def test_two_deploys_planned_at_once_cannot_both_take_a_gpu_by_auto(db, tiny):
    """Both plans chose GPU 1; the first to start takes it, the second is refused under the write lock."""
    readings = [gpu(0, free_gib=10), gpu(1, free_gib=70)]
    first = deployments.plan(db, "tiny", DeploySettings(), readings, name="first")
    second = deployments.plan(db, "tiny", DeploySettings(), readings, name="second")
    assert first.gpus == second.gpus == "1"
    started, _ = deployments.start(db, first)
    try:
        with pytest.raises(EngineError, match=r"auto chose GPU 1, given meanwhile to other work \(GPU 1: "
                                              r"deployment first\); deploy again"):
            deployments.start(db, second)
        assert [d.name for d in deployments.deployment_rows(db)] == ["first"]
    finally:
        deployments.stop(db, started.id)


# -- what a failure on a GPU means -------------------------------------------------------------------------

TORCH_OOM = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
             "of 79.19 GiB of which 1.06 GiB is free.")
VLLM_OOM = "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`"


@pytest.mark.parametrize("log", [TORCH_OOM, VLLM_OOM, "RuntimeError: CUDA error: out of memory"])
def test_out_of_memory_names_the_gpu_and_who_took_it(log):
    states = [GpuState(gpu(2, free_gib=1), (Holder("deployment mine", True, 5 * GIB),
                                            Holder("pid 9 (bob): python big.py", False, 74 * GIB, (9,), "bob")))]
    reason = out_of_memory_reason(f"loading…\n{log}\n", [2], states, "deployment mine")
    assert reason == ("CUDA out of memory on GPU 2 (GPU 2: 79 GiB of 80 GiB in use, pid 9 (bob): python big.py "
                      "has 74 GiB)")


def test_a_failure_that_is_not_out_of_memory_gets_no_memory_reason():
    assert out_of_memory_reason("ValueError: bad config\n", [0], [state(gpu(0))], "deployment x") is None
    assert out_of_memory_reason(TORCH_OOM, [0], [], "deployment x") == "CUDA out of memory on GPU 0"


def test_a_server_that_dies_of_out_of_memory_says_so_in_its_failure_reason(db, tmp_path):
    """The supervisor's reading of a real child's exit: the log's CUDA out-of-memory turns into the reason."""
    from engine.gpus import out_of_memory_here
    from engine.targets.local.serve import exited

    log = tmp_path / "server.log"
    script = (f"print('INFO: loading'); print({TORCH_OOM!r}); "  # then 20 lines of the API server's traceback
              "[print(f'  File \"api_server.py\", line {n}') for n in range(20)]; "
              "print('RuntimeError: Engine core initialization failed. See root cause above.'); exit(1)")
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-c", script], stdout=out)
        child.wait()
    words = exited(child, str(log), lambda tail: out_of_memory_here(db, "0", "deployment x", tail))
    assert words == ("the server exited with code 1: CUDA out of memory on GPU 0; it said: RuntimeError: Engine "
                     "core initialization failed. See root cause above.")
    assert exited(child, str(log)) == ("the server exited with code 1: RuntimeError: Engine core initialization "
                                       "failed. See root cause above.")  # on the CPU: as it said


# -- the reader, on a real GPU -----------------------------------------------------------------------------

def test_without_a_driver_there_are_no_gpus_and_asking_again_raises_nothing():
    if list_gpus():
        pytest.skip("this machine has GPUs")
    assert list_gpus() == []


@pytest.mark.gpu
def test_nvml_reads_each_gpu_and_sees_a_cuda_process_on_it():
    gpus = list_gpus()
    assert gpus and all(g.memory_total_mb > 0 and g.name for g in gpus)
    assert [g.index for g in gpus] == list(range(len(gpus)))
    code = "import torch, time; x = torch.ones(256 * 2**20, device='cuda'); print('ready', flush=True); time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = {p.pid: p for p in list_gpus()[0].processes}
            if proc.pid in seen:
                break
            time.sleep(0.2)
        assert proc.pid in seen, f"pid {proc.pid} not among {sorted(seen)} (a container may hide it)"
        assert seen[proc.pid].memory_mb is None or seen[proc.pid].memory_mb >= 1024  # 1 GiB of float32
        [state] = ledger(list_gpus()[:1], [], process_info([proc.pid]))
        assert any(h.pids == (proc.pid,) and h.user == psutil.Process().username() for h in state.holders)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.gpu
def test_auto_places_a_deployment_on_the_freest_gpu_and_the_ledger_shows_it_there(db, tiny):
    """On a real GPU: auto's choice is the freest GPU nobody of modeldeck holds, the server runs there, and
    the ledger finds its process under the deployment's job."""
    from engine.gpus import read_ledger
    from tests.conftest import wait_until
    from tests.test_deployments import ready

    expected = choose(read_ledger(db)).gpus
    deployment, _ = deployments.deploy(db, "tiny", DeploySettings(backend="transformers"))
    try:
        done = ready(db, deployment.id)
        assert done.gpus == expected

        def holder():
            [state] = [s for s in read_ledger(db) if str(s.gpu.index) == expected]
            return next((h for h in state.holders if h.what == f"deployment {done.name}" and h.pids), None)

        found = wait_until(holder, 20, what="the server's process on its GPU")
        assert found.ours and (found.memory_mb is None or found.memory_mb > 0)
        if len(read_ledger(db)) > 1:  # a second deployment goes elsewhere
            assert deployments.plan(db, "tiny", DeploySettings(backend="transformers"), name="second").gpus != expected
        else:  # the only GPU is held: auto refuses, a typed one shares
            with pytest.raises(EngineError, match="no modeldeck work holds"):
                deployments.plan(db, "tiny", DeploySettings(backend="transformers"), name="second")
    finally:
        deployments.stop(db, deployment.id)
