"""The asynchronous strategies against the one-process delay simulator
(:mod:`asr_parallel.strategies.delay_sim`): ``async_ps`` in a fixed round robin on gloo ranks equals
Downpour SGD simulated with the same minibatches, DC-ASGD with lambda 0 equals it and with lambda > 0
(constant and adaptive) equals simulated DC-ASGD, synchronous rounds with 0 backup workers equal
synchronous SGD; every send and receive is counted as gloo counts it and as the cost model predicts;
a dead or hung rank stops the others with an error naming it.

Ranks: one server and 2 workers (3 processes, one thread each), a tiny MLP, plain SGD.
"""

import dataclasses
import time

import pytest
import torch

from strategy_harness import LR, batch, build, config, flat, gloo_ranks, load_flat, spawn_and_reap

BATCHES = 4  # minibatches per worker per "epoch": the run is 2 * 4 = 8 server updates
WORKERS = 2


def grad_fn(cfg, uneven: bool = True):
    """The simulator's gradient: worker k's ``index``-th minibatch (0-based) at parameters w, as a
    worker computes it (the loss's mean over the minibatch's utterances)."""
    from asr_parallel.train.loss import ctc_loss

    model = build(cfg)

    def grad(k, index, w):
        load_flat(model, w)
        model.zero_grad(set_to_none=True)
        b = batch(index + 1, k, uneven=uneven)
        logits, out_lens = model(b.feats, b.feat_lens)
        (ctc_loss(logits, out_lens, b.tokens) / len(b.tokens)).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    return grad


# ---------------------------------------------------------------- the simulator on its own


def test_simulator_staleness_and_special_cases():
    from asr_parallel.strategies import delay_sim

    cfg = config({"name": "single"})
    w0, grad = flat(build(cfg)), grad_fn(cfg)
    w, stale = delay_sim.downpour(w0, grad, 3, delay_sim.round_robin(3, 9), LR)
    assert stale == [0, 1, 2, 2, 2, 2, 2, 2, 2]  # K - 1 once every worker has pushed
    # one worker: plain SGD on its minibatches
    w1, stale1 = delay_sim.downpour(w0, grad, 1, [0] * 4, LR)
    sgd = w0.clone()
    for i in range(4):
        sgd = sgd - LR * grad(0, i, sgd)
    assert stale1 == [0] * 4 and torch.allclose(w1, sgd, atol=1e-7)
    # DC-ASGD with lambda 0 is ASGD; with lambda > 0 it is not
    assert torch.equal(delay_sim.downpour(w0, grad, 3, delay_sim.round_robin(3, 9), LR, dc_lambda=0.0)[0], w)
    assert not torch.allclose(delay_sim.downpour(w0, grad, 3, delay_sim.round_robin(3, 9), LR, dc_lambda=2.0)[0], w)
    # gossip: the mean over workers follows SGD on the mean of the gradients each worker computes
    for t in range(3):
        xs = delay_sim.gossip(w0, grad, 4, t, LR)
        mean_next = sum(delay_sim.gossip(w0, grad, 4, t + 1, LR)) / 4
        assert torch.allclose(mean_next, sum(xs) / 4 - LR * sum(grad(k, t, xs[k]) for k in range(4)) / 4, atol=1e-6)
    assert not torch.allclose(xs[0], xs[1])  # the workers' models differ; only their mean is SGD


# ---------------------------------------------------------------- on gloo ranks

SCENARIOS = {
    "asgd": {"name": "async_ps", "schedule": "round_robin"},
    "dc0": {"name": "dc_asgd", "schedule": "round_robin", "dc_lambda": 0.0},
    "dc": {"name": "dc_asgd", "schedule": "round_robin", "dc_lambda": 2.0},
    "dca": {"name": "dc_asgd", "schedule": "round_robin", "dc_lambda": 0.1, "adaptive": True},
    "sync": {"name": "async_ps", "backup_workers": 0},
    # a seeded random order of arrivals: random staleness, deterministic
    "seeded": {"name": "async_ps", "schedule": "seeded", "schedule_seed": 2},
    "dc_seeded": {"name": "dc_asgd", "schedule": "seeded", "schedule_seed": 2, "dc_lambda": 2.0},
    "arrival": {"name": "async_ps"},
    # one backup worker, worker 1 a straggler (0.3 s more per minibatch): every round uses one gradient
    "backup": {"name": "async_ps", "backup_workers": 1, "slow_worker": 1},
    # 2 servers and one worker fetching every 3rd minibatch: the epoch's end (update 4) and the stop
    # reach it without a fetch, so only the first server sends parameters with its word
    "two_servers": {"name": "async_ps", "servers": 2, "fetch_every": 3, "schedule": "round_robin"},
    # 2 epochs: the push that reaches the server after the first epoch's end is applied after the pause,
    # its reply already sent (DC-ASGD must compensate it against the copy it was computed at)
    "dc_epochs": {"name": "dc_asgd", "schedule": "round_robin", "dc_lambda": 2.0, "epochs": 2},
    "asgd_epochs": {"name": "async_ps", "schedule": "round_robin", "epochs": 2},
    # 2 servers, each with half the parameters, and so one worker: SGD, every staleness 0
    "sgd_two_servers": {"name": "async_ps", "servers": 2, "schedule": "round_robin"},
    # DC-ASGD with one worker: w_bak[k] is w at every push, so the correction is 0 and it is SGD too
    "dc_two_servers": {"name": "dc_asgd", "servers": 2, "schedule": "round_robin", "dc_lambda": 2.0},
    # the run's length in every worker's own epochs: the fast worker waits for the straggler
    "worker_epochs": {"name": "async_ps", "run_length": "worker_epochs", "poll_seconds": 0.05, "slow_worker": 1},
}


