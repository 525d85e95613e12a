"""benchmarks/paired_stats.py: the paired per-seed differences and their 95 % intervals (hand-checked numbers)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from paired_stats import paired_difference, t_quantile  # noqa: E402

# two-sided 95 % critical values of Student's t from a printed table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 29: 2.045, 100: 1.984}


@pytest.mark.parametrize("df", sorted(T_TABLE_975))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE_975[df], abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-T_TABLE_975[df], abs=6e-4)


def test_t_quantile_other_levels_and_errors():
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=6e-4)  # the 90 % two-sided value
    assert t_quantile(0.995, 4) == pytest.approx(4.604, abs=6e-4)  # the 99 % two-sided value
    assert t_quantile(0.5, 3) == 0.0
    with pytest.raises(ValueError, match="p must lie"):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError, match="df must"):
        t_quantile(0.9, 0)


def test_paired_interval_of_known_numbers_by_hand():
    # cmd - esvit per seed: +3.6, +2.5, +0.5, -3.6, +4.4 (the example: mean +1.5 [-2.5, +5.5])
    a = [53.6, 52.5, 50.5, 46.4, 54.4]
    b = [50.0] * 5
    d = paired_difference(a, b)
    # by hand: mean 7.4 / 5 = 1.48; squared deviations 2.12^2 + 1.02^2 + 0.98^2 + 5.08^2 + 2.92^2 = 40.828;
    # sd = sqrt(40.828 / 4) = 3.19484; half-width 2.776445 * 3.19484 / sqrt(5) = 3.96692
    assert d.differences == pytest.approx((3.6, 2.5, 0.5, -3.6, 4.4))
    assert d.n == 5 and d.mean == pytest.approx(1.48)
    assert d.sd == pytest.approx(3.194840, abs=1e-6)
    assert d.ci_low == pytest.approx(1.48 - 3.96692, abs=1e-4)
    assert d.ci_high == pytest.approx(1.48 + 3.96692, abs=1e-4)
    assert round(d.ci_low, 1) == -2.5 and round(d.ci_high, 1) == 5.4


def test_pairing_removes_the_shared_seed_effect():
    # a large per-seed offset shared by both contenders: the paired interval sees only the +1 shift
    base = [10.0, 40.0, 25.0, 70.0, 55.0]
    a = [x + 1.0 + e for x, e in zip(base, (0.1, -0.1, 0.0, 0.05, -0.05))]
    d = paired_difference(a, base)
    assert d.ci_low > 0.8 and d.ci_high < 1.2
    assert paired_difference(base, a).mean == pytest.approx(-d.mean)


def test_bootstrap_is_seeded_and_inside_the_range_of_the_differences():
    a, b = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    d1, d2 = paired_difference(a, b, seed=3), paired_difference(a, b, seed=3)
    assert (d1.boot_low, d1.boot_high) == (d2.boot_low, d2.boot_high)
    assert min(d1.differences) <= d1.boot_low <= d1.mean <= d1.boot_high <= max(d1.differences)
    assert math.isnan(paired_difference(a, b, bootstrap=0).boot_low)


def test_one_seed_and_bad_input():
    d = paired_difference([1.0], [0.5])
    assert d.mean == 0.5 and math.isnan(d.ci_low) and math.isnan(d.ci_high) and math.isnan(d.sd)
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="no values"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="level"):
        paired_difference([1.0, 2.0], [0.0, 0.0], level=1.5)
    assert paired_difference([1.0, 2.0], [0.0, 0.0]).as_dict()["differences"] == [1.0, 2.0]
    assert d.as_dict()["ci_low"] is None  # strict JSON: no NaN
