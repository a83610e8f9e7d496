"""Stage 8 without training: finished experiments written by hand (decodings, results.json from
stage 7's own scoring, train_summary.json), gathered with --collect-only. Checks the WER intervals,
the paired tests against the baseline, compare.seeds (layout, per-seed rows, mean and spread) and
the TensorBoard HParams columns and Custom Scalars layout."""

import argparse
import json
from pathlib import Path

import pytest

from asr_parallel.bin import compare
from asr_parallel.bin.train import experiment_dir
from asr_parallel.config import ConfigError, dump_config, load_config
from asr_parallel.score.report import score_experiment, write_report

REPO = Path(__file__).resolve().parents[1]
N = 60  # utterances per test set, 5 reference words each
REF = "one two three four five"


def write_config(tmp_path, runs, seeds=None, baseline=None, target=50.0, pairs="[]") -> Path:
    cfg = tmp_path / "compare.yaml"
    extra = (f"  seeds: {seeds if seeds is not None else []}\n  pairs: {pairs}\n"
             + (f"  baseline: {baseline}\n" if baseline else ""))
    cfg.write_text(f"base: {REPO / 'recipes/chime6_sim.yaml'}\nexp_dir: {tmp_path / 'exp'}\n"
                   f"data_dir: {tmp_path / 'data'}\ncompare:\n  target_dev_wer: {target}\n{extra}  runs:\n"
                   + "".join(f"    - {r}\n" for r in runs))
    return cfg


def plans(cfg: Path):
    args = argparse.Namespace(config=str(cfg), overrides=[])
    return compare.plan_runs(args, load_config(cfg))


def fake_experiment(plan, wrong: set[int], history: list[tuple[float, float]], drop: int | None = None) -> Path:
    """A finished experiment of ``plan`` whose WFST hypotheses substitute one word in the utterances
    ``wrong`` (every set), with per-epoch (elapsed seconds, greedy dev WER) ``history``."""
    exp = experiment_dir(plan.cfg)
    for method in ("greedy", "wfst_lmwt0.8", "wfst_lmwt1.2"):
        for name in ("dev_ihm", "dev_mdm", "eval_ihm", "eval_mdm"):
            rows = []
            for i in range(N):
                if i == drop:
                    continue
                bad = i in wrong or method == "greedy" or (method == "wfst_lmwt1.2" and i % 2 == 0)
                rows.append({"id": f"{name.split('_')[0]}_{i:03d}", "session": f"S{2 + i % 2:02d}",
                             "speaker": f"P{5 + i % 4:02d}", "location": "kitchen", "ref": REF,
                             "hyp": REF.replace("three", "tree") if bad else REF})
            path = exp / "decode" / method / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, report = score_experiment(exp / "decode")
    write_report(exp, results, report)
    summary = {"model": plan.cfg.model.name, "strategy": plan.cfg.strategy, "world_size": plan.cfg.train.world_size,
               "steps": 100, "wall_seconds": 100.0 + 10 * (plan.seed or 0), "frames_per_second": 1000.0,
               "bytes_sent_per_rank": 0 if plan.cfg.train.world_size == 1 else 4096, "peak_memory_mb": 300.0,
               "strategy_figures": {},
               "history": [{"epoch": e + 1, "elapsed_seconds": t, "bytes_sent": 1000 * e, "dev_wer_greedy": w}
                           for e, (t, w) in enumerate(history)]}
    (exp / "train_summary.json").write_text(json.dumps(summary))
    dump_config(plan.cfg, exp / "config.yaml")
    return exp


def run_compare(cfg: Path, capsys, *extra: str):
    try:
        compare.main(["--config", str(cfg), "--collect-only", *extra])
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    out = cfg.parent / "exp" / "compare"
    return json.loads((out / "comparison.json").read_text()), (out / "comparison.md").read_text()


RUNS = ["{strategy: {name: single}, label: single}",
        "{strategy: {name: model_averaging, sync_period: 4}, world_size: 2, label: ma}",
        "{strategy: {name: sync_sgd}, world_size: 2}"]