def _sequence_numbers(st) -> int:
    from asr_parallel.strategies.base import process_group_calls

    return process_group_calls([None] + st.process_groups())


def drive(section: dict, dist) -> dict:
    """One run: the server serves until the end, the workers train minibatch after minibatch."""
    from asr_parallel.strategies import build_strategy
    from asr_parallel.train.step import StepContext

    section = dict(section)
    slow = section.pop("slow_worker", None)
    epochs = section.pop("epochs", 1)
    device = torch.device(section.pop("device", "cpu"))  # cuda: tests/test_gpu.py
    dist = dataclasses.replace(dist, device=device)
    cfg = config(section)
    seq0 = _sequence_numbers_default()
    model = build(cfg).to(device)
    st = build_strategy(cfg.strategy, dist)
    part = st.wrap_model(model)
    tc = cfg.train
    opt = torch.optim.SGD(part.parameters(), lr=tc.lr, momentum=0.0)
    ctx = StepContext(tc, device, opt)
    st.schedule_steps(BATCHES, epochs, 0)
    events = []
    if st.is_server:
        while True:
            events.append(st.serve(ctx))
            if events[-1] == "stop":
                break
    else:
        i = 0
        while True:
            if st.worker_finished(i // BATCHES, epochs):  # run_length worker_epochs: its one pass is done
                control = st.wait_for_control()
                events += [control] if control is not None else []
                if control == "stop":
                    break
                continue
            i += 1
            out = st.train_step(batch(i, st.worker_index, uneven=True), ctx)
            if st.worker_index == slow:
                time.sleep(0.3)
            if out["control"] is not None:
                events.append(out["control"])
            if out["control"] == "stop":
                break
    evaluated = st.eval_model(part)
    return {"eval": flat(evaluated).cpu() if evaluated is not None else None, "events": events,
            "summary": st.summary_figures(), "comm": st.comm.state_dict(), "predicted": st.predicted_comm(),
            "calls": (st.comm.calls, _sequence_numbers(st) - seq0)}


def _sequence_numbers_default() -> int:
    from asr_parallel.strategies.base import process_group_calls

    return process_group_calls([None])


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return gloo_ranks(3, drive, SCENARIOS, tmp_path_factory.mktemp("async"))


def simulated(**kw):
    from asr_parallel.strategies import delay_sim

    cfg = config({"name": "single"})
    w0 = flat(build(cfg))
    updates = kw.pop("updates", WORKERS * BATCHES)
    return delay_sim.downpour(w0, grad_fn(cfg), WORKERS, delay_sim.round_robin(WORKERS, updates), LR, **kw)


def test_round_robin_async_ps_equals_the_simulator(three_ranks):
    w, stale = simulated()
    server = three_ranks[0]["asgd"]
    assert torch.allclose(server["eval"], w, atol=1e-6), (server["eval"] - w).abs().max()
    s = server["summary"]
    assert s["updates"] == WORKERS * BATCHES and s["staleness_max"] == max(stale) == 1
    assert s["staleness_histogram"][:2] == [stale.count(0), stale.count(1)]
    assert s["staleness_mean"] == pytest.approx(sum(stale) / len(stale))
    # every rank saw the end of the one "epoch" of updates, then the stop
    assert [r["asgd"]["events"] for r in three_ranks] == [["epoch", "stop"]] * 3


def test_a_seeded_random_order_equals_the_simulator(three_ranks):
    """schedule seeded: the server takes the workers in the order random.Random(2) draws (worker 0
    five times, worker 1 three); the staleness of the updates is then 0, 1, 2 or 3, not the round
    robin's constant 1, and ASGD and DC-ASGD equal the simulator fed the same order."""
    from asr_parallel.strategies import delay_sim

    order = delay_sim.seeded_order(WORKERS, WORKERS * BATCHES, 2)
    cfg = config({"name": "single"})
    w0, grad = flat(build(cfg)), grad_fn(cfg)
    for name, kw in (("seeded", {}), ("dc_seeded", {"dc_lambda": 2.0})):
        w, stale = delay_sim.downpour(w0, grad, WORKERS, order, LR, **kw)
        got = three_ranks[0][name]
        assert torch.allclose(got["eval"], w, atol=1e-6), (name, (got["eval"] - w).abs().max())
        assert got["summary"]["staleness_histogram"][:5] == [stale.count(i) for i in range(5)]
    assert sorted(set(stale)) == [0, 1, 2, 3] and order.count(0) == 5


def test_dc_asgd_equals_the_simulator(three_ranks):
    w, _ = simulated()
    assert torch.allclose(three_ranks[0]["dc0"]["eval"], w, atol=1e-6)  # lambda 0: ASGD
    wd, _ = simulated(dc_lambda=2.0)
    got = three_ranks[0]["dc"]["eval"]
    assert torch.allclose(got, wd, atol=1e-6) and not torch.allclose(got, w, atol=1e-4)
    wa, _ = simulated(dc_lambda=0.1, adaptive=True)
    assert torch.allclose(three_ranks[0]["dca"]["eval"], wa, atol=1e-5)


def test_a_push_deferred_by_a_pause_equals_the_simulator(three_ranks):
    """Two epochs in round robin: the first epoch ends at update 8; worker 0's next push (index 8)
    arrives while the pause is called, is applied after it, and the reply to it carried the parameters
    before it. ASGD and DC-ASGD equal the simulator that models this; DC-ASGD only if the deferred
    push is compensated against the copy it was computed at (not the one its reply carried)."""
    for name, kw in (("asgd_epochs", {}), ("dc_epochs", {"dc_lambda": 2.0})):
        w, stale = simulated(updates=2 * WORKERS * BATCHES, late_fetch={WORKERS * BATCHES}, **kw)
        got = three_ranks[0][name]
        assert torch.allclose(got["eval"], w, atol=1e-6), (name, (got["eval"] - w).abs().max())
        assert got["summary"]["staleness_histogram"][:3] == [stale.count(0), stale.count(1), stale.count(2)]
        assert [r[name]["events"] for r in three_ranks] == [["epoch", "epoch", "stop"]] * 3
    # the late fetch matters: a simulator without it (the worker fetching after its own push) is not this
    # run. (And the deferred push's own copy matters: with push_basis returning nothing, which compensates
    # it against the pause's parameters, i.e. not at all, this test fails; checked when it was written.)
    wrong, _ = simulated(updates=2 * WORKERS * BATCHES, dc_lambda=2.0)
    assert not torch.allclose(three_ranks[0]["dc_epochs"]["eval"], wrong, atol=1e-6)


def test_two_servers_with_one_worker_are_sgd(three_ranks):
    """Servers 1 and 2 hold half the parameters each; the one worker pushes to both and fetches from
    both: plain SGD on its minibatches, every update of staleness 0. DC-ASGD with one worker is the
    same (w - w_bak[k] = 0 at every push: nothing to compensate)."""
    from asr_parallel.strategies import delay_sim

    cfg = config({"name": "single"})
    grad = grad_fn(cfg)
    w, stale = delay_sim.downpour(flat(build(cfg)), grad, 1, [0] * BATCHES, LR)
    sgd = flat(build(cfg))
    for i in range(BATCHES):
        sgd = sgd - LR * grad(0, i, sgd)
    assert stale == [0] * BATCHES and torch.allclose(w, sgd, atol=1e-7)
    for name in ("sgd_two_servers", "dc_two_servers"):
        runs = [three_ranks[r][name] for r in range(3)]
        assert torch.allclose(runs[0]["eval"], sgd, atol=1e-6), (name, (runs[0]["eval"] - sgd).abs().max())
        for server in runs[:2]:
            s = server["summary"]
            assert s["updates"] == BATCHES and s["staleness_max"] == 0
    dc = [three_ranks[r]["dc_two_servers"]["summary"] for r in range(2)]
    assert [s["dc_corrected_pushes"] for s in dc] == [BATCHES, BATCHES] and all(s["dc_correction_ratio_max"] == 0 for s in dc)


def test_dc_asgd_reports_the_size_of_its_correction(three_ranks):
    """||c|| / ||g|| of every push, as the simulator's: the figure that tells whether lambda's
    compensation changes the applied gradients at all (with AdamW its scale is not the paper's)."""
    for name, kw in (("dc", {"dc_lambda": 2.0}), ("dca", {"dc_lambda": 0.1, "adaptive": True})):
        ratios: list[float] = []
        simulated(ratios=ratios, **kw)
        s = three_ranks[0][name]["summary"]
        assert s["dc_corrected_pushes"] == len(ratios) == WORKERS * BATCHES
        assert s["dc_correction_ratio_mean"] == pytest.approx(sum(ratios) / len(ratios), rel=1e-3)
        assert s["dc_correction_ratio_max"] == pytest.approx(max(ratios), rel=1e-3) and max(ratios) > 0
    assert three_ranks[0]["dc0"]["summary"]["dc_corrected_pushes"] == 0  # lambda 0 is ASGD: nothing corrected


def test_synchronous_rounds_without_backups_equal_synchronous_sgd(three_ranks):
    """b = 0: every round averages both workers' gradients, weighted by their utterances (the
    minibatches hold 2 and 3 utterances), as synchronous SGD on the union minibatch."""
    from asr_parallel.strategies import delay_sim

    cfg = config({"name": "single"})
    w0 = flat(build(cfg))
    utts = lambda k, i: len(batch(i + 1, k, uneven=True).tokens)  # noqa: E731
    w, used = delay_sim.backup_rounds(w0, grad_fn(cfg), WORKERS, [[0, 1]] * BATCHES, LR, 0, weights=utts)
    assert torch.allclose(three_ranks[0]["sync"]["eval"], w, atol=1e-6)
    assert three_ranks[0]["sync"]["summary"]["staleness_max"] == 0


def test_backup_worker_drops_the_stragglers_gradients(three_ranks):
    """K = 2 workers, b = 1: each of the 4 rounds applies the first gradient to arrive; the
    straggler's, computed at the round before, are dropped."""
    s = three_ranks[0]["backup"]["summary"]
    assert s["updates"] == BATCHES and s["staleness_histogram"][0] == BATCHES  # one gradient per round
    assert s["dropped"] >= 1 and sum(s["staleness_histogram"]) == BATCHES
    assert s["pushes_per_worker"][0] > s["pushes_per_worker"][1]  # the fast worker was heard more often


def test_worker_epochs_give_every_worker_its_own_share(three_ranks):
    """run_length worker_epochs: each worker makes exactly its own epoch of pushes, the straggler's
    too, and the fast one waits (asking for news) until the epoch's end and the stop; with the
    default run length (updates) a fast worker makes more than its share (the arrival scenario's
    total is the same)."""
    s = three_ranks[0]["worker_epochs"]["summary"]
    assert s["pushes_per_worker"] == [BATCHES, BATCHES] and s["updates"] == WORKERS * BATCHES
    assert sum(s["staleness_histogram"]) == WORKERS * BATCHES
    for rank in (1, 2):
        assert three_ranks[rank]["worker_epochs"]["events"] == ["epoch", "stop"]
    fast = three_ranks[1]["worker_epochs"]["comm"]["by_label"]["push"][1]  # header sends include its polls
    slow = three_ranks[2]["worker_epochs"]["comm"]["by_label"]["push"][1]
    assert fast > slow


def test_momentum_correction_lowers_the_explicit_momentum():
    """Mitliagkas et al.: K asynchronous workers add about 1 - 1/K of momentum; the server's optimiser
    gets its momentum lowered by that (Adam's beta1, SGD's momentum), not below 0."""
    from asr_parallel.strategies import build_strategy
    from asr_parallel.strategies.base import DistContext

    for world, beta1 in ((3, 0.9 - 0.5), (5, 0.9 - 0.75)):
        st = build_strategy({"name": "async_ps", "momentum_correction": True}, DistContext(rank=0, world_size=world))
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], betas=(0.9, 0.98))
        st.setup_optimizer(opt)
        assert opt.param_groups[0]["betas"] == pytest.approx((beta1, 0.98))
    st = build_strategy({"name": "async_ps", "momentum_correction": True}, DistContext(rank=0, world_size=11))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.5)
    st.setup_optimizer(opt)
    assert opt.param_groups[0]["momentum"] == 0.0  # 0.5 - 0.9, clipped at 0
    worker = build_strategy({"name": "async_ps", "momentum_correction": True}, DistContext(rank=1, world_size=3))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.5)
    worker.setup_optimizer(opt)
    assert opt.param_groups[0]["momentum"] == 0.5  # workers apply no update: unchanged


