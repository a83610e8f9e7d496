"""The scaling predictor's formulas against hand-computed cases."""

import dataclasses

import pytest

from asr_parallel.scaling import Cluster, Workload, predict, ring_seconds, step_time

WORK = Workload(params=1_000_000, frames_per_step=1000, forward_s_per_frame=1e-4, backward_s_per_frame=2e-4,
                activation_values_per_frame=100)
CLUSTER = Cluster(workers_per_node=4, nodes=4, intra_gbps=80.0, inter_gbps=8.0)


def test_ring_time():
    # 2 (K-1)/K * P * b bytes = 1.5 * 4 MB = 6 MB = 48 Mbit over 8 Gbit/s = 6 ms (K = 4).
    assert ring_seconds(1e6, 4, 8.0, 4) == pytest.approx(6e-3)
    assert ring_seconds(1e6, 1, 8.0, 4) == 0.0


def test_data_parallel_step_times():
    compute = 1000 * 3e-4  # 0.3 s
    single = step_time({"name": "sync_sgd"}, 1, CLUSTER, WORK)
    assert single["step_s"] == pytest.approx(compute)
    inside = step_time({"name": "sync_sgd"}, 4, CLUSTER, WORK)  # one node: the 80 Gbit/s link
    assert inside["comm_s"] == pytest.approx(6e-3 / 10)
    across = step_time({"name": "sync_sgd"}, 8, CLUSTER, WORK)  # two nodes: 1.75 * 4 MB at 8 Gbit/s
    assert across["comm_s"] == pytest.approx(1.75 * 4e6 * 8 / 8e9)
    averaged = step_time({"name": "model_averaging", "sync_period": 10}, 8, CLUSTER, WORK)
    assert averaged["comm_s"] == pytest.approx(across["comm_s"] / 10)
    hier = step_time({"name": "hierarchical", "sync_period": 10}, 8, CLUSTER, WORK)
    intra = 1.5 * 4e6 * 8 / 80e9  # ring of 4 inside the node
    inter = 4 * (1.0 * 4e6 * 8 / 8e9) / 10  # 4 rings of 2 nodes share the node's link, every 10 steps
    assert hier["comm_s"] == pytest.approx(intra + inter)


def test_pipeline_step_times():
    gpipe = step_time({"name": "gpipe", "microbatches": 4}, 2, CLUSTER, WORK)
    slot = 0.3 / (2 * 4)
    act = 1000 * 100 * 4 * 8 / 80e9
    assert gpipe["compute_s"] == pytest.approx(5 * slot)  # (M + S - 1) slots
    assert gpipe["comm_s"] == pytest.approx(5 * 2 * act / 4)
    pbp = step_time({"name": "pipelined_bp"}, 2, CLUSTER, WORK)
    # part 0 recomputes its forward pass in the backward pass: 1000 * (2 * 1e-4 + 2e-4) / 2
    # the activation goes down while an earlier batch's gradient comes up: one way's time per tick
    # and the tick ends with an all-reduce of a few figures (float64) over the parts
    from asr_parallel.scaling import exchange_values

    exchange = ring_seconds(exchange_values(2), 2, 80.0, 8)
    assert pbp["compute_s"] == pytest.approx(0.2) and pbp["comm_s"] == pytest.approx(act + exchange)
    assert step_time({"name": "pipelined_bp"}, 1, CLUSTER, WORK)["compute_s"] == pytest.approx(0.3)