def test_intervals_and_paired_tests_against_the_baseline(tmp_path, capsys):
    cfg = write_config(tmp_path, RUNS)
    p = plans(cfg)
    assert [x.label for x in p] == ["single", "ma", "sync_sgd_w2"] and all(x.seed is None for x in p)
    fake_experiment(p[0], set(range(0, N, 3)), [(50.0, 80.0), (100.0, 40.0)])  # 20 errors / 300 words
    fake_experiment(p[1], set(range(0, N, 6)), [(30.0, 60.0), (60.0, 45.0)])  # half the baseline's errors
    fake_experiment(p[2], set(range(0, N, 3)), [(40.0, 50.0), (80.0, 30.0)])  # the baseline's errors
    table, md = run_compare(cfg, capsys)
    assert table["baseline"] == "single" and table["seeds"] == [] and "seed_summary" not in table
    assert table["significance"]["resamples"] == 1000 and table["significance"]["unit"] == "utterance"
    single, ma, sync = table["runs"]
    for row in table["runs"]:
        assert row["decode"] == "wfst_lmwt0.8" and row["seed"] == 42
        for key in ("dev_worn", "dev_array", "eval_worn", "eval_array"):
            low, high = row[f"{key}_wer_ci"]
            assert low < row[f"{key}_wer"] < high
    assert single["dev_worn_wer"] == round(100 * 20 / 300, 2) and ma["dev_worn_wer"] == round(100 * 10 / 300, 2)
    assert single["vs_baseline"] is None
    t = ma["vs_baseline"]["dev_worn"]
    assert ma["vs_baseline"]["baseline"] == "single"
    # every utterance ma gets wrong the baseline gets wrong too: never worse, and no resampled set of
    # 60 utterances lacks all of the 10 it fixes but (5/6)^60
    assert t["difference"] == round(100 * (10 - 20) / 300, 2) == -3.33
    assert t["poi"] == 1.0 and t["difference_ci"][1] < 0 and t["verdict"] == "better"
    s = sync["vs_baseline"]["eval_array"]
    assert s["difference"] == 0.0 and s["difference_ci"] == [0.0, 0.0] and s["poi"] == 0.5 and s["verdict"] == "tie"
    # time to reach 50%: the first epoch at or under it
    assert [r["time_to_target_seconds"] for r in table["runs"]] == [100.0, 60.0, 40.0]
    assert "| run | ranks | dev worn |" in md and f"| single | 1 | {single['dev_worn_wer']:.2f} [" in md
    lines = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert lines["| ma"].count(" better") == 4 and lines["| sync_sgd_w2"].count(" tie") == 4
    assert "poi 1.00 better" in lines["| ma"]

    # The baseline named by label or by strategy; an unknown one is refused with the runs listed.
    cfg = write_config(tmp_path, RUNS, baseline="sync_sgd")
    table, md = run_compare(cfg, capsys)
    assert table["baseline"] == "sync_sgd_w2" and table["runs"][2]["vs_baseline"] is None
    assert table["runs"][0]["vs_baseline"]["dev_worn"]["verdict"] == "tie"
    assert table["runs"][1]["vs_baseline"]["dev_worn"]["verdict"] == "better"
    cfg = write_config(tmp_path, RUNS, baseline="bmuf")
    code, err = run_compare(cfg, capsys)
    assert code == 1 and "compare.baseline 'bmuf' is neither the label nor the strategy of a run; " \
                         "runs: single, ma, sync_sgd_w2" in err

    # A run decoded on other utterances cannot be paired: the ids are named.
    fake_experiment(p[2], set(range(0, N, 3)), [(40.0, 50.0)], drop=7)
    cfg = write_config(tmp_path, RUNS)
    code, err = run_compare(cfg, capsys)
    assert code == 1 and "different utterances" in err and "dev_007" in err and "sync_sgd_w2" in err

    # results.json that no longer matches the decodings is refused.
    fake_experiment(p[2], set(range(0, N, 3)), [(40.0, 50.0)])
    exp = experiment_dir(p[2].cfg)
    results = json.loads((exp / "results.json").read_text())
    results["wfst"]["dev"]["worn"]["total"]["wer"] = 1.0
    (exp / "results.json").write_text(json.dumps(results))
    code, err = run_compare(cfg, capsys)
    assert code == 1 and "results.json gives dev worn WER 1.0" in err and "score (stage 7) again" in err