def test_arrival_order_trains_and_records_staleness(three_ranks):
    s = three_ranks[0]["arrival"]["summary"]
    assert s["updates"] == WORKERS * BATCHES and sum(s["staleness_histogram"]) == WORKERS * BATCHES
    assert sum(s["pushes_per_worker"]) >= WORKERS * BATCHES


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_send_and_receive_counted_and_predicted(three_ranks, name):
    for rank, res in enumerate(three_ranks):
        counted, sequence = res[name]["calls"]
        assert counted == sequence, (rank, counted, sequence)
        comm, predicted = res[name]["comm"], res[name]["predicted"]
        assert comm["by_label"] == predicted["by_label"], (rank, comm["by_label"], predicted["by_label"])


@pytest.mark.parametrize("name", ["asgd", "dc", "asgd_epochs", "dc_epochs", "sgd_two_servers", "dc_two_servers", "sync",
                                  "seeded"])
def test_the_cost_model_predicts_the_servers_traffic_from_the_config(three_ranks, name):
    """cost.predict_server_traffic, from the config and the model's size alone, against what gloo's
    sends counted (all workers together, all servers together): exact in the deterministic orders and
    in synchronous rounds without backups. (In arrival order this harness's workers do not wait at a
    pause as the trainer's do, so a fast one may push again before the pause reaches the other: not
    a case of the model's.)"""
    from asr_parallel.strategies import parse_strategy
    from asr_parallel.strategies.cost import ModelSize, predict_server_traffic

    section = {k: v for k, v in SCENARIOS[name].items() if k not in ("slow_worker", "epochs")}
    servers = parse_strategy(section).servers
    workers = 3 - servers
    updates = three_ranks[0][name]["summary"]["updates"]
    pauses = SCENARIOS[name].get("epochs", 1) + 1  # every epoch's end, and the stop
    model = predict_server_traffic(section, ModelSize.of(build(config(section))), workers, updates, pauses)
    counted = {"servers": sum(three_ranks[r][name]["comm"]["by_label"]["pull"][0] for r in range(servers)),
               "workers": sum(three_ranks[r][name]["comm"]["by_label"]["push"][0] for r in range(servers, 3))}
    assert counted == {"servers": model["servers"][0], "workers": model["workers"][0]}, (counted, model)


