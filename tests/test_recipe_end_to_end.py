"""run.sh stages 4-7 on the tiny simulated corpus: graph, training (1 process, and 2 gloo ranks under
torchrun with sync_sgd), decoding and scoring, ending in the WER table and results.json."""

import json
import subprocess
from pathlib import Path

import pytest

from chime6_fixture import TINY_SIMULATION

REPO = Path(__file__).resolve().parents[1]
TINY_TRAINING = ["model.name=mlp", "model.mlp.num_layers=2", "model.mlp.hidden_dim=64", "train.max_steps=8",
                 "train.max_duration=20", "train.num_buckets=2", "train.log_every_steps=2", "decode.lm_weights=[0.5,1.0]"]


def run_sh(data: Path, exp: Path, *extra: str, stop_stage: int = 7) -> subprocess.CompletedProcess:
    overrides = " ".join(TINY_SIMULATION + TINY_TRAINING + [f"data_dir={data}", f"exp_dir={exp}", *extra])
    return subprocess.run(["bash", str(REPO / "run.sh"), "--setup", "false", "--stage", "4", "--stop-stage",
                           str(stop_stage), "--overrides", overrides], cwd=REPO, capture_output=True, text=True)


def check_results(exp_run: Path, steps: int = 8):
    results = json.loads((exp_run / "results.json").read_text())
    for method in ("greedy", "wfst"):
        for split in ("dev", "eval"):
            for cond in ("worn", "array"):
                total = results[method][split][cond]["total"]
                assert total["words"] > 0
                # errors (substitutions, deletions, insertions) over reference words, as Kaldi counts them
                assert total["wer"] == pytest.approx(100 * total["errors"] / total["words"], abs=0.01)
    assert results["wfst"]["lm_weight"] in (0.5, 1.0)
    assert results["train_summary"]["steps"] == steps
    assert results["timing"]["rtf_greedy"] > 0
    report = (exp_run / "wer_report.txt").read_text()
    assert "%WER" in report and "session S02" in report and "location kitchen" in report
    return results


LEARN = ["train.max_steps=0", "train.epochs=2", "train.warmup_steps=10", "train.lr=0.005"]