def test_lockstep_ranks_take_the_slowest_ranks_step():
    """Synchronous SGD's ranks wait for each other every step: the compute of a step is the slowest
    rank's, the measured lock-step factor times the mean rank's (the batch's making apart); model
    averaging's ranks do not wait, and a synchronous warm-up pays the factor for its steps only."""

    from asr_parallel.bin.predict_scaling import lockstep_factor
    from asr_parallel.scaling import mean_step_time

    # step 0: ranks take 1 and 3 s (slowest 3), step 1: 2 and 2 (slowest 2): mean of slowest 2.5, mean 2
    assert lockstep_factor([[1.0, 2.0], [3.0, 2.0]]) == pytest.approx(1.25)
    assert lockstep_factor([[1.0, 2.0]]) == 1.0 and lockstep_factor([[1.0, 2.0, 9.0], [1.0, 2.0]]) == 1.0
    work = dataclasses.replace(WORK, lockstep=1.2, load_s=0.01)
    assert step_time({"name": "sync_sgd"}, 4, CLUSTER, work)["compute_s"] == pytest.approx(0.3 * 1.2 + 0.01)
    ma = {"name": "model_averaging", "sync_period": 10}
    assert step_time(ma, 4, CLUSTER, work)["compute_s"] == pytest.approx(0.31)
    bmuf = {"name": "bmuf", "sync_period": 50, "warmup_steps": 500, "warmup": "sync"}
    assert mean_step_time(bmuf, 4, CLUSTER, work, 1000)["compute_s"] == pytest.approx(0.31 + 0.5 * 0.3 * 0.2)
    assert mean_step_time(bmuf, 1, CLUSTER, work, 1000)["compute_s"] == pytest.approx(0.31)
    # pipelined BP: in tick t part s works on batch t - s; each tick lasts its slowest part's work
    from asr_parallel.bin.predict_scaling import pipeline_lockstep

    # ticks 1, 2: max(part 0 on batch 1, part 1 on batch 0) = 3, max(1, 2) = 2; the parts' means 2 and 2
    assert pipeline_lockstep([[1.0, 3.0, 1.0], [2.0, 2.0, 2.0]]) == pytest.approx(2.5 / 2.0)
    assert pipeline_lockstep([[1.0, 2.0]]) == 1.0
    parts = dataclasses.replace(WORK, part_s_per_frame=[1e-4, 2e-4], part_update_s=[0.0, 0.0], lockstep=1.25)
    assert step_time({"name": "pipelined_bp"}, 2, CLUSTER, parts)["compute_s"] == pytest.approx(1000 * 2e-4 * 1.25)


def test_pipelined_bp_with_a_measured_tick():
    """A measured plain-loop tick is pipelined BP's clock, in proportion to the step's frames; on one
    machine nothing is added (its transfers are in the tick); a slower link adds only the activation's
    extra transfer time over the rate the tick was measured at. The tick's exchange of figures is as
    large as the strategy's."""
    from types import SimpleNamespace

    from asr_parallel.scaling import exchange_values
    from asr_parallel.strategies.pipeline import PipelineStrategy

    work = dataclasses.replace(WORK, part_s_per_frame=[1e-4, 2e-4], part_update_s=[0.0, 0.0], tick_s=0.25,
                               tick_frames=800, tick_gbps=80.0, load_s=0.01)
    one = step_time({"name": "pipelined_bp"}, 2, CLUSTER, work)
    assert one["compute_s"] == pytest.approx(0.25 * 1000 / 800 + 0.01) and one["comm_s"] == 0.0
    two_nodes = Cluster(workers_per_node=1, nodes=2, intra_gbps=80.0, inter_gbps=8.0)
    act = 1000 * 100 * 4 * 8  # bits of one step's activation
    assert step_time({"name": "pipelined_bp"}, 2, two_nodes, work)["comm_s"] == pytest.approx(act / 8e9 - act / 80e9)
    # without a measured tick: the parts' work, the activation one way and the exchange's latency
    latency = dataclasses.replace(CLUSTER, latency_us=100.0)
    parts = dataclasses.replace(work, tick_s=None)
    assert step_time({"name": "pipelined_bp"}, 2, latency, parts)["comm_s"] == pytest.approx(
        act / 80e9 + ring_seconds(exchange_values(2), 2, 80.0, 8, 100.0))
    assert ring_seconds(exchange_values(2), 2, 80.0, 8, 100.0) == pytest.approx(2 * 100e-6, rel=1e-3)
    for s in (2, 3, 5):
        assert exchange_values(s) == sum(PipelineStrategy._exchange_sizes(SimpleNamespace(num_parts=s)).values())


