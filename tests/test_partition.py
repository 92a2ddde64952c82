import pytest
import torch

from pilora import MethodConfig, partition
from pilora.importance import ImportanceStats, ModuleStats
from pilora.partition import PARTITIONS, dominant_fractions


def _stats(hits, score_sum, checks):
    s = ModuleStats.empty(len(hits), 4)
    s.hits = torch.tensor(hits, dtype=torch.int64)
    s.score_sum = torch.tensor(score_sum, dtype=torch.float64)
    s.checks = checks
    return ImportanceStats({"layer": s})


STATS = _stats([4, 0, 2, 3, 1, 2], [9.0, 1.0, 5.0, 8.0, 2.0, 6.0], 4)


# H = [4, 0, 2, 3, 1, 2] over T = 4 checks, ΣS = [9, 1, 5, 8, 2, 6] (six rows)
@pytest.mark.parametrize(
    "strategy,params,expected_rows",
    [
        ("hit_frequency", {"tau": 0.5}, 4),  # H ≥ 2: rows 0, 2, 3, 5
        ("hit_frequency", {"tau": 1.0}, 1),  # H = 4: row 0
        ("cumulative", {"threshold": 0.7}, 3),  # 4 + 3 + 2 = 9 ≥ 0.7·12 (4 + 3 = 7 is not)
        ("top_fraction", {"fraction": 0.5}, 3),  # round(0.5·6)
        ("random", {"fraction": 0.3, "seed": 1}, 2),  # round(0.3·6)
    ],
)
def test_each_strategy_selects_its_documented_number_of_rows(strategy, params, expected_rows):
    mask = partition(STATS, strategy, **params)["layer"]
    assert mask.dtype == torch.bool and mask.shape == (6,)
    assert int(mask.sum()) == expected_rows
    assert dominant_fractions({"layer": mask})["overall"] == pytest.approx(expected_rows / 6)


def test_hit_frequency_rule():
    assert partition(STATS, "hit_frequency", tau=0.5)["layer"].tolist() == [1, 0, 1, 1, 0, 1]
    assert partition(STATS, "hit_frequency", tau=1.0)["layer"].tolist() == [1, 0, 0, 0, 0, 0]
    # every row important in every check: all dominant; equal scores everywhere: none dominant
    assert partition(_stats([3, 3, 3], [1, 1, 1], 3), "hit_frequency")["layer"].all()
    assert not partition(_stats([0, 0, 0], [1, 1, 1], 3), "hit_frequency")["layer"].any()
    with pytest.raises(ValueError, match="T = 0"):
        partition(_stats([0, 0], [0, 0], 0), "hit_frequency")


def test_cumulative_rule_with_ties():
    # ΣH = 12; order by H then ΣS: rows 0(4), 3(3), 5(2, ΣS 6) , 2(2, ΣS 5), 4(1), 1(0)
    assert partition(STATS, "cumulative", threshold=4 / 12)["layer"].nonzero().flatten().tolist() == [0]
    assert sorted(partition(STATS, "cumulative", threshold=0.6)["layer"].nonzero().flatten().tolist()) == [0, 3, 5]
    assert sorted(partition(STATS, "cumulative", threshold=9.5 / 12)["layer"].nonzero().flatten().tolist()) == [
        0,
        2,
        3,
        5,
    ]
    assert partition(STATS, "cumulative", threshold=1.0)["layer"].sum() == 5  # the 0-hit row adds nothing


def test_top_fraction_and_random():
    assert partition(STATS, "top_fraction", fraction=0.5)["layer"].nonzero().flatten().tolist() == [0, 3, 5]
    assert partition(STATS, "top_fraction", fraction=1.0)["layer"].all()
    a = partition(STATS, "random", fraction=0.5, seed=3)["layer"]
    assert a.sum() == 3 and torch.equal(a, partition(STATS, "random", fraction=0.5, seed=3)["layer"])
    masks = [partition(STATS, "random", fraction=0.5, seed=s)["layer"] for s in range(8)]
    assert len({tuple(m.tolist()) for m in masks}) > 1  # the seed matters