def test_seeds(tmp_path, capsys):
    cfg = write_config(tmp_path, RUNS[:2], seeds=[3, 11])
    p = plans(cfg)
    assert [x.label for x in p] == ["single_seed3", "single_seed11", "ma_seed3", "ma_seed11"]
    assert [x.cfg.train.seed for x in p] == [3, 11, 3, 11]
    assert [experiment_dir(x.cfg) for x in p] == [
        tmp_path / "exp/seed3/conformer_single_w1", tmp_path / "exp/seed11/conformer_single_w1",
        tmp_path / "exp/seed3/conformer_model_averaging_sync_period4_w2",
        tmp_path / "exp/seed11/conformer_model_averaging_sync_period4_w2"]
    wrong = [range(0, N, 3), range(1, N, 3), range(0, N, 6), range(0, N, 4)]
    for x, errs in zip(p, wrong):
        fake_experiment(x, set(errs), [(50.0, 80.0), (70.0 + x.seed, 40.0)])
    table, md = run_compare(cfg, capsys)
    assert table["seeds"] == [3, 11]
    rows = {r["label"]: r for r in table["runs"]}
    assert [r["seed"] for r in table["runs"]] == [3, 11, 3, 11]
    # each seed against the baseline of its own seed
    assert rows["ma_seed3"]["vs_baseline"]["baseline"] == "single_seed3"
    assert rows["ma_seed11"]["vs_baseline"]["baseline"] == "single_seed11"
    assert rows["ma_seed3"]["vs_baseline"]["dev_worn"]["verdict"] == "better"  # 10 errors, a subset of 20
    summary = {s["run"]: s for s in table["seed_summary"]}
    ma = summary["ma"]
    assert ma["seeds"] == [3, 11] and ma["labels"] == ["ma_seed3", "ma_seed11"]
    w = [rows["ma_seed3"]["dev_worn_wer"], rows["ma_seed11"]["dev_worn_wer"]]  # 10 and 15 errors / 300 words
    assert w == [3.33, 5.0]
    assert ma["dev_worn_wer"] == {"mean": pytest.approx(4.165, abs=0.0051), "std": round((5.0 - 3.33) / 2 ** 0.5, 2),
                                  "min": 3.33, "max": 5.0, "n": 2}
    assert ma["wall_seconds"]["min"] == 130.0 and ma["wall_seconds"]["max"] == 210.0
    assert ma["time_to_target_seconds"] == {"mean": 77.0, "std": round(8 / 2 ** 0.5, 2),
                                            "min": 73.0, "max": 81.0, "n": 2} and ma["reached_target"] == 2
    assert summary["single"]["vs_baseline"] is None
    assert ma["vs_baseline"]["dev_worn"]["better"] + ma["vs_baseline"]["dev_worn"]["tie"] == 2
    assert "| **ma**: mean ± std (min-max) over 2 seeds | 2 | 4.17 ± 1.18 (3.33-5.00) |" in md
    assert "| ma_seed11 | single_seed11 |" in md and "| **ma** over 2 seeds | single |" in md

    # TensorBoard: one run per seed, with its seed as a column.
    values = hparams_of(tmp_path / "exp/compare/tensorboard/ma_seed11")[1]
    assert values["seed"] == 11.0

    # A seeded experiment trained with another seed is refused.
    dump_config(p[0].cfg, experiment_dir(p[1].cfg) / "config.yaml")
    code, err = run_compare(cfg, capsys)
    assert code == 1 and "single_seed11 was trained with train.seed=3, not 11" in err


def test_pairs_are_tested_seed_by_seed(tmp_path, capsys):
    cfg = write_config(tmp_path, RUNS, seeds=[3, 11], pairs="[[sync_sgd_w2, ma]]")
    for x in plans(cfg):
        errs = range(0, N, 3) if x.run_label != "ma" else range(0, N, 6)  # ma: half the others' errors
        fake_experiment(x, set(errs), [(50.0, 80.0)])
    table, md = run_compare(cfg, capsys)
    assert [(e["reference"], e["run"]) for e in table["pairs"]] == [("sync_sgd_w2_seed3", "ma_seed3"),
                                                                   ("sync_sgd_w2_seed11", "ma_seed11")]
    assert table["pairs"][0]["dev_worn"]["verdict"] == "better" and table["pairs"][0]["dev_worn"]["difference"] < 0
    assert "| ma_seed11 | sync_sgd_w2_seed11 |" in md
    write_config(tmp_path, RUNS, seeds=[3, 11], pairs="[[sync_sgd_w2, nope]]")
    code, err = run_compare(cfg, capsys)
    assert code == 1 and "compare.pairs entry ['sync_sgd_w2', 'nope'] must name two runs" in err