def test_pipelined_bp_pays_its_drain_ticks():
    """A run drains the pipeline at every checkpoint, epoch end and its end (once where they fall
    together), 2(S-1) ticks each that are not steps: the mean step time grows by that many ticks."""
    from asr_parallel.scaling import mean_step_time, pipeline_flushes

    assert pipeline_flushes(100, 218, 200) == 1  # the end only
    assert pipeline_flushes(436, 218, 200) == 4  # 200, 218, 400, 436 (an epoch end and the run's end)
    assert pipeline_flushes(400, 200, 200) == 2 and pipeline_flushes(0, 10, 5) == 0
    pbp = {"name": "pipelined_bp"}
    tick = step_time(pbp, 2, CLUSTER, WORK)["step_s"]
    assert mean_step_time(pbp, 2, CLUSTER, WORK, 436, epoch_steps=218, checkpoint_every=200)["step_s"] == \
        pytest.approx(tick * (436 + 2 * 4) / 436)
    assert mean_step_time(pbp, 3, CLUSTER, WORK, 100, epoch_steps=218)["step_s"] == \
        pytest.approx(step_time(pbp, 3, CLUSTER, WORK)["step_s"] * 104 / 100)


def test_ranks_and_pipeline_parts_timed_at_once_in_processes_of_their_own():
    """measure_ranks(concurrent) times every rank in a fresh process, all at once, step by step (each
    rank's timings of every step after the first, of every launch); measure_pipeline runs a plain
    pipelined-BP loop over gloo with a process per part, and its tick holds each part's work and
    update; a failing process ends the measurement with its error."""
    import torch

    from asr_parallel.bin.predict_scaling import (measure_concurrently, measure_pipeline, measure_ranks,
                                                  synthetic_batch)
    from asr_parallel.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(None, ["model.name=mlp", "model.mlp.num_layers=4", "model.mlp.hidden_dim=32",
                             "train.max_duration=4"])
    batches = [synthetic_batch(cfg, frames=100 + 20 * i) for i in range(5)]
    fwd, bwd, upd, times = measure_ranks(cfg, [batches, batches[::-1]], concurrent=True, threads=1, launches=2)
    assert fwd > 0 and bwd > 0 and upd > 0 and [len(t) for t in times] == [2 * 4, 2 * 4]
    got = measure_pipeline(cfg, 2, boundaries=[2], batches=batches, threads=1, launches=1)
    assert got["ticks"] == len(batches) - 3  # ticks 3 and 4: both parts busy, batch 0 left out
    # tick t works on batches t, t-1 (forward, part 0 / 1) and t-2, t-1 (backward): their mean frames
    frames = [int(b[1].sum()) for b in batches]
    assert got["frames_per_tick"] == pytest.approx(sum(sum(frames[t - 2:t + 1]) / 3 for t in (3, 4)) / 2)
    assert all(w > 0 for w in got["work_s_per_frame"]) and all(u > 0 for u in got["update_s"])
    # the loop's schedule, tick by tick: part s runs the forward pass of batch t - s and the backward
    # pass of batch t - 2(S-1) + s; the parts work at the same time (their ticks overlap)
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    job = {"kind": "pipeline", "parts": 2, "balance": "flops", "boundaries": [2], "batches": batches, "port": port}
    parts = measure_concurrently(cfg, [job, job], threads=1)
    n = len(batches)
    for s, records in enumerate(parts):
        assert [r[0] for r in records] == list(range(n + 2))
        assert [r[1] for r in records] == [t - s if 0 <= t - s < n else None for t in range(n + 2)]
        assert [r[2] for r in records] == [t - 2 + s if 0 <= t - 2 + s < n else None for t in range(n + 2)]
    # the strategy's wire protocol (tests/test_pipelines.py counts it): an activation goes down as 3
    # messages (shape header, lengths, activation), a gradient comes up as 1
    assert [r[8] for r in parts[0]] == [3 if r[1] is not None else 0 for r in parts[0]]
    assert [r[8] for r in parts[1]] == [1 if r[2] is not None else 0 for r in parts[1]]
    for t in range(3, n):  # both busy: each tick of part 0 overlaps the same tick of part 1
        a, b = parts[0][t], parts[1][t]
        assert a[6] < b[6] + b[5] and b[6] < a[6] + a[5]
    # a process that fails stops the others, which were waiting for it, and names it
    good = {"kind": "rank", "batches": batches}
    with pytest.raises(RuntimeError, match="measuring process 1") as failed:
        measure_concurrently(cfg, [good, {"kind": "rank", "batches": [(None, None, None)]}], threads=1, timeout=60)
    assert "BrokenBarrierError" in str(failed.value)  # process 0 was released from its wait


