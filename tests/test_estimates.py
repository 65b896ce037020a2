"""The fine-tune time estimate (engine/estimates.py): what it rests on, against a real catalog file. The
dialog that shows it runs a real fine-tune in tests/test_tui.py (guessed before, measured after)."""

from __future__ import annotations

import pytest

from catalog.schema import Job, JobKind, JobState
from engine import estimates


def add_run(db, base_id: int, tokens_per_s: float | None, gpus: str = "cpu", target: str = "") -> int:
    with db.write() as session:
        job = Job(kind=JobKind.FINETUNE, title="fine-tune", state=JobState.SUCCEEDED,
                  params_json=Job.dumps({"base_id": base_id, "gpus": gpus, "target": target}),
                  metrics_json=Job.dumps({"tokens_per_s": tokens_per_s} if tokens_per_s is not None else {}))
        session.add(job)
        session.flush()
        return job.id


def test_the_newest_run_of_the_same_base_device_and_target_is_the_measure(db):
    assert estimates.measured_speed(db, 1, on_cpu=True, target="") is None
    old = add_run(db, 1, 100.0)
    newest = add_run(db, 1, 250.0)
    add_run(db, 1, None)  # started, no speed yet
    add_run(db, 2, 999.0)  # another base
    add_run(db, 1, 5000.0, gpus="0")  # a GPU run
    add_run(db, 1, 800.0, target="slurm:debug")
    assert estimates.measured_speed(db, 1, on_cpu=True, target="") == (250.0, f"job {newest}")
    assert estimates.measured_speed(db, 1, on_cpu=False, target="")[0] == 5000.0
    assert estimates.measured_speed(db, 1, on_cpu=True, target="slurm:debug")[0] == 800.0
    assert old < newest


def test_a_measured_speed_wins_over_the_guess_and_each_says_what_it_rests_on():
    measured = estimates.estimate(60_000, (100.0, "job 7"), 135_000_000, 5e10, validation=True)
    assert measured.seconds == 600 and measured.basis == "100 tokens/s, as job 7 ran"
    assert measured.describe() == "about 10m00s of training (100 tokens/s, as job 7 ran)"
    guessed = estimates.estimate(60_000, None, 135_000_000, 5e10, validation=False)
    speed = estimates.CPU_EFFICIENCY * 5e10 / (4 * 135_000_000)
    assert guessed.seconds == pytest.approx(60_000 / speed) and "a guess from this CPU's speed" in guessed.basis
    with_validation = estimates.estimate(60_000, None, 135_000_000, 5e10, validation=True)
    assert with_validation.seconds == pytest.approx(guessed.seconds * 1.1)
    assert estimates.estimate(60_000, None, 135_000_000, None, validation=False) is None  # a GPU: no guess
    assert estimates.estimate(0, (100.0, "job 7"), None, None, validation=False) is None


def test_rows_seen_follow_the_steps_or_the_epochs():
    assert estimates.rows_seen(400, 4, 1, 28, 3.0, max_steps=400) == 1600  # max steps: their batches
    assert estimates.rows_seen(6, 4, 4, 90, 1.0, max_steps=0) == 90  # by epochs: the rows, not the padding of the last step


def test_the_model_size_comes_from_its_config():
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
               "num_key_value_heads": 3, "vocab_size": 49152}
    assert 120e6 < estimates.model_params(smollm2) < 140e6  # SmolLM2-135M, its tied head counted once
    assert estimates.model_params({"hidden_size": 8}) is None
