"""Stage 8 on the tiny corpus: a two-run comparison (single process, and model averaging on 2 gloo
ranks), its table, TensorBoard runs (HParams and scalars, read back from the event files) and plots."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from chime6_fixture import TINY_SIMULATION

from asr_parallel.strategies import parse_strategy

REPO = Path(__file__).resolve().parents[1]
TRAINING = ["model.name=mlp", "model.mlp.num_layers=2", "model.mlp.hidden_dim=64", "train.epochs=2",
            "train.max_duration=20", "train.num_buckets=2", "train.log_every_steps=2", "decode.lm_weights=[0.5,1.0]"]


def hparams(event_dir: Path) -> tuple[dict, dict, list]:
    """A TensorBoard run's HParams values, scalars, and the HParams view's columns (its experiment)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {}
    for k, v in info.hparams.items():
        kind = v.WhichOneof("kind")
        values[k] = getattr(v, kind)
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    return values, scalars, [h.name for h in experiment.hparam_infos]


def test_two_strategy_comparison(prepared, tmp_path):
    cfg = tmp_path / "compare.yaml"
    cfg.write_text(f"""base: {REPO / 'recipes/chime6_sim.yaml'}
decode: {{lm_extra_text: none}}   # as the comparison recipes pin it: its graph is stage 3's directory's
compare:
  target_dev_wer: 60.0    # set from the runs' own histories on the re-run below
  seeds: []               # one run each (the default recipe compares two seeds)
  pairs: []
  runs:
    - {{strategy: {{name: single}}, label: single}}
    - {{strategy: {{name: model_averaging, sync_period: 4}}, world_size: 2}}
""")
    sets = []
    for o in TINY_SIMULATION + TRAINING + [f"data_dir={prepared}", f"exp_dir={tmp_path / 'exp'}"]:
        sets += ["--set", o]
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.compare", "--config", str(cfg), *sets], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = tmp_path / "exp" / "compare"
    table = json.loads((out / "comparison.json").read_text())
    labels = [row["label"] for row in table["runs"]]
    assert labels == ["single", "model_averaging_sync_period4_w2"]
    md = (out / "comparison.md").read_text()
    assert all(label in md for label in labels) and "| run | ranks | dev worn |" in md
    # Every parameter of every strategy compared, defaults filled in, is a column of the HParams view.
    columns = {"strategy", "world_size", "model", "seed"} | {
        f"strategy.{k}" for row in table["runs"] for k in dataclasses.asdict(parse_strategy(row["strategy"]))}
    assert {"strategy.sync_period", "strategy.warmup_steps", "strategy.scale_lr"} <= columns
    for row in table["runs"]:
        results = json.loads((Path(row["exp_dir"]) / "results.json").read_text())
        assert row["dev_worn_wer"] == results["wfst"]["dev"]["worn"]["total"]["wer"]
        bp = results["wfst"]["blank_penalty"]  # the pair chosen on dev worn names the decoding compared
        assert row["decode"] == f"wfst_lmwt{results['wfst']['lm_weight']:g}" + (f"_bp{bp:g}" if bp else "")
        assert row["decode"] == json.loads((Path(row["exp_dir"]) / "decode" / "wfst_choice.json").read_text())["dir"]
        assert row["seed"] == 42
        for key in ("dev_worn", "dev_array", "eval_worn", "eval_array"):
            low, high = row[f"{key}_wer_ci"]
            assert low <= row[f"{key}_wer"] <= high
        assert row["peak_memory_mb"] > 0
        values, scalars, names = hparams(out / "tensorboard" / row["label"])
        assert set(names) == columns
        assert values["strategy"] == row["strategy"]["name"] and values["world_size"] == row["world_size"]
        assert values["seed"] == 42 and values["model"] == "mlp"
        for k, v in dataclasses.asdict(parse_strategy(row["strategy"])).items():
            assert values[f"strategy.{k}"] == (row["strategy"].get(k, v) if not isinstance(v, list) else json.dumps(v))
        if row["strategy"]["name"] == "single":
            assert "strategy.sync_period" not in values
        else:
            assert values["strategy.sync_period"] == 4 and values["strategy.warmup_steps"] == 0
        assert abs(scalars["hparam/dev_worn_wer"][0][1] - row["dev_worn_wer"]) < 1e-4
        assert scalars["hparam/bytes_sent_per_rank"][0][1] == float(row["bytes_sent_per_rank"])
        history = [h for h in row["history"] if h.get("dev_wer_greedy") is not None]
        assert len(scalars["compare/dev_wer_vs_seconds"]) == len(history) == 2
        assert [s for s, _ in scalars["compare/dev_wer_vs_bytes"]] == [h["bytes_sent"] for h in history]
    assert table["runs"][0]["bytes_sent_per_rank"] == 0 < table["runs"][1]["bytes_sent_per_rank"]
    # stage 8 built the pinned LM's graph for its runs (stage 4 per run), beside the default's
    assert (prepared / "lang_bpe_60" / "TLG_3gram.fst").is_file()
    assert (prepared / "lang_bpe_60_lmtext_auto" / "TLG_3gram.fst").is_file()
    # Against the baseline (the first run) on the same utterances: a paired test per set.
    assert table["baseline"] == "single" and table["runs"][0]["vs_baseline"] is None
    vs = table["runs"][1]["vs_baseline"]
    assert vs["baseline"] == "single" and set(vs) == {"baseline", "dev_worn", "dev_array", "eval_worn", "eval_array"}
    for key, t in vs.items():
        if key != "baseline":
            low, high = t["difference_ci"]
            assert 0 <= t["poi"] <= 1
            assert t["verdict"] == ("tie" if low <= 0 <= high else "better" if high < 0 else "worse")
            # (of the unrounded WERs: within 0.01 of the rounded ones' difference)
            assert abs(t["difference"] - (table["runs"][1][f"{key}_wer"] - table["runs"][0][f"{key}_wer"])) <= 0.0101
            assert f"poi {t['poi']:.2f} {t['verdict']}" in md
    assert "Against the baseline single" in md
    # The committed files alone give any pair again: scores.json and the pair tool (as stage 8 computed it).
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.pair", str(out / "scores.json"), "single",
                        "model_averaging_sync_period4_w2", "--json"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout)
    assert {k: v for k, v in again.items() if k not in ("reference", "run")} == \
        {k: v for k, v in vs.items() if k != "baseline"}
    # as committed under results/: <name>.json and <name>.scores.json side by side
    (tmp_path / "x.json").write_text((out / "comparison.json").read_text())
    (tmp_path / "x.scores.json").write_text((out / "scores.json").read_text())
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.pair", str(tmp_path / "x.scores.json"), "single",
                        "model_averaging_sync_period4_w2"], cwd=REPO, capture_output=True, text=True)
    t = vs["dev_worn"]
    assert r.returncode == 0 and "note:" not in r.stderr, r.stderr[-2000:]
    assert f"dev_worn: {t['difference']:+.2f} [{t['difference_ci'][0]:+.2f}, {t['difference_ci'][1]:+.2f}]" in r.stdout
    # Two experiment directories, outside any comparison: the same figures from their decodings.
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.pair", "--json", "--experiments",
                        *(row["exp_dir"] for row in table["runs"])], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {k: v for k, v in json.loads(r.stdout).items() if k not in ("reference", "run")} == \
        {k: v for k, v in vs.items() if k != "baseline"}
    for png in ("dev_wer_vs_time.png", "dev_wer_vs_bytes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Re-running reuses the finished runs. Time to target: with the target at the first run's first
    # per-epoch dev WER, the first run reaches it at that epoch; every run at its first epoch at or under it.
    histories = [[h for h in row["history"] if h.get("dev_wer_greedy") is not None] for row in table["runs"]]
    target = histories[0][0]["dev_wer_greedy"]
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.compare", "--config", str(cfg), *sets,
                        "--set", f"compare.target_dev_wer={target!r}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("training already finished") == 2, r.stdout[-2000:]
    table = json.loads((out / "comparison.json").read_text())
    assert table["target_dev_wer"] == target
    assert table["runs"][0]["time_to_target_seconds"] == histories[0][0]["elapsed_seconds"]
    for row, history in zip(table["runs"], histories):
        first = [h["elapsed_seconds"] for h in history if h["dev_wer_greedy"] <= target]
        assert row["time_to_target_seconds"] == (first[0] if first else None)
    # A target below every evaluation is never reached.
    lowest = min(h["dev_wer_greedy"] for history in histories for h in history)
    r = subprocess.run([sys.executable, "-m", "asr_parallel.bin.compare", "--config", str(cfg), *sets, "--collect-only",
                        "--set", f"compare.target_dev_wer={lowest - 0.01!r}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.loads((out / "comparison.json").read_text())
    assert [row["time_to_target_seconds"] for row in table["runs"]] == [None, None]


def test_emulated_node_comparison_reuses_the_one_node_baseline():
    """On emulated nodes the 2-rank runs get their own directories and comparison folder; the
    single-process run (nothing crosses a link) is the one-node run."""
    import argparse

    from asr_parallel.bin.compare import comparison_name, run_config
    from asr_parallel.bin.train import experiment_dir
    from asr_parallel.config import load_config

    config = str(REPO / "recipes/chime6_sim_2nodes.yaml")
    args = argparse.Namespace(config=config, overrides=[])
    base = load_config(config)
    assert comparison_name(base) == "compare_2nodes_500mbit"
    assert comparison_name(load_config(str(REPO / "recipes/chime6_sim.yaml"))) == "compare"
    dirs = {r.get("label") or r["strategy"]["name"]: experiment_dir(run_config(args, r)).name for r in base.compare.runs}
    assert dirs["single"] == "conformer_single_w1"
    assert dirs["sync_sgd"] == "conformer_sync_sgd_w2_2nodes_500mbit"
    assert dirs["pipelined_bp"] == "conformer_pipelined_bp_w2_2nodes_500mbit"


def test_runs_that_differ_only_in_training_overrides_get_directories_of_their_own():
    """A run whose overrides change what is trained but not the directory name (the momentum sweep's
    train.momentum, the straggler recipe's single process at normal speed) trains under
    exp_dir/<label>/, whatever else the list holds; overrides that rename the directory (model.name)
    or change only how it runs (train.ranks_per_node) leave it where it was."""
    import argparse

    from asr_parallel.bin.compare import plan_runs, run_config
    from asr_parallel.bin.train import experiment_dir
    from asr_parallel.config import load_config

    config = str(REPO / "recipes/chime6_sim_async_momentum.yaml")
    base = load_config(config)
    plans = plan_runs(argparse.Namespace(config=config, overrides=[]), base)
    dirs = {p.run_label: experiment_dir(p.cfg) for p in plans}
    assert len(set(dirs.values())) == len(dirs) == 7
    assert dirs["async_ps_w3_beta0.9"] == Path("exp/chime6_sim_async_momentum/seed42/conformer_async_ps_w3")
    assert dirs["async_ps_w3_beta0.65"] == Path("exp/chime6_sim_async_momentum/seed42/async_ps_w3_beta0.65"
                                                "/conformer_async_ps_w3")
    assert {p.run_label: p.cfg.train.momentum for p in plans}["async_ps_w3_beta0"] == 0.0
    two = {p.run_label: p.cfg.train for p in plans}["async_ps_w3_lr2e-3_beta0"]
    assert (two.lr, two.momentum) == (0.002, 0.0)
    # The same run alone in the list goes to the same place.
    alone = load_config(config, ["compare.runs=[{strategy: {name: async_ps}, world_size: 3, "
                                 "overrides: [train.momentum=0.65], label: async_ps_w3_beta0.65}]"])
    (plan,) = plan_runs(argparse.Namespace(config=config, overrides=[]), alone)
    assert experiment_dir(plan.cfg) == dirs["async_ps_w3_beta0.65"]

    args = argparse.Namespace(config=str(REPO / "recipes/chime6_sim_stragglers_2nodes.yaml"), overrides=[])
    runs = {r.get("label") or r["strategy"]["name"]: r for r in load_config(args.config).compare.runs}
    assert experiment_dir(run_config(args, runs["single"])) == Path(
        "exp/chime6_sim_stragglers/single/conformer_single_w1")
    assert experiment_dir(run_config(args, runs["async_ps_w3"])).name == "conformer_async_ps_w3_2nodes_500mbit_1-2"
    args = argparse.Namespace(config=str(REPO / "recipes/chime6_sim_pipelines.yaml"), overrides=[])
    runs = {r["label"]: r for r in load_config(args.config).compare.runs}
    assert experiment_dir(run_config(args, runs["mlp_gpipe"])) == Path("exp/chime6_sim_pipelines/mlp_gpipe/mlp_gpipe_w2")
    # Two runs that rename the directory alike, one of which also changes the rate, do not meet.
    both = load_config(args.config, ["compare.runs=[{strategy: {name: gpipe}, world_size: 2, overrides: [model.name=mlp], "
                                     "label: a}, {strategy: {name: gpipe}, world_size: 2, overrides: [model.name=mlp, "
                                     "train.lr=0.001], label: b}]", "compare.pairs=[]"])
    plans = plan_runs(args, both)
    assert len({experiment_dir(p.cfg) for p in plans}) == len(plans) > 1
    # Labels that differ only in characters a directory name cannot hold stop the comparison.
    from asr_parallel.config import ConfigError

    clash = load_config(args.config, ["compare.runs=[{strategy: {name: gpipe}, world_size: 2, overrides: [train.lr=0.001], "
                                      "label: 'x y'}, {strategy: {name: gpipe}, world_size: 2, overrides: [train.lr=0.003], "
                                      "label: 'x/y'}]", "compare.pairs=[]"])
    with pytest.raises(ConfigError, match="would train different configs into"):
        plan_runs(args, clash)


def test_compare_only_trains_a_subset_where_the_whole_list_would():
    """``compare.only`` keeps the named runs and the pairs between them; each trains into the
    directory it has in the whole list (so the rest can follow later and be collected together); an
    unknown label, or a named baseline left out, stops the comparison."""
    import argparse

    from asr_parallel.bin.compare import baseline_label, plan_runs, select_runs
    from asr_parallel.bin.train import experiment_dir
    from asr_parallel.config import ConfigError, load_config

    config = str(REPO / "recipes/chime6_sim_pipeline_variants.yaml")
    args = argparse.Namespace(config=config, overrides=[])
    whole = {p.run_label: experiment_dir(p.cfg) for p in plan_runs(args, load_config(config))}
    wanted = ["tdnn_gpipe", "tdnn_single", "tdnn_gpipe_hybrid"]
    base = load_config(config, ["compare.only=[" + ",".join(wanted) + "]"])
    select_runs(base, config)
    plans = plan_runs(args, base)
    assert [p.run_label for p in plans] == ["tdnn_single", "tdnn_gpipe", "tdnn_gpipe_hybrid"]  # the recipe's order
    assert all(experiment_dir(p.cfg) == whole[p.run_label] for p in plans)
    assert sorted(map(tuple, base.compare.pairs)) == [("tdnn_gpipe", "tdnn_gpipe_hybrid"),
                                                      ("tdnn_single", "tdnn_gpipe"),
                                                      ("tdnn_single", "tdnn_gpipe_hybrid")]
    assert baseline_label(base) == "tdnn_single"
    bad = load_config(config, ["compare.only=[tdnn_single,tdnn_gpip]"])
    with pytest.raises(ConfigError, match="tdnn_gpip, not a run label"):
        select_runs(bad, config)
    left_out = load_config(config, ["compare.only=[tdnn_gpipe]", "compare.baseline=tdnn_single"])
    with pytest.raises(ConfigError, match="not among compare.only"):
        select_runs(left_out, config)