def test_speedups_order_strategies_by_communication():
    rows = predict([{"name": "sync_sgd"}, {"name": "bmuf", "sync_period": 50}], [1, 2, 16, 64], CLUSTER, WORK)
    by = {(r["strategy"], r["workers"]): r for r in rows}
    assert by[("sync_sgd", 1)]["speedup"] == pytest.approx(1.0)
    assert by[("bmuf", 64)]["speedup"] > by[("sync_sgd", 64)]["speedup"]
    assert by[("sync_sgd", 2)]["efficiency"] <= 1.0


def test_cli_measures_and_writes_table(tmp_path):
    from asr_parallel.bin.predict_scaling import main

    main(["--set", "model.name=mlp", "--set", "model.mlp.num_layers=2", "--set", "model.mlp.hidden_dim=64",
          "--out", str(tmp_path)])
    import json

    data = json.loads((tmp_path / "scaling.json").read_text())
    assert data["workload"]["forward_s_per_frame"] > 0 and data["workload"]["backward_s_per_frame"] > 0
    pipeline_ks = {r["workers"] for r in data["rows"] if r["strategy"] == "pipelined_bp"}
    assert max(pipeline_ks) <= data["workload"]["max_stages"]  # no more parts than model stages
    assert (tmp_path / "speedup.png").read_bytes()[:4] == b"\x89PNG"


def test_mean_step_time_counts_warmup_and_blocks():
    from asr_parallel.scaling import mean_step_time, syncs_in_run

    bmuf = {"name": "bmuf", "sync_period": 50, "warmup_steps": 500, "warmup": "sync"}
    assert syncs_in_run(bmuf, 1308) == 500 + 16  # W all-reduces, then one per 50 local steps
    assert syncs_in_run(bmuf, 300) == 300
    ring = step_time({"name": "sync_sgd"}, 8, CLUSTER, WORK)["comm_s"]
    ddp = step_time({"name": "sync_sgd"}, 8, CLUSTER, WORK, overlap=True)["comm_s"]  # the warm-up: DDP
    assert ddp < ring
    t = mean_step_time(bmuf, 8, CLUSTER, WORK, 1308)
    # 500 overlapped DDP steps, 16 block all-reduces and DDP's broadcast at the start
    assert t["comm_s"] == pytest.approx((500 * ddp + 17 * ring) / 1308)
    assert t["step_s"] == pytest.approx(0.3 + (500 * ddp + 17 * ring) / 1308)
    # fairseq's warm-up (the default): local steps, a broadcast at the start and one after W steps.
    fairseq = {"name": "bmuf", "sync_period": 50, "warmup_steps": 500}
    assert syncs_in_run(fairseq, 1308) == 16
    assert mean_step_time(fairseq, 8, CLUSTER, WORK, 1308)["comm_s"] == pytest.approx(ring * 18 / 1308)
    # without a warm-up the mean over whole blocks is the steady state
    ma = {"name": "model_averaging", "sync_period": 50, "warmup_steps": 0}
    assert mean_step_time(ma, 8, CLUSTER, WORK, 1000)["comm_s"] == pytest.approx(
        step_time(ma, 8, CLUSTER, WORK)["comm_s"] * 21 / 20)  # 20 averagings and the start's broadcast