def test_stages_4_to_7_single_process(prepared, tmp_path):
    """Two epochs: the model learns (its dev loss per utterance ends below half the loss of the first
    training batch, the untrained model's, and its greedy output is not blanks only), and decoding
    and scoring give Kaldi-style WER figures."""
    r = run_sh(prepared, tmp_path / "exp", *LEARN)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "| method | dev worn | dev array | eval worn | eval array |" in r.stdout
    summary = json.loads((tmp_path / "exp" / "mlp_single_w1" / "train_summary.json").read_text())
    results = check_results(tmp_path / "exp" / "mlp_single_w1", steps=summary["steps"])
    assert summary["epochs"] == 2 and [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["history"][-1]["dev_loss"] < 0.5 * summary["losses"][0], (summary["losses"][:3], summary["history"])
    # and it emits words (a model of blanks only deletes every word): greedy decoding of dev worn
    # leaves fewer than 95% of the reference words deleted
    greedy = results["greedy"]["dev"]["worn"]["total"]
    assert greedy["del"] < 0.95 * greedy["words"], greedy
    assert results["train_summary"]["steps"] > 8
    assert summary["precision"] == "float32"  # train.bf16_cpu auto, kept float32 by the suite's environment
    # WFST tuning: dev worn decoded at every (LM weight, blank penalty) pair of the recipe's grid, the
    # pair of lowest dev worn WER chosen (the first of equals), only it decoding the other sets, and
    # the report giving that pair's figures
    from asr_parallel.score.report import read_rows, score_rows

    decode = tmp_path / "exp" / "mlp_single_w1" / "decode"
    choice = json.loads((decode / "wfst_choice.json").read_text())
    grid = [f"wfst_lmwt{w:g}" + (f"_bp{p:g}" if p else "") for p in (0.0, 2.0, 3.0, 4.0, 5.0) for w in (0.5, 1.0)]
    assert sorted(d.name for d in decode.glob("wfst_*") if d.is_dir()) == sorted(grid)
    dev = {g: score_rows(read_rows(decode / g / "dev_ihm.jsonl"))["total"].wer for g in grid}
    assert choice["dir"] == min(grid, key=lambda g: dev[g])
    assert choice["dev_worn_wer"] == {g: round(w, 2) for g, w in dev.items()}
    for g in grid:
        assert (decode / g / "eval_ihm.jsonl").is_file() == (g == choice["dir"])
    assert (results["wfst"]["lm_weight"], results["wfst"]["blank_penalty"]) == (choice["lm_weight"],
                                                                               choice["blank_penalty"])
    assert results["wfst"]["dev"]["worn"]["total"]["wer"] == pytest.approx(dev[choice["dir"]], abs=0.01)
    # Re-running skips the finished training and decoding.
    r = run_sh(prepared, tmp_path / "exp", *LEARN)
    assert r.returncode == 0
    assert "training already finished" in r.stdout and "already decoded" in r.stdout
    # Decoding again (other options) leaves no decoding of before beside the new ones.
    (decode / "wfst_lmwt9").mkdir()
    (decode / "wfst_lmwt9" / "dev_ihm.jsonl").write_text("")
    r = run_sh(prepared, tmp_path / "exp", *LEARN, "decode.blank_penalty=[0.0,1.0]")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(d.name for d in decode.glob("wfst_*") if d.is_dir()) == ["wfst_lmwt0.5", "wfst_lmwt0.5_bp1",
                                                                          "wfst_lmwt1", "wfst_lmwt1_bp1"]
    assert json.loads((decode / "wfst_choice.json").read_text())["blank_penalty"] in (0.0, 1.0)


def test_bf16_on_cpu_through_run_sh_and_auto_keeps_a_runs_precision(prepared, tmp_path):
    """Stage 5 with ``train.bf16_cpu=true`` trains in bf16 (recorded in train_summary.json and
    config.yaml) and decodes; run again under ``auto`` where auto would choose float32 (the suite's
    ASR_PARALLEL_BF16_CPU=0), it keeps the finished run's precision and reuses it instead of refusing
    it as another config; a new directory under ``auto`` records the float32 it chose."""
    import yaml

    run = tmp_path / "exp" / "mlp_single_w1"
    r = run_sh(prepared, tmp_path / "exp", "train.bf16_cpu=true")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert check_results(run)["train_summary"]["precision"] == "bf16"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["bf16_cpu"] is True
    r = run_sh(prepared, tmp_path / "exp", "train.bf16_cpu=auto", stop_stage=5)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "training already finished" in r.stdout
    r = run_sh(prepared, tmp_path / "other", "train.bf16_cpu=auto", stop_stage=5)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    other = tmp_path / "other" / "mlp_single_w1"
    assert json.loads((other / "train_summary.json").read_text())["precision"] == "float32"
    assert yaml.safe_load((other / "config.yaml").read_text())["train"]["bf16_cpu"] is False


def test_two_gloo_ranks_under_torchrun(prepared, tmp_path):
    r = run_sh(prepared, tmp_path / "exp", "train.world_size=2", "strategy.name=sync_sgd")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    results = check_results(tmp_path / "exp" / "mlp_sync_sgd_w2")
    summary = results["train_summary"]
    assert summary["world_size"] == 2
    # 8 all-reduces of one DDP bucket (this small model fits torch's first one): the gradients, the
    # utterance count and the bad-loss flag; the same as the cost model's
    assert summary["bytes_by_label"]["gradients"] == [8 * (summary["params"] + 2) * 4, 8]
    assert summary["predicted"]["by_label"]["gradients"] == summary["bytes_by_label"]["gradients"]
    assert summary["calls_this_process"]["counted"] == summary["calls_this_process"]["process_group"]
    # what the scaling validation reads: the training loop's own time, frames, threads, one node
    assert 0 < summary["train_seconds"] <= summary["wall_seconds"] + 0.05  # wall is rounded to 0.1 s
    assert summary["frames_per_rank"] > 0 and summary["nodes"] == 1 and summary["link_rate"] is None
    import os

    assert summary["threads_per_rank"] == max(1, (os.cpu_count() or 1) // 2)


BMUF = ["train.world_size=2", "strategy.name=bmuf", "strategy.sync_period=3", "strategy.warmup_steps=2",
        "strategy.block_momentum=0.5", "train.checkpoint_every_steps=5", "model.mlp.dropout=0.0"]


def test_bmuf_under_torchrun_resumes_mid_block_from_checkpoint_files(prepared, tmp_path):
    import torch

    from asr_parallel.strategies.cost import ModelSize, predict

    r = run_sh(prepared, tmp_path / "a", *BMUF)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run = "mlp_bmuf_block_momentum0.5_sync_period3_warmup_steps2_w2"
    results = check_results(tmp_path / "a" / run)
    summary = results["train_summary"]
    assert "communication per rank" in r.stdout
    # fairseq's warm-up: a broadcast at the start and after the 2 local warm-up steps; blocks end after
    # steps 5 and 8. The strategy's calls are those the cost model has; the trainer's own are counted
    # apart, and every call of the run is in the count (the process group's sequence numbers agree).
    strategy_calls = {k: v for k, v in summary["bytes_by_label"].items() if k != "trainer"}
    assert strategy_calls == {"broadcast": [2 * summary["params"] * 4, 2], "params": [2 * (summary["params"] + 1) * 4, 2]}
    assert summary["predicted"] == predict({"name": "bmuf", "sync_period": 3, "warmup_steps": 2,
                                            "block_momentum": 0.5}, ModelSize(summary["params"]), 2, 8)
    assert strategy_calls == summary["predicted"]["by_label"]
    assert summary["bytes_by_label"]["trainer"][1] >= 3
    assert summary["calls_this_process"]["counted"] == summary["calls_this_process"]["process_group"]
    # Stopped after step 7 (checkpoint at step 5, mid-block), re-run to step 8: the same model.
    b = tmp_path / "b"
    r = run_sh(prepared, b, *BMUF, "train.max_steps=7", stop_stage=5)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("final.pt", "train_summary.json"):
        (b / run / name).unlink()
    for ckpt in (b / run).glob("checkpoint-00000007"):
        import shutil

        shutil.rmtree(ckpt)  # resume from the checkpoint of step 5, written in the middle of a block
    r = run_sh(prepared, b, *BMUF, stop_stage=5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "checkpoint-00000005" in r.stdout
    a_model = torch.load(tmp_path / "a" / run / "final.pt", weights_only=True)
    b_model = torch.load(b / run / "final.pt", weights_only=True)
    for key, value in a_model["model"].items():
        assert torch.equal(value, b_model["model"][key]), key



@pytest.mark.parametrize("strategy", ["pipelined_bp", "gpipe"])
def test_pipelines_under_torchrun(prepared, tmp_path, strategy):
    r = run_sh(prepared, tmp_path / "exp", "train.world_size=2", f"strategy.name={strategy}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "rank 0: splice" in r.stdout  # the cut is printed
    results = check_results(tmp_path / "exp" / f"mlp_{strategy}_w2")
    summary = results["train_summary"]
    assert summary["world_size"] == 2 and summary["bad_batches"] == 0
    assert len(summary["losses"]) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "exp" / f"mlp_{strategy}_w2" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    for tag in ("pipeline/idle_fraction_stage0", "pipeline/busy_seconds_stage1",
                "pipeline/bytes_forward_boundary0", "pipeline/staleness_stage0", "train/loss"):
        assert tag in tags, tags
    if strategy == "pipelined_bp":  # stage 0 applies gradients two updates old once the pipeline is full
        assert events.Scalars("pipeline/staleness_stage0")[-1].value == 2.0
        # one exchange per tick: the steps and the drain ticks (epoch ends, the run's end; checkpoints
        # every train.checkpoint_every_steps) that the scaling predictor counts
        from asr_parallel.bin.predict_scaling import epoch_steps
        from asr_parallel.config import load_config
        from asr_parallel.scaling import pipeline_flushes

        cfg = load_config(tmp_path / "exp" / f"mlp_{strategy}_w2" / "config.yaml")
        steps, per_epoch = summary["steps"], epoch_steps(cfg, 1)
        flushes = pipeline_flushes(steps, per_epoch, cfg.train.checkpoint_every_steps)
        assert flushes >= 1  # the run's end at least
        assert summary["bytes_by_label"]["control"][1] == steps + 2 * flushes


ASYNC = ["train.world_size=3", "strategy.name=async_ps", "strategy.schedule=round_robin", "model.mlp.dropout=0.0",
         "train.checkpoint_every_steps=3"]


@pytest.mark.parametrize("strategy", [["strategy.name=async_ps"],
                                      ["strategy.name=dc_asgd", "strategy.dc_lambda=0.5", "strategy.adaptive=true"],
                                      ["strategy.name=async_ps", "strategy.schedule=seeded", "strategy.schedule_seed=5"]],
                         ids=["async_ps", "dc_asgd_adaptive", "async_ps_seeded"])
def test_async_ps_under_torchrun_pauses_and_resumes_exactly(prepared, tmp_path, strategy):
    """A server and 2 workers in a fixed round robin: checkpoints at server updates 3 and 6 (every rank
    pauses), stop at 8; stopped at 5 and resumed from the checkpoint of update 3, the same model.
    DC-ASGD-a too: its copies w_bak and mean square are in the servers' checkpoints. And the seeded
    random order: its generator's state is in the server's checkpoint, so the order resumes too."""
    import torch

    args = ASYNC + strategy
    r = run_sh(prepared, tmp_path / "a", *args, stop_stage=5)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run = next((tmp_path / "a").glob("mlp_*_w3"))
    summary = json.loads((run / "train_summary.json").read_text())
    figures = summary["strategy_figures"]
    assert summary["steps"] == 8 and figures["updates"] == 8
    # staleness K - 1 = 1, or 2 for the push of a worker whose gradient was held over a pause (it
    # fetched the parameters of the pause, without its own push)
    hist = figures["staleness_histogram"]
    seeded = "strategy.schedule=seeded" in strategy
    if seeded:  # a worker drawn several times in a row waits for its own reply: staleness 0 then
        assert sum(hist) == 8 and hist[figures["staleness_max"]] > 0, hist
    else:
        assert figures["staleness_max"] <= 2 and sum(hist[:3]) == 8 and hist[1] >= 4, hist
    assert summary["calls_this_process"]["counted"] == summary["calls_this_process"]["process_group"]
    assert summary["predicted"]["by_label"] == {k: v for k, v in summary["bytes_by_label"].items() if k != "trainer"}
    # the server's traffic and each worker's, counted on every rank, equal the cost model's
    per = summary["per_rank"]
    assert per["bytes_sent"] == per["predicted_bytes_sent"] and min(per["bytes_sent"]) > 0, per
    assert per["bytes_sent"][0] == summary["predicted"]["bytes_sent"]
    # checkpoints after updates 3 and 6, and one at every end of an epoch of updates (2 workers x their
    # batches per epoch), where rank 0 also evaluates the master model
    epoch_ends = [h["step"] for h in summary["history"]]
    assert epoch_ends == list(range(figures["updates_per_epoch"], 9, figures["updates_per_epoch"]))
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert names == sorted({f"checkpoint-{s:08d}" for s in [3, 6] + epoch_ends})[-3:]  # keep_checkpoints 3
    # the staleness of the applied pushes in TensorBoard's histogram: values the run summary holds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    logged = [e.histogram_value for e in acc.Histograms("async/staleness")]  # (logged every 2 updates: all 8)
    assert sum(h.num for h in logged) == 8 and sum(h.sum for h in logged) == sum(i * n for i, n in enumerate(hist))
    assert min(h.min for h in logged) == 0 and max(h.max for h in logged) == figures["staleness_max"]
    b = tmp_path / "b"
    r = run_sh(prepared, b, *args, "train.max_steps=5", stop_stage=5)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("final.pt", "train_summary.json"):
        (b / run.name / name).unlink()
    r = run_sh(prepared, b, *args, stop_stage=5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "checkpoint-00000003" in r.stdout
    a_model = torch.load(run / "final.pt", weights_only=True)["model"]
    b_model = torch.load(b / run.name / "final.pt", weights_only=True)["model"]
    for key, value in a_model.items():
        assert torch.equal(value, b_model[key]), key


def test_async_ps_run_length_in_every_workers_own_epochs(prepared, tmp_path):
    """run_length worker_epochs through the trainer: every worker makes exactly its own passes over
    its shard (its pushes: its batches times the epochs), the one done first waits for the last
    epoch's end and the stop; every call counted and predicted."""
    from lhotse import load_manifest

    from asr_parallel.config import load_config
    from asr_parallel.train.data import make_sampler

    r = run_sh(prepared, tmp_path / "exp", "train.world_size=3", "strategy.name=async_ps", "train.max_steps=0",
               "train.epochs=2", "strategy.run_length=worker_epochs", "strategy.poll_seconds=0.05", stop_stage=5)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    run = next((tmp_path / "exp").glob("mlp_async_ps_*_w3"))
    summary = json.loads((run / "train_summary.json").read_text())
    figures = summary["strategy_figures"]
    tc = load_config(run / "config.yaml").train
    cuts = load_manifest(prepared / "fbank/chime6-ihm_cuts_train.jsonl.gz")
    own = []
    for worker in range(2):
        sampler = make_sampler(cuts, tc.max_duration, tc.num_buckets, True, worker, 2, tc.seed)
        own.append(sum(sum(1 for _ in sampler) for e in range(2) if sampler.set_epoch(e) is None))
    assert figures["pushes_per_worker"] == own and figures["updates"] == sum(own) == summary["steps"]
    assert summary["epochs"] == 2 and [h["epoch"] for h in summary["history"]] == [1, 2]
    assert summary["calls_this_process"]["counted"] == summary["calls_this_process"]["process_group"]
    assert summary["predicted"]["by_label"] == {k: v for k, v in summary["bytes_by_label"].items() if k != "trainer"}


@pytest.mark.parametrize("strategy", ["ad_psgd", "hogwild"])
def test_decentralized_and_lock_free_strategies_under_torchrun(prepared, tmp_path, strategy):
    """AD-PSGD (a passive thread answering the active rank's averages) and Hogwild (one shared vector)
    through the trainer: checkpoints every 3 steps, epoch ends, the end; every call counted."""
    r = run_sh(prepared, tmp_path / "exp", "train.world_size=2", f"strategy.name={strategy}",
               "train.checkpoint_every_steps=3", stop_stage=5)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "exp" / f"mlp_{strategy}_w2" / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["bad_batches"] == 0
    assert summary["calls_this_process"]["counted"] == summary["calls_this_process"]["process_group"]
    figures = summary["strategy_figures"]
    if strategy == "ad_psgd":
        assert figures["exchanges"] == 8  # rank 0 (active) averaged once per step
        assert summary["bytes_by_label"]["gossip"][1] == 8 * 3 + 1  # header, model out, model back; done
        assert summary["predicted"]["by_label"] == {k: v for k, v in summary["bytes_by_label"].items()
                                                    if k not in ("trainer", "hogwild")}
    else:
        assert figures["shared_bytes"] == 4 * summary["params"]
        # the name's broadcast and a barrier at the set-up, at 2 checkpoints and 2 epoch ends, and the end
        assert summary["bytes_by_label"]["hogwild"] == [8, 7]
        assert summary["predicted"]["by_label"] == {k: v for k, v in summary["bytes_by_label"].items() if k != "trainer"}
        assert not list(Path("/dev/shm").glob("asr_parallel_hogwild_*"))  # removed at the end
