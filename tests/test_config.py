from pathlib import Path

import pytest

from asr_parallel.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_default_recipe_loads_and_every_recipe_validates():
    from asr_parallel.bin.compare import check_pairs

    for path in sorted((REPO / "recipes").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.features.num_mel_bins == 80
        check_pairs(cfg, path)  # stage 8's pairs name runs of the recipe (a base's pairs are inherited)
    large = load_config(REPO / "recipes/chime6_sim_large.yaml")
    # The larger preset inherits from the default and overrides sizes.
    assert large.corpus.simulation.train_minutes_per_session > load_config(
        REPO / "recipes/chime6_sim.yaml").corpus.simulation.train_minutes_per_session
    assert large.features.worn_channel == 0


def test_unknown_key_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus:\n  simulation:\n    minutes_per_sesion: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "corpus.simulation.minutes_per_sesion" in msg and str(bad) in msg
    assert "train_minutes_per_session" in msg  # lists the valid keys


def test_wrong_type_names_key_file_and_type(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("features:\n  num_mel_bins: eighty\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "features.num_mel_bins" in str(e.value) and "expects int" in str(e.value) and str(bad) in str(e.value)
    bad.write_text("corpus:\n  simulation:\n    engines: espeak-ng\n")
    with pytest.raises(ConfigError, match="corpus.simulation.engines.*list of str"):
        load_config(bad)
    bad.write_text("features:\n  num_jobs: true\n")
    with pytest.raises(ConfigError, match="features.num_jobs"):
        load_config(bad)


def test_invalid_values_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="num_arrays"):
        load_config(REPO / "recipes/chime6_sim.yaml", ["corpus.simulation.num_arrays=9"])
    with pytest.raises(ConfigError, match="tokenizer.model_type"):
        load_config(REPO / "recipes/chime6_sim.yaml", ["tokenizer.model_type=wordpiece"])
    with pytest.raises(ConfigError, match="unknown key 'tokenizer.vocab'"):
        load_config(REPO / "recipes/chime6_sim.yaml", ["tokenizer.vocab=3"])
    cfg = load_config(REPO / "recipes/chime6_sim.yaml", ["corpus.simulation.seed=7", "corpus.simulation.rt60_range=[0.3, 0.4]"])
    assert cfg.corpus.simulation.seed == 7 and cfg.corpus.simulation.rt60_range == [0.3, 0.4]
    # A float key accepts an int; the fingerprint follows the content.
    a = load_config(REPO / "recipes/chime6_sim.yaml", ["corpus.simulation.eval_minutes_per_session=3"])
    b = load_config(REPO / "recipes/chime6_sim.yaml", ["corpus.simulation.eval_minutes_per_session=3.0"])
    assert a.fingerprint() == b.fingerprint() != cfg.fingerprint()


def test_base_chain_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "c.yaml").write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "c.yaml")


def test_uneven_placement_is_checked():
    """A placement that does not add up to the ranks, or one without emulated nodes, is refused by
    name; hierarchical SGD on unequal nodes needs its group size."""
    from asr_parallel.config import ConfigError, load_config

    base = ["train.world_size=3", "train.emulate_nodes=2"]
    load_config(REPO / "recipes/chime6_sim.yaml", base + ["train.ranks_per_node=[2, 1]"])
    for bad, words in ((["train.ranks_per_node=[2, 2]"], "adding up to train.world_size (3)"),
                       (["train.ranks_per_node=[3]"], "one count per emulated node (2)"),
                       (["train.ranks_per_node=[3, 0]"], "whole numbers of ranks >= 1"),
                       (["train.ranks_per_node=[2, 1]", "strategy.name=hierarchical"], "strategy.group_size")):
        with pytest.raises(ConfigError, match="ranks_per_node") as e:
            load_config(REPO / "recipes/chime6_sim.yaml", base + bad)
        assert words in str(e.value)
    with pytest.raises(ConfigError, match="emulated nodes only"):
        load_config(REPO / "recipes/chime6_sim.yaml", ["train.world_size=3", "train.ranks_per_node=[2, 1]"])


def test_the_package_sets_onednns_primitive_cache_unless_the_environment_does():
    """Importing asr_parallel raises oneDNN's primitive cache to 16384 (the default 1024 overflows
    with the batches' shapes, RESULTS.md); a value already in the environment is kept."""
    import os
    import subprocess
    import sys

    code = "import asr_parallel, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "16384"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}, cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "64"