def test_mean_step_time_matches_cost_model_sync_count():
    """The predictor's all-reduce count is the one the cost model (and so the counted bytes) has."""
    from asr_parallel.scaling import syncs_in_run
    from asr_parallel.strategies.cost import ModelSize, predict as cost_predict

    size = ModelSize(params=1000)
    for steps in (1, 49, 50, 537, 1308):
        for warmup in ("sync", "local_broadcast"):
            section = {"name": "bmuf", "sync_period": 50, "warmup_steps": 500, "warmup": warmup}
            predicted = cost_predict(section, size, 2, steps)["by_label"]
            model_calls = predicted.get("params", [0, 0])[1] + predicted.get("gradients", [0, 0])[1]
            assert model_calls == syncs_in_run(section, steps)


def test_parse_rate():
    from asr_parallel.scaling import parse_rate_gbps

    assert parse_rate_gbps("500mbit") == pytest.approx(0.5)
    assert parse_rate_gbps("1gbit") == pytest.approx(1.0)
    assert parse_rate_gbps("10mbps") == pytest.approx(0.08)  # tc: bps units are bytes per second
    with pytest.raises(ValueError, match="not a tc rate"):
        parse_rate_gbps("fast")


def test_validation_predicts_a_recorded_run(tmp_path):
    """validate_scaling reads a run's summary and config: its ranks, nodes, link rate, frames per step
    and steps give the prediction, set against train_seconds / steps."""
    import json

    from asr_parallel.bin.validate_scaling import predict_run
    from asr_parallel.config import dump_config, load_config
    from asr_parallel.models import build_model

    cfg = load_config(None, ["model.name=mlp", "model.mlp.num_layers=2", "model.mlp.hidden_dim=64",
                             f"data_dir={tmp_path / 'no_data'}"])  # no prepared batches: no loading time
    dump_config(cfg, tmp_path / "config.yaml")
    params = build_model(cfg.model, cfg.features.num_mel_bins, cfg.tokenizer.vocab_size).num_params()
    summary = {"strategy": {"name": "model_averaging", "sync_period": 10}, "world_size": 2, "nodes": 2,
               "link_rate": "100mbit", "threads_per_rank": 1, "steps": 100, "frames_per_rank": 300_000,
               "train_seconds": 50.0, "bytes_sent_per_rank": 0}
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    batch_set = (cfg.data_dir, cfg.train.max_duration, cfg.train.num_buckets, cfg.train.seed, 2, 100)  # 100 steps
    compute = {("whole", "mlp", 1, batch_set): (1e-5, 2e-5, 0.0, 1.0)}  # given, not measured
    row = predict_run(tmp_path, compute, intra_gbps=10.0)
    assert row["frames_per_step"] == 3000 and row["measured_step_s"] == pytest.approx(0.5)
    assert row["predicted_compute_s"] == pytest.approx(3000 * 3e-5, rel=1e-3)
    # 10 averagings and the start's broadcast of P values in 100 steps over the 100 Mbit/s link
    # (K = 2: P * 4 bytes each way)
    assert row["predicted_comm_s"] == pytest.approx(params * 4 * 8 / 1e8 * 11 / 100, rel=1e-3)
    assert row["error_percent"] == pytest.approx(100 * (row["predicted_step_s"] - 0.5) / 0.5, abs=0.1)
    measured_link = predict_run(tmp_path, compute, intra_gbps=10.0, link_gbps={"100mbit": 0.05})
    assert measured_link["predicted_comm_s"] == pytest.approx(2 * row["predicted_comm_s"], rel=1e-6)  # half the rate
    assert "measured" in measured_link["link"] and "nominal" in row["link"]
    summary.update(nodes=1, link_rate=None)
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    inside = predict_run(tmp_path, compute, intra_gbps=10.0)  # one node: the measured local link
    assert inside["predicted_comm_s"] == pytest.approx(params * 4 * 8 / 1e10 * 11 / 100, rel=1e-3)