# ---------------------------------------------------------------- failures


def _fault_rank(rank, store, section: dict):
    """One of 3 gloo ranks of a fault test (one thread): the strategy of ``section``, its wrapped
    model and a plain-SGD step context."""
    import torch.distributed as tdist

    from asr_parallel.strategies import build_strategy
    from asr_parallel.strategies.base import DistContext
    from asr_parallel.train.step import StepContext

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=3)
    cfg = config(section)
    st = build_strategy(cfg.strategy, DistContext(rank=rank, world_size=3, initialized=True))
    part = st.wrap_model(build(cfg))
    return st, part, StepContext(cfg.train, torch.device("cpu"), torch.optim.SGD(part.parameters(), lr=LR))


def _failing_rank(rank, store, out, mode):
    """Server 0, workers 1 and 2. ``worker_dies``: rank 2 exits after its first push; ``server_dies``:
    the server exits after 3 updates; ``worker_hangs``: rank 2 stops sending but stays alive;
    ``server_hangs``: the server stops serving after 3 updates but stays alive."""
    import os

    # 6 s: the surviving worker pushes every few milliseconds, so the dead or hung one is the one
    # silent longest unless the survivor itself stalls for the whole timeout (with 3 s that happened
    # once, on a loaded 2-core machine)
    st, _, ctx = _fault_rank(rank, store, {"name": "async_ps", "timeout": 6.0})
    st.schedule_steps(1000, 1, 0)
    t0 = time.time()
    message = "no error"
    try:
        if st.is_server:
            def stop():
                if st.version >= 3:
                    if mode == "server_hangs":  # alive, its connections open, silent past the timeout
                        time.sleep(15)
                    os._exit(3)

            if mode.startswith("server"):
                while st.version < 3:
                    st.serve(ctx, on_update=stop)
            st.serve(ctx)
        else:
            for i in range(1, 1000):
                if rank == 2 and i == 2 and not mode.startswith("server"):
                    if mode == "worker_dies":
                        os._exit(3)
                    time.sleep(20)
                    os._exit(0)
                st.train_step(batch(i, st.worker_index), ctx)
    except Exception as e:  # noqa: BLE001 -- the message is the test's subject
        message = f"{type(e).__name__}: {e}"
    with open(f"{out}-{rank}", "w") as f:
        f.write(f"{time.time() - t0:.1f}\n{message}")
    os._exit(0)