@pytest.mark.parametrize(
    "strategy,key",
    [("hit_frequency", "tau"), ("cumulative", "threshold"), ("top_fraction", "fraction"), ("random", "fraction")],
)
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_out_of_range_parameters_are_rejected(strategy, key, bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        partition(STATS, strategy, **{key: bad})


def test_unknown_strategy_lists_choices():
    with pytest.raises(ValueError, match="hit_frequency"):
        partition(STATS, "magic")
    assert set(PARTITIONS) == {"hit_frequency", "cumulative", "top_fraction", "random"}


def test_dominant_fractions():
    f = dominant_fractions({"a": torch.tensor([True, False]), "b": torch.tensor([True, True, True, False])})
    assert f["a"] == 0.5 and f["b"] == 0.75 and f["overall"] == pytest.approx(4 / 6)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(r=0), "positive"),
        (dict(supplementary_r=-1), "r'"),
        (dict(r=4, supplementary_r=5), "r'"),
        (dict(partition={"name": "hit_frequency", "args": {"tau": 1.2}}), r"\(0, 1\]"),
        (dict(partition="nope"), "choose one of"),
        (dict(name="lorax"), "choose one of"),
    ],
)
def test_method_config_rejects_bad_input(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        MethodConfig(**{"name": "pilora", **kwargs})


@pytest.mark.parametrize(
    "strategy,params,match",
    [
        ("hit_frequency", {"tua": 0.5}, r"'hit_frequency' takes no argument 'tua' \(did you mean 'tau'\?\).*\['tau'\]"),
        ("cumulative", {"tau": 0.5}, r"'cumulative' takes no argument 'tau'.*\['threshold'\]"),
        ("random", {"fraction": 0.5, "sed": 1}, r"'random' takes no argument 'sed' \(did you mean 'seed'\?\)"),
        ("top_fraction", {"name": "x"}, r"'top_fraction' takes no argument 'name'.*\['fraction'\]"),
    ],
)
def test_misspelled_strategy_argument_is_refused(strategy, params, match):
    """`partition(stats, "hit_frequency", tua=0.5)` used to split with the default τ; an argument the
    strategy's signature does not name is refused, with the names it takes."""
    with pytest.raises(ValueError, match=match):
        partition(STATS, strategy, **params)


def test_misspelled_partition_argument_fails_before_training():
    """`run.py method=pilora +method.partition.args.tua=0.5` used to train with the default τ: the
    method config refuses it, and run.py's check reports it as one message before any folder."""
    from helpers import compose_cfg

    import hydra_setup
    from pilora.runner.validate import check_config

    bad = ["method=pilora", "+method.partition.args.tua=0.5"]
    with pytest.raises(
        ValueError, match=r"'method\.partition\.args\.tua' \(did you mean 'method\.partition\.args\.tau'\?\)"
    ):
        check_config(compose_cfg(bad, ""))
    message = hydra_setup.check_job(bad)
    assert message is not None and "'hit_frequency' takes no argument" in message and "'tau'" in message
    # MethodConfig itself (the library's entry), and a correctly spelled argument still passes
    with pytest.raises(ValueError, match=r"takes no argument 'method\.partition\.args\.tua'"):
        MethodConfig(name="pilora", partition={"name": "hit_frequency", "args": {"tua": 0.5}})
    assert hydra_setup.check_job(["method=pilora", "method.partition.args.tau=0.7"]) is None


def test_fractions_round_half_up_whatever_the_row_count():
    """Half of 5 rows is 3 and half of 3 rows is 2 (Python's round gives 2 for both: the share
    flipped above and below the fraction with m's parity)."""
    for m, want in ((3, 2), (5, 3), (7, 4), (6, 3)):
        stats = _stats([0] * m, list(range(m)), 1)
        assert int(partition(stats, "top_fraction", fraction=0.5)["layer"].sum()) == want
        assert int(partition(stats, "random", fraction=0.5, seed=0)["layer"].sum()) == want


@pytest.mark.parametrize("scale", [1e-17, 1.0, 1e17])
def test_cumulative_ranks_by_hits_then_score_at_any_score_scale(scale):
    """ΣS only breaks ties of H, whatever its size: a huge ΣS never outranks a hit, a tiny one is
    not lost next to the hit count (a summed key H + ΣS/(max ΣS + 1) failed at both ends)."""
    ties = _stats([1, 1, 1, 1], [1 * scale, 2 * scale, 3 * scale, 4 * scale], 1)
    # equal H: the largest ΣS first; a quarter of ΣH is one row
    assert partition(ties, "cumulative", threshold=0.25)["layer"].tolist() == [False, False, False, True]
    ranked = _stats([2, 3], [1 * scale, 0.0], 3)
    # H decides: the row with 3 hits holds 60 % of ΣH, enough for a 0.5 threshold on its own
    assert partition(ranked, "cumulative", threshold=0.5)["layer"].tolist() == [False, True]