def test_ddp_overlap_leaves_the_last_bucket_exposed():
    from asr_parallel.scaling import last_bucket_bytes

    mib = 2**20
    assert last_bucket_bytes(0.5 * mib, 25) == 0.5 * mib  # all in the first bucket
    assert last_bucket_bytes(12 * mib, 25) == 11 * mib  # 1 MiB first, then one bucket of the rest
    assert last_bucket_bytes(61 * mib, 25) == 10 * mib  # 1 + 25 + 25 + 10
    ring = step_time({"name": "sync_sgd"}, 8, CLUSTER, WORK)["comm_s"]
    # 4 MB model: one bucket after the first, so only the first 1 MiB can hide behind the backward pass
    hidden = step_time({"name": "sync_sgd"}, 8, CLUSTER, WORK, overlap=True)["comm_s"]
    assert hidden == pytest.approx(ring * (4e6 - mib) / 4e6)
    # with small buckets the overlap is bounded by the backward time: 0.2 s here, more than the ring
    small = Workload(**{**WORK.__dict__, "bucket_mb": 0.1})
    t = step_time({"name": "sync_sgd"}, 8, CLUSTER, small, overlap=True)
    assert t["comm_s"] == pytest.approx(ring * last_bucket_bytes(4e6, 0.1) / 4e6)


def test_loading_time_is_paid_per_step_by_every_rank():
    """A batch made on the training thread costs its time at every step: once per data-parallel rank,
    and on every pipeline part (each reads every batch)."""
    work = Workload(**{**WORK.__dict__, "load_s": 0.02})
    assert step_time({"name": "sync_sgd"}, 1, CLUSTER, work)["compute_s"] == pytest.approx(0.32)
    assert step_time({"name": "model_averaging"}, 4, CLUSTER, work)["compute_s"] == pytest.approx(0.32)
    assert step_time({"name": "pipelined_bp"}, 2, CLUSTER, work)["compute_s"] == pytest.approx(0.2 + 0.02)
    parts = Workload(**{**work.__dict__, "part_s_per_frame": [3e-4, 1e-4], "part_update_s": [0.0, 0.0]})
    assert step_time({"name": "pipelined_bp"}, 2, CLUSTER, parts)["compute_s"] == pytest.approx(0.3 + 0.02)
    gpipe = step_time({"name": "gpipe", "microbatches": 4}, 2, CLUSTER, work)
    assert gpipe["compute_s"] == pytest.approx(5 * 0.3 / 8 + 0.02)


def test_update_time_is_paid_per_step_and_split_over_pipeline_parts():
    work = Workload(**{**WORK.__dict__, "update_s": 0.01})
    assert step_time({"name": "sync_sgd"}, 1, CLUSTER, work)["compute_s"] == pytest.approx(0.31)
    assert step_time({"name": "pipelined_bp"}, 2, CLUSTER, work)["compute_s"] == pytest.approx(0.2 + 0.005)
    gpipe = step_time({"name": "gpipe", "microbatches": 4}, 2, CLUSTER, work)
    assert gpipe["compute_s"] == pytest.approx(5 * 0.3 / 8 + 0.005)


def test_measured_parts_set_the_pipeline_clock():
    """With the run's cut measured part by part, pipelined BP's tick is the slowest part's measured
    work plus its update, not the balanced estimate; other part counts keep the estimate."""
    work = Workload(**{**WORK.__dict__, "part_s_per_frame": [3e-4, 1e-4], "part_update_s": [0.01, 0.02]})
    assert step_time({"name": "pipelined_bp"}, 2, CLUSTER, work)["compute_s"] == pytest.approx(1000 * 3e-4 + 0.01)
    assert step_time({"name": "pipelined_bp"}, 4, CLUSTER, work)["compute_s"] == pytest.approx(1000 * 4e-4 / 4)


def test_parts_are_measured_as_the_pipeline_cuts_them():
    """measure_parts gives one tick time and one update time per part of the strategy's cut, and
    refuses boundaries the model does not have."""
    import torch

    from asr_parallel.bin.predict_scaling import measure_parts
    from asr_parallel.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(None, ["model.name=mlp", "model.mlp.num_layers=4", "model.mlp.hidden_dim=64",
                             "train.max_duration=8"])
    work, update = measure_parts(cfg, 2, boundaries=[3], steps=2)
    assert len(work) == len(update) == 2 and all(w > 0 for w in work) and all(u > 0 for u in update)
    with pytest.raises(ValueError, match="boundaries"):
        measure_parts(cfg, 2, boundaries=[99], steps=1)