@pytest.mark.parametrize("mode", ["worker_dies", "worker_hangs", "server_dies", "server_hangs"])
def test_a_dead_or_hung_rank_stops_the_others_with_an_error_naming_it(tmp_path, mode):
    out = tmp_path / "message"
    spawn_and_reap(_failing_rank, (str(tmp_path / "store"), str(out), mode), 3)
    if mode.startswith("server"):
        for rank in (1, 2):  # every worker: no reply from the server within the timeout
            elapsed, message = (tmp_path / f"message-{rank}").read_text().split("\n", 1)
            assert "async_ps worker" in message and "from server (rank 0) within 6 s" in message, message
            assert float(elapsed) < 40
    else:  # the server names the silent worker while the other keeps pushing
        elapsed, message = (tmp_path / "message-0").read_text().split("\n", 1)
        assert "worker 1 (rank 2) has sent nothing" in message and "timeout 6 s" in message, message
        assert float(elapsed) < 40


# ---------------------------------------------------------------- AD-PSGD on 2 ranks

GOSSIP = {
    "sync": {"section": {"name": "ad_psgd", "gossip": "sync"}, "lr": LR, "seed_by_rank": False},
    "async": {"section": {"name": "ad_psgd"}, "lr": LR, "seed_by_rank": False},
    # no updates, different initial models: every exchange is a pairwise average, so both ranks end
    # with the mean of the two initial models, exactly (the sum is kept)
    "async_average": {"section": {"name": "ad_psgd"}, "lr": 0.0, "seed_by_rank": True},
}
GOSSIP_STEPS = 4