def test_a_run_can_have_fewer_seeds(tmp_path, capsys):
    """A run's own ``seeds`` (an expensive row) trains it with those only; the others get every seed."""
    runs = [RUNS[0], "{strategy: {name: model_averaging, sync_period: 4}, world_size: 2, label: ma, seeds: [11]}"]
    p = plans(write_config(tmp_path, runs, seeds=[3, 11]))
    assert [x.label for x in p] == ["single_seed3", "single_seed11", "ma_seed11"]
    for x in p:
        fake_experiment(x, set(range(0, N, 3)), [(50.0, 80.0)])
    table, md = run_compare(write_config(tmp_path, runs, seeds=[3, 11]), capsys)
    summary = {s["run"]: s for s in table["seed_summary"]}
    assert summary["single"]["seeds"] == [3, 11] and summary["ma"]["seeds"] == [11]
    assert table["runs"][2]["vs_baseline"]["baseline"] == "single_seed11"
    for bad, message in (("[5]", r"compare.runs\[1\].seeds' must be a non-empty list of distinct seeds out of "
                                 r"compare.seeds \[3, 11\], got \[5\]"), ("[]", "non-empty")):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, [RUNS[0], runs[1].replace("[11]", bad)], seeds=[3, 11]))
    with pytest.raises(ConfigError, match=r"compare.runs\[1\].seeds' needs compare.seeds"):
        load_config(write_config(tmp_path, runs))


def test_seed_key_is_validated(tmp_path):
    for seeds, message in (("[1, 2, 1]", r"key 'compare.seeds' must list distinct seeds, got \[1, 2, 1\] "
                                         r"\(\[1\] repeated\)"),
                           ("[1, x]", r"key 'compare.seeds\[1\]' expects int, got str 'x'"),
                           ("3", "key 'compare.seeds' expects list of int, got int 3"),
                           ("[-1]", "key 'compare.seeds' must hold seeds >= 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, RUNS, seeds=seeds))
    assert load_config(write_config(tmp_path, RUNS)).compare.seeds == []
    with pytest.raises(ConfigError, match="compare.bootstrap_unit' expects one of 'utterance', 'speaker', 'session'"):
        load_config(write_config(tmp_path, RUNS), ["compare.bootstrap_unit=room"])
    with pytest.raises(ConfigError, match="compare.confidence_level' must be in"):
        load_config(write_config(tmp_path, RUNS), ["compare.confidence_level=95"])
    with pytest.raises(ConfigError, match="several runs labelled ma"):
        plans(write_config(tmp_path, RUNS[:2] + ["{strategy: {name: bmuf}, world_size: 2, label: ma}"]))


def hparams_of(event_dir: Path):
    """(the experiment's hparam names, this run's values, custom scalars layout) of a TensorBoard run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return [h.name for h in experiment.hparam_infos], values, layout, acc.Tags()["scalars"]


def test_tensorboard_columns_and_overlays(tmp_path, capsys):
    """Every strategy parameter of every run is a column of the HParams view, the same in every run."""
    import dataclasses

    from asr_parallel.strategies import parse_strategy

    pipeline = "{strategy: {name: pipelined_bp, balance: params}, world_size: 2, label: pbp}"
    cfg = write_config(tmp_path, RUNS + [pipeline])
    p = plans(cfg)
    for x in p:
        fake_experiment(x, set(range(0, N, 3)), [(50.0, 80.0), (100.0, 40.0)])
    table, _ = run_compare(cfg, capsys)
    params = {f"strategy.{k}": v for x in p for k, v in dataclasses.asdict(parse_strategy(x.run["strategy"])).items()}
    assert {"strategy.sync_period", "strategy.warmup_steps", "strategy.bucket_cap_mb",
            "strategy.balance"} <= set(params)
    names = None
    for x, row in zip(p, table["runs"]):
        columns, values, layout, scalars = hparams_of(tmp_path / "exp/compare/tensorboard" / x.label)
        assert set(columns) == {"strategy", "world_size", "model", "seed", *params}
        assert names in (None, columns)  # the same experiment in every run
        names = columns
        own = dataclasses.asdict(parse_strategy(x.run["strategy"]))
        assert values["strategy"] == x.run["strategy"]["name"] and values["seed"] == 42
        assert values["model"] == "conformer" and values["world_size"] == row["world_size"]
        for k in params:
            name = k.removeprefix("strategy.")
            if name in own:
                assert values[k] == (own[name] if not isinstance(own[name], list) else json.dumps(own[name]))
            elif isinstance(params[k], (str, list, dict)):
                assert values[k] == "-"
            else:
                assert k not in values
        assert values.get("strategy.sync_period") == (4 if x.label == "ma" else None)
        assert values["strategy.balance"] == ("params" if x.label == "pbp" else "-")  # a text parameter
        assert values.get("strategy.boundaries") == ("[]" if x.label == "pbp" else "-")  # a list, as JSON
        charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
        assert charts == {title: [f"^{tag}$"] for tag, title in compare.OVERLAYS.items()}
        # Time Series groups cards by the tag's first component, in tag order: the overlays come first.
        groups = sorted({tag.split("/")[0] for tag in scalars})
        assert groups[0] == "compare" and set(groups) == {"compare", "hparam"}