def test_pace_windows_hold_whole_synchronisation_periods(tmp_path):
    """Per-window step times come from the logged losses at multiples of the window only (a window of
    tau steps holds one synchronisation, however the log interval falls); their spread reports the
    median and the 10th / 90th percentiles."""
    from torch.utils.tensorboard import SummaryWriter

    from asr_parallel.bin.validate_scaling import spread, window_step_seconds

    w = SummaryWriter(str(tmp_path / "tensorboard"))
    t = 1000.0
    for step in range(10, 210, 10):  # 0.3 s per step, and 2 s more in every step 20k+1..20k+10 (a sync)
        t += 3.0 + (2.0 if step % 20 == 10 else 0.0)
        w.add_scalar("train/loss", 1.0, global_step=step, walltime=t)
    w.close()
    per10 = window_step_seconds(tmp_path, 10)
    assert sorted({round(x, 6) for x in per10}) == [0.3, 0.5]
    per20 = window_step_seconds(tmp_path, 20)
    assert len(per20) == 9 and all(x == pytest.approx(0.4) for x in per20)
    assert spread(per20) == {"windows": 9, "median": pytest.approx(0.4), "p10": pytest.approx(0.4),
                             "p90": pytest.approx(0.4)}
    assert spread([1.0, 2.0]) is None and window_step_seconds(tmp_path / "missing", 10) == []
    # a pause after step 40 (an evaluation, a checkpoint) falls in the window from 40: left out
    assert len(window_step_seconds(tmp_path, 20, pauses=[40])) == 8
    assert len(window_step_seconds(tmp_path, 20, pauses=[50])) == 8  # inside the window 40-60


def sampler_of(cfg, rank: int, world_size: int):
    """Epoch 0 of the trainer's sampler for ``rank`` of ``world_size`` (the test's own count)."""
    from lhotse import load_manifest

    from asr_parallel.train.data import make_sampler

    cuts = load_manifest(f"{cfg.data_dir}/fbank/chime6-ihm_cuts_train.jsonl.gz")
    sampler = make_sampler(cuts, cfg.train.max_duration, cfg.train.num_buckets, True, rank, world_size, cfg.train.seed)
    sampler.set_epoch(0)
    return sampler