def drive_gossip(spec: dict, dist) -> dict:
    from asr_parallel.strategies import build_strategy
    from asr_parallel.train.step import StepContext

    cfg = config(spec["section"])
    seq0 = _sequence_numbers_default()
    model = build(cfg, seed=dist.rank if spec["seed_by_rank"] else 0)
    initial = flat(model)
    applied = torch.zeros_like(initial)  # the sum of this rank's own optimiser updates

    class Recorded(torch.optim.SGD):
        def step(self, closure=None):
            before = flat(model)
            super().step(closure)
            applied.add_(flat(model) - before)

    st = build_strategy(cfg.strategy, dist)
    part = st.wrap_model(model)
    ctx = StepContext(cfg.train, torch.device("cpu"), Recorded(part.parameters(), lr=spec["lr"]))
    for i in range(1, GOSSIP_STEPS + 1):
        st.train_step(batch(i, dist.rank), ctx)
    st.finish(ctx)
    evaluated = st.eval_model(part)
    return {"final": flat(model), "initial": initial, "eval": flat(evaluated), "summary": st.summary_figures(),
            "calls": (st.comm.calls, _sequence_numbers(st) - seq0), "applied": applied}


@pytest.fixture(scope="module")
def gossip_ranks(tmp_path_factory):
    return gloo_ranks(2, drive_gossip, GOSSIP, tmp_path_factory.mktemp("gossip"))


def test_synchronous_gossip_equals_the_simulator(gossip_ranks):
    from asr_parallel.strategies import delay_sim

    cfg = config({"name": "single"})
    xs = delay_sim.gossip(flat(build(cfg)), grad_fn(cfg, uneven=False), 2, GOSSIP_STEPS, LR)
    for rank in range(2):
        assert torch.allclose(gossip_ranks[rank]["sync"]["final"], xs[rank], atol=1e-6)
        # evaluated: the average of the ranks' models
        assert torch.allclose(gossip_ranks[rank]["sync"]["eval"], (xs[0] + xs[1]) / 2, atol=1e-6)


def test_synchronous_gossip_on_four_ranks_rotates_its_partners():
    """K = 4: step t pairs r with r XOR 2^(t mod 2), so the partner alternates (rank 0: 1, 2, 1, 2);
    every rank's model equals the simulator's, which a wrong rotation would not give."""
    import tempfile
    from pathlib import Path

    from asr_parallel.strategies import delay_sim

    with tempfile.TemporaryDirectory() as d:
        ranks = gloo_ranks(4, drive_gossip, {"sync": GOSSIP["sync"]}, Path(d))
    cfg = config({"name": "single"})
    xs = delay_sim.gossip(flat(build(cfg)), grad_fn(cfg, uneven=False), 4, GOSSIP_STEPS, LR)
    for rank in range(4):
        assert torch.allclose(ranks[rank]["sync"]["final"], xs[rank], atol=1e-6), rank
        assert torch.allclose(ranks[rank]["sync"]["eval"], sum(xs) / 4, atol=1e-6)
    # (the simulator's pairs matter: with the partner fixed at r XOR 1 the models would differ)
    fixed = [flat(build(cfg)) for _ in range(4)]
    grad = grad_fn(cfg, uneven=False)
    for t in range(GOSSIP_STEPS):
        g = [grad(k, t, fixed[k].clone()) for k in range(4)]
        fixed = [(fixed[k] + fixed[k ^ 1]) / 2 - LR * g[k] for k in range(4)]
    assert not torch.allclose(fixed[0], xs[0], atol=1e-6)


