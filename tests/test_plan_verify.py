"""Plans you can trust (#20): calibration recorded in the plan, verification by training the candidates, predicted
vs measured step time and memory after a run, and compute threads chosen from the host's cores."""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import time
from pathlib import Path

import pytest

from stagewise._plan_cli import add_plan_parser, calibration_for
from stagewise.cli import main
from stagewise.launch import profile_model
from stagewise.plan import Calibration, Cluster, LinkMeasurement, Node, Plan, Verified, auto_threads, predict, search
from stagewise.split import params_on_meta
from stagewise.train import PlanCheck, verify_plans
from stagewise.train._verify import to_verify

MLP = "stagewise.zoo.basic:mlp"


def _calibration(**changes: object) -> Calibration:
    figures = LinkMeasurement(latency_s=2e-4, bandwidth=4e8, allreduce_bandwidth=5e8, nbytes=2**20,
                              allreduce_latency_s=2e-4, send_overhead_s=1.5e-4, recv_overhead_s=3e-4,
                              action_overhead_s=3e-5, contention=1.4)
    base = {"host": socket.gethostname(), "measured_at": time.time(), "seconds": 3.5, "figures": figures}
    return Calibration(**{**base, **changes})  # type: ignore[arg-type]


def _cluster(devices: int = 2) -> Cluster:
    return Cluster(nodes=[Node(name="box", devices=devices, memory_bytes=2**32)])


@pytest.fixture(scope="module")
def mlp_profile():  # noqa: ANN201 (a ChainProfile)
    from stagewise import load_model_spec

    with params_on_meta():
        spec = load_model_spec(MLP)
    return profile_model(spec, rows=[1, 8, 32], repeats=2, optimizer=None)


# --- pure: the plan's new figures, the choice of candidates, the check after a run -----------------------------------


def test_plan_file_round_trips_calibration_threads_and_predicted_and_measured_figures(tmp_path: Path,
                                                                                    mlp_profile) -> None:  # noqa: ANN001
    plans = search(mlp_profile, _cluster(), global_batch=32, limit=3)
    record = [Verified(layout=p.layout_text(), predicted_step_s=p.step_time_s, measured_step_s=p.step_time_s * (1 + i),
                       predicted_memory_bytes=list(p.memory_bytes), measured_memory_bytes=[m + 1 for m in
                                                                                           p.memory_bytes])
              for i, p in enumerate(plans)]
    plan = dataclasses.replace(plans[0], threads=3, calibration=_calibration(), measured_step_s=0.0125,
                               verified=record, model=MLP)
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = Plan.from_json(path)
    assert again == plan
    assert again.verified[1].measured_step_s == pytest.approx(2 * plans[1].step_time_s)
    assert again.verified[1].miss == pytest.approx(1.0)  # measured twice the prediction
    assert again.calibration is not None and again.calibration.figures.contention == 1.4
    assert again.to_train_kwargs()["threads"] == 3
    data = json.loads(path.read_text())
    assert data["verified"][0]["predicted_step_s"] == plans[0].step_time_s
    assert data["calibration"]["host"] == socket.gethostname()
    old = {k: v for k, v in data.items() if k not in ("threads", "calibration", "measured_step_s", "verified")}
    assert Plan.from_dict(old).calibration is None and Plan.from_dict(old).threads == 1  # plans written before #20
    with pytest.raises(ValueError, match="Plan.measured_step_s"):
        Plan.from_dict({**data, "measured_step_s": -1.0})
    with pytest.raises(ValueError, match="unknown calibration field 'hostname'"):
        Plan.from_dict({**data, "calibration": {**data["calibration"], "hostname": "x"}})


def test_a_young_probe_file_from_this_host_calibrates_without_measuring(tmp_path: Path) -> None:
    probe = tmp_path / "probe.json"
    stored = _calibration(measured_at=time.time() - 60)
    stored.write(probe)
    said: list[str] = []
    got = calibration_for(_cluster(), probe=str(probe), max_age_s=600, phase=said.append)
    assert got == dataclasses.replace(stored, source=str(probe)) and said == []  # nothing was measured
    assert 59 <= got.age_s() < 120
    assert f"({probe})" in got.describe() and "contention x1.40" in got.describe()
    with pytest.raises(ValueError, match="stagewise probe --json"):
        Calibration.read(tmp_path / "missing.json")


def test_auto_threads_share_each_hosts_cores_among_its_ranks() -> None:
    big = Cluster(nodes=[Node(name="a", devices=32, memory_bytes=1), Node(name="b", devices=8, memory_bytes=1)])
    assert auto_threads(big, 4, cores=2) == 8  # 4 ranks on a's 32 cores
    assert auto_threads(big, 32, cores=2) == 1
    assert auto_threads(big, 36, cores=2) == 1  # a: 32/32, b: 8/4 -> the least
    assert auto_threads(big, 3, cores=2) == 10
    gpus = Cluster(nodes=[Node(name="g", devices=8, memory_bytes=1, device_kind="cuda")])
    assert auto_threads(gpus, 8, cores=64) == 8 and auto_threads(gpus, 2, cores=64) == 32


def test_auto_verification_measures_only_candidates_the_model_cannot_separate(mlp_profile) -> None:  # noqa: ANN001
    best = search(mlp_profile, _cluster(), global_batch=32, limit=1)[0]

    def at(ms: float) -> Plan:
        return dataclasses.replace(best, step_time_s=ms / 1e3)

    assert to_verify([at(10), at(11), at(11.9), at(12.5)], None) == [at(10), at(11), at(11.9)]  # within 20%
    assert to_verify([at(10), at(13), at(14)], None) == []  # the model separates the best by more than its error
    assert to_verify([at(10), at(10), at(10), at(10)], None) == [at(10)] * 3  # at most 3
    assert to_verify([at(10), at(30)], 2) == [at(10), at(30)] and to_verify([at(10)], 0) == []
    with pytest.raises(ValueError, match="--verify"):
        to_verify([at(10)], -1)