def test_compute_is_timed_on_the_recipes_own_batches(prepared, tmp_path, monkeypatch):
    """recipe_batches draws the training batches as training does (utterances of different lengths,
    padded, within train.max_duration) and times their making; measure and measure_parts time them
    per real frame. Without prepared data there are none."""
    from asr_parallel.bin.predict_scaling import measure, measure_parts, recipe_batches
    from asr_parallel.config import load_config
    from chime6_fixture import TINY_SIMULATION

    cfg = load_config("recipes/chime6_sim.yaml", TINY_SIMULATION + [
        f"data_dir={prepared}", "train.max_duration=20", "model.name=mlp", "model.mlp.num_layers=2",
        "model.mlp.hidden_dim=32"])
    batches, load_s = recipe_batches(cfg, count=3)
    assert len(batches) == 3 and load_s > 0
    for feats, lens, tokens in batches:
        assert feats.shape[0] == len(lens) == len(tokens) and feats.shape[1] == int(lens.max())
        assert int(lens.sum()) <= cfg.train.max_duration * 100 + 1 and all(tokens)
    assert any(len(set(lens.tolist())) > 1 for _, lens, _ in batches)  # real lengths: padding
    fwd, bwd, upd = measure(cfg, batches=batches)
    assert fwd > 0 and bwd > 0 and upd > 0
    times: list = []
    work, update = measure_parts(cfg, 2, batches=batches, per_batch=times)
    assert len(work) == 2 and all(w > 0 for w in work)
    assert [len(t) for t in times] == [len(batches) - 1] * 2 and all(x > 0 for t in times for x in t)
    assert recipe_batches(load_config("recipes/chime6_sim.yaml", [f"data_dir={tmp_path}"])) is None
    # spread: the batches at steps spread evenly over the epoch's first `within` steps, the first and
    # the last of them included, as the trainer's sampler draws them (the tiny corpus gives 2 ranks one
    # batch each, so one rank here)
    from asr_parallel.bin.predict_scaling import epoch_steps

    assert epoch_steps(cfg, 2) == min(sum(1 for _ in sampler_of(cfg, r, 2)) for r in range(2))
    n = epoch_steps(cfg, 1)
    assert n == sum(1 for _ in sampler_of(cfg, 0, 1)) and n >= 3
    within = min(7, n)
    picks = sorted({round(i * (within - 1) / 3) for i in range(4)})
    assert picks[0] == 0 and picks[-1] == within - 1 and len(picks) >= 3
    for rank in range(1):
        first = recipe_batches(cfg, within, 1, rank)[0]
        spread = recipe_batches(cfg, 4, 1, rank, spread=True, within=within)[0]
        assert [b[1].tolist() for b in spread] == [first[i][1].tolist() for i in picks]
        assert all(bool((a[0] == first[i][0]).all()) for a, i in zip(spread, picks))
    # validate_scaling predicts a run with compute timed on those batches and their making added
    import json

    from asr_parallel.bin import validate_scaling
    from asr_parallel.config import dump_config

    run = tmp_path / "run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    (run / "train_summary.json").write_text(json.dumps({
        "strategy": {"name": "single"}, "world_size": 1, "nodes": 1, "link_rate": None, "threads_per_rank": 1,
        "steps": 10, "frames_per_rank": 20_000, "train_seconds": 5.0, "bytes_sent_per_rank": 0}))
    compute: dict = {}
    row = validate_scaling.predict_run(run, compute, intra_gbps=10.0, concurrent=False)
    epoch = (cfg.data_dir, cfg.train.max_duration, cfg.train.num_buckets, cfg.train.seed, 1)
    batch_set = epoch + (min(10, validate_scaling._EPOCH_STEPS[epoch]),)  # the steps the run met
    f, b, u, lockstep = compute[("whole", "mlp", 1, batch_set)]
    load_s = validate_scaling._BATCHES[batch_set][1]
    assert lockstep == 1.0 and load_s > 0 and row["predicted_compute_s"] == pytest.approx(2000 * (f + b) + u + load_s)
    # 2 synchronous ranks: each rank's own batches at the same steps, the slowest rank's step paid
    from asr_parallel.bin import predict_scaling

    real, seen = predict_scaling.measure_ranks, []

    def recording(cfg, per_rank, **kw):
        out = real(cfg, per_rank, **kw)
        seen.append(out[3])
        return out

    monkeypatch.setattr(predict_scaling, "measure_ranks", recording)
    (run / "train_summary.json").write_text(json.dumps({
        "strategy": {"name": "sync_sgd"}, "world_size": 2, "nodes": 1, "link_rate": None, "threads_per_rank": 1,
        "steps": 10, "frames_per_rank": 20_000, "train_seconds": 5.0, "bytes_sent_per_rank": 0}))
    row = validate_scaling.predict_run(run, compute, intra_gbps=10.0, concurrent=False)
    two = batch_set[:4] + (2, min(10, validate_scaling._EPOCH_STEPS[batch_set[:4] + (2,)]))
    per_rank, load_s = validate_scaling._BATCHES[two]
    assert len(per_rank) == 2 and len(per_rank[0]) == len(per_rank[1]) > 1
    assert [x[1].tolist() for x in per_rank[0]] != [x[1].tolist() for x in per_rank[1]]  # their own shards
    f, b, u, lockstep = compute[("whole", "mlp", 1, two)]
    # gloo's latency per message is in the measured all-reduce rates: it does not enter sync SGD
    assert validate_scaling.predict_run(run, compute, intra_gbps=10.0, latency_us=1000.0, concurrent=False)[
        "predicted_step_s"] == pytest.approx(row["predicted_step_s"])
    assert len(seen) == 1 and [len(t) for t in seen[0]] == [len(per_rank[0]) - 1] * 2  # every step after the first
    assert lockstep == predict_scaling.lockstep_factor(seen[0])
    assert row["predicted_compute_s"] == pytest.approx((2000 * (f + b) + u) * lockstep + load_s)
