"""The scaling predictor's formulas against hand-computed cases."""

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
    assert pbp["compute_s"] == pytest.approx(0.15) and pbp["comm_s"] == pytest.approx(2 * act)


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