def test_plan_check_warns_on_a_forced_miss_and_says_what_to_re_run(mlp_profile) -> None:  # noqa: ANN001
    plan = dataclasses.replace(search(mlp_profile, _cluster(), global_batch=32, limit=1)[0], model=MLP,
                               step_time_s=0.010, calibration=_calibration())
    memory = [{"weights": m // 2, "gradients": m // 2, "optimizer": 0, "activations": 0} for m in plan.memory_bytes]
    on_time = PlanCheck.of(plan, step_s=[0.5, 0.3, 0.0105, 0.0095, 0.011], memory=memory * plan.replicas)
    assert on_time is not None and on_time.measured_step_s == pytest.approx(0.0105)  # the warm-up steps left out
    assert on_time.warnings() == [] and abs(on_time.step_miss) < 0.2
    assert "predicted 10.00 ms, measured 10.50 ms" in on_time.lines()[0]
    slow = PlanCheck.of(plan, step_s=[0.5, 0.3, 0.016, 0.015, 0.017], memory=memory * plan.replicas)
    assert slow is not None and slow.step_miss == pytest.approx(0.6)
    [warning] = slow.warnings()
    assert "60% slower than the plan predicted" in warning and f"stagewise plan {MLP} --verify 3" in warning
    assert "calibrated on" in warning
    fat = [{**m, "activations": m["weights"]} for m in memory]  # half as much again as predicted on every rank
    warnings = PlanCheck.of(plan, step_s=[0.01], memory=fat * plan.replicas).warnings()
    assert len(warnings) == 1 and "peak memory" in warnings[0] and "+50%" in warnings[0]
    assert PlanCheck.of(plan, step_s=[], memory=[]) is None


# --- processes: verification trains the candidates, train --plan closes the loop ------------------------------------


def test_verification_picks_the_measured_fastest_over_a_fake_slow_candidate(mlp_profile) -> None:  # noqa: ANN001
    cluster = _cluster()
    fast = predict(mlp_profile, cluster, stages=1, replicas=2, microbatches=1, schedule="1f1b", cut=["0"],
                   global_batch=32)
    # The fake: 32 one-row microbatches through 2 stages (64 forward and 64 backward actions on each rank, each with
    # its transfers), predicted faster than anything; really several times slower than the fast plan.
    slow = predict(mlp_profile, cluster, stages=2, replicas=1, microbatches=32, schedule="gpipe", cut=["0", "6"],
                   global_batch=32)
    fake = dataclasses.replace(slow, step_time_s=fast.step_time_s / 4)
    ranked = verify_plans([fake, fast], model=MLP, count=2, steps=5, rounds=1)
    chosen, other = ranked
    assert chosen.same_layout(fast) and other.same_layout(fake)
    assert [v.layout for v in chosen.verified] == [fake.layout_text(), fast.layout_text()]  # predicted order
    assert chosen.measured_step_s == chosen.verified[1].measured_step_s < other.measured_step_s
    assert other.measured_step_s == chosen.verified[0].measured_step_s
    assert other.verified == []
    assert chosen.verified[0].predicted_step_s == fake.step_time_s
    assert len(chosen.verified[1].measured_memory_bytes) == 1 and chosen.verified[1].measured_memory_bytes[0] > 0
    assert Plan.from_json(chosen.to_json()) == chosen


def test_plan_verifies_and_train_reports_predicted_vs_measured(tmp_path: Path, capsys: pytest.CaptureFixture
                                                               ) -> None:
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers())
    out, probe = tmp_path / "plan.json", tmp_path / "probe.json"
    args = parser.parse_args(["plan", MLP, "--devices", "2", "--global-batch", "32", "--repeats", "1",
                              "--verify", "2", "--verify-steps", "4", "--probe", str(probe), "--json", str(out)])
    assert args.threads is None and args.verify == 2  # --threads auto unless a number is given
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "verified by training each candidate" in printed and "(chosen)" in printed
    plan = Plan.from_json(out)
    assert len(plan.verified) == 2 and plan.measured_step_s == min(v.measured_step_s for v in plan.verified)
    assert plan.threads == auto_threads(Cluster.detect(use_cuda=False), 2)
    assert plan.calibration is not None and plan.calibration.host == socket.gethostname()
    assert Calibration.read(probe).figures == plan.calibration.figures  # measured now, kept for later plans
    assert f"calibrated on {plan.calibration.host}" in printed

    run = tmp_path / "run"
    assert main(["train", MLP, "--plan", str(out), "--steps", "5", "--no-progress", "--out", str(run)]) == 0
    captured = capsys.readouterr()
    assert "step time: predicted" in captured.out and "memory per rank: rank 0 predicted" in captured.out
    assert f"verification measured {plan.measured_step_s * 1e3:.2f} ms" in captured.out
    check = json.loads((run / "plan_check.json").read_text())
    assert check["predicted_step_s"] == plan.step_time_s and check["measured_step_s"] > 0

    forced = tmp_path / "forced.json"  # a plan that promises a step a thousand times faster than it can be
    dataclasses.replace(plan, step_time_s=plan.measured_step_s / 1000).to_json(forced)
    assert main(["train", MLP, "--plan", str(forced), "--steps", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: steps took" in err and "slower than the plan predicted" in err
    assert f"re-run 'stagewise plan {MLP} --verify 3'" in err