def test_asynchronous_gossip_averages_pairwise_and_atomically(gossip_ranks):
    a, b = gossip_ranks[0]["async_average"], gossip_ranks[1]["async_average"]
    mean = (a["initial"] + b["initial"]) / 2
    assert not torch.allclose(a["initial"], b["initial"])
    assert torch.allclose(a["final"], mean, atol=1e-6) and torch.allclose(b["final"], mean, atol=1e-6)
    # the active rank 0 averaged once per step; the passive rank 1 answered each request
    assert a["summary"]["exchanges"] == GOSSIP_STEPS and b["summary"]["served"] == GOSSIP_STEPS
    trained = [gossip_ranks[r]["async"]["final"] for r in range(2)]
    assert all(torch.isfinite(t).all() for t in trained) and not torch.allclose(trained[0], gossip_ranks[0]["async"]["initial"])


def test_three_ranks_average_atomically_while_they_train(tmp_path):
    """K = 3 (actives 0 and 2 both average with passive rank 1, whose thread answers them while its
    main thread trains): pairwise averages keep the sum of the models, so the sum at the end is the
    sum of the initial models plus every update the ranks applied. An average that raced an update
    (read before it, written after) would lose that update and break the balance."""
    scenario = {"conserve": {"section": {"name": "ad_psgd"}, "lr": 0.05, "seed_by_rank": True}}
    ranks = [r["conserve"] for r in gloo_ranks(3, drive_gossip, scenario, tmp_path)]
    initial = sum(r["initial"] for r in ranks)
    applied = sum(r["applied"] for r in ranks)
    final = sum(r["final"] for r in ranks)
    assert applied.abs().max() > 1e-3  # the ranks trained, and their updates are in the balance
    assert not torch.allclose(ranks[0]["initial"], ranks[1]["initial"])
    assert torch.allclose(final, initial + applied, atol=1e-5), (final - initial - applied).abs().max()
    assert not torch.allclose(ranks[0]["final"], ranks[0]["initial"] + ranks[0]["applied"], atol=1e-4)  # averaged
    assert [ranks[a]["summary"]["exchanges"] for a in (0, 2)] == [GOSSIP_STEPS] * 2
    assert ranks[1]["summary"]["served"] == 2 * GOSSIP_STEPS


def _gossip_hang(rank, store, out):
    """AD-PSGD on 3 ranks: actives 0 and 2, passive 1. Rank 2 hangs after its first step (alive,
    silent) while rank 0 keeps averaging with rank 1."""
    import os

    st, _, ctx = _fault_rank(rank, store, {"name": "ad_psgd", "timeout": 8.0})
    t0 = time.time()
    message = "no error"
    try:
        for i in range(1, 10_000):
            if rank == 2 and i == 2:  # hung: alive and silent until rank 1 has written its message
                while not os.path.exists(f"{out}-1") and time.time() - t0 < 50:
                    time.sleep(0.2)
                os._exit(0)
            st.train_step(batch(i % 4 + 1, rank), ctx)
            if time.time() - t0 > 60:
                break
    except Exception as e:  # noqa: BLE001 -- the message is the test's subject
        message = f"{type(e).__name__}: {e}"
    with open(f"{out}-{rank}", "w") as f:
        f.write(f"{time.time() - t0:.1f}\n{message}")
    os._exit(0)


def test_a_hung_active_rank_is_named_while_another_still_sends(tmp_path):
    """K = 3: the passive rank hears rank 0 all the time, so no receive of its times out; it still
    names rank 2, silent past the timeout, instead of waiting for the epoch's end."""
    out = tmp_path / "message"
    spawn_and_reap(_gossip_hang, (str(tmp_path / "store"), str(out)), 3)
    elapsed, message = (tmp_path / "message-1").read_text().split("\n", 1)
    assert "ad_psgd rank 1 (passive): rank 2 sent nothing" in message and "while rank 0 still sends" in message, message
    assert float(elapsed) < 40


@pytest.mark.parametrize("name", list(GOSSIP))
def test_gossip_calls_are_counted(gossip_ranks, name):
    for rank in range(2):
        counted, sequence = gossip_ranks[rank][name]["calls"]
        assert counted == sequence, (rank, counted, sequence)


# ---------------------------------------------------------------- Hogwild on 2 ranks

HOGWILD_STEPS = 3


def drive_hogwild(spec: dict, dist) -> dict:
    """Hogwild through the trainer's step, the ranks' steps taken in turn (a barrier of the test's own
    between turns), so the shared vector sees rank 0's update, then rank 1's, step after step."""
    import torch.distributed as tdist

    from asr_parallel.train.trainer import Trainer

    cfg = config({"name": "hogwild"})
    trainer = Trainer.for_benchmark(cfg, dist, build(cfg, seed=dist.rank))  # rank 0's model is shared
    calls_after_setup = trainer.strategy.comm.calls
    tdist.barrier()  # (the test's own) rank 0 has removed the file's name after the set-up
    named = trainer.strategy.path.exists()
    for s in range(1, HOGWILD_STEPS + 1):
        for r in range(dist.world_size):
            if dist.rank == r:
                trainer.train_step(batch(s, r))
            tdist.barrier()
    calls_in_steps = trainer.strategy.comm.calls - calls_after_setup
    setup = list(trainer.strategy.comm.by_label.get("hogwild"))
    trainer.strategy.finish(trainer.ctx)  # a barrier, and rank 0 removes the shared file
    return {"final": flat(trainer.model), "calls_in_steps": calls_in_steps, "setup": setup, "named": named,
            "file": trainer.strategy.path.name}


@pytest.fixture(scope="module")
def hogwild_ranks(tmp_path_factory):
    return gloo_ranks(2, drive_hogwild, {"serial": {}}, tmp_path_factory.mktemp("hogwild"))


def test_hogwild_shares_one_vector_and_serial_turns_equal_sgd(hogwild_ranks):
    cfg = config({"name": "single"})
    grad = grad_fn(cfg, uneven=False)
    w = flat(build(cfg, seed=0))
    for s in range(HOGWILD_STEPS):
        for r in range(2):
            w = w - LR * grad(r, s, w)
    a, b = hogwild_ranks[0]["serial"], hogwild_ranks[1]["serial"]
    assert torch.equal(a["final"], b["final"])  # one shared vector
    assert torch.allclose(a["final"], w, atol=1e-6)
    # no call at all in the steps; two at the set-up: the file's random name from rank 0 (8 bytes, once
    # the file holds rank 0's model) and a barrier once every rank has mapped it; then the name is gone
    assert a["calls_in_steps"] == 0 and b["calls_in_steps"] == 0
    assert a["setup"] == [8, 2] and b["setup"] == [0, 2] and a["file"] == b["file"]
    assert not a["named"] and not b["named"]


def test_hogwild_refuses_gpus_and_several_nodes(monkeypatch):
    from asr_parallel.strategies import build_strategy
    from asr_parallel.strategies.base import DistContext

    with pytest.raises(ValueError, match="set train.device cpu"):
        build_strategy({"name": "hogwild"}, DistContext(rank=0, world_size=2, device=torch.device("cuda", 0)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="every rank on one machine"):
        build_strategy({"name": "hogwild"}, DistContext(rank=0, world_size=2))


def test_async_ps_refuses_batch_norm_statistics():
    """Workers push gradients only: running statistics would never reach the master model that is
    evaluated."""
    from asr_parallel.strategies import build_strategy
    from asr_parallel.strategies.base import DistContext
    from strategy_harness import CONFORMER_BN

    for name in ("async_ps", "dc_asgd"):
        for rank in (0, 1):  # a server and a worker
            st = build_strategy({"name": name}, DistContext(rank=rank, world_size=2))
            with pytest.raises(ValueError, match=r"running statistics \(.*conv_module.*conv_norm: layer"):
                st.wrap_model(build(config({"name": name}, CONFORMER_BN)))


def test_async_ps_refuses_contradictory_settings():
    """Settings that cannot work together stop with an error naming them."""
    from asr_parallel.strategies import parse_strategy

    for strategy, message in (
            ({"backup_workers": 0, "schedule": "round_robin"}, "use schedule arrival"),
            ({"backup_workers": 0, "push_every": 2}, "needs push_every 1"),
            ({"backup_workers": -2}, "must be -1"),
            ({"servers": 0}, "servers must be >= 1"),
            ({"run_length": "worker_epochs", "backup_workers": 0}, "use updates"),
            ({"run_length": "worker_epochs", "schedule": "round_robin"}, "hold up the round_robin schedule"),
            ({"schedule": "seeded", "servers": 2}, "seeded needs one server"),
            ({"poll_seconds": 0}, "poll_seconds must be > 0")):
        with pytest.raises(ValueError, match=message):
            parse_strategy({"name": "async_ps", **strategy})
