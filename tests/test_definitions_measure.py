"""The measures' formulas pinned on hand-made input: Kendall's tau, the flatness bisection,
the noise of the PAC-Bayes search and the bounds built from the radii.

Same rules as ``tests/test_definitions.py`` (expected values worked out by hand); these are the
tests ``make mutants`` runs for ``qatlab/measure`` (docs/results/mutation.md).
"""

from __future__ import annotations

import math

import pytest
import torch

from qatlab.errors import ConfigError
from qatlab.measure.flatness import (
    _SEED_BASE,
    _bisect,
    _generator,
    _normal,
    draw_noise,
    noise_std,
    pac_bayes_bounds,
)
from qatlab.measure.stats import (
    Paired,
    betainc,
    kendall_tau,
    paired_differences,
    t_cdf,
    t_quantile,
)


def _nan(v: float) -> bool:
    return v != v


# ----------------------------------------------------------------------------- Kendall's tau
def test_kendall_tau_b_by_hand():
    # one swapped pair of 6: C 5, D 1 -> 4 / 6
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert kendall_tau([4, 3, 2, 1], [1, 3, 2, 4]) == pytest.approx(-4 / 6)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1.0, 2.5], [0.1, 0.2]) == 1.0
    # ties: x = [1, 1, 2, 3], y = [1, 2, 3, 5]: pair (0, 1) tied in x only, 5 concordant:
    # tau_b = 5 / sqrt((5 + 0 + 1) (5 + 0 + 0))
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 5]) == pytest.approx(5 / math.sqrt(30))
    assert kendall_tau([1, 2, 3, 5], [1, 1, 2, 3]) == pytest.approx(5 / math.sqrt(30))
    # a tie in x and one in y, one discordant: x = [1, 1, 2, 3], y = [2, 3, 3, 1]
    # pairs: (0,1) tie x; (0,2) C; (0,3) D; (1,2) tie y; (1,3) D; (2,3) D -> C 1, D 3
    assert kendall_tau([1, 1, 2, 3], [2, 3, 3, 1]) == pytest.approx(-2 / math.sqrt(5 * 5))
    # a pair tied in both counts in neither: x = [1, 1, 2], y = [5, 5, 6] -> 2 / sqrt(2 * 2)
    assert kendall_tau([1, 1, 2], [5, 5, 6]) == 1.0
    assert kendall_tau([1, 1, 2, 2], [1, 1, 3, 3]) == 1.0  # 4 concordant, 2 pairs tied in both
    # a pair tied in both skips only itself: x = [1, 1, 0, 2], y = [1, 1, 5, 3]: (0,1) both,
    # (0,2) D, (0,3) C, (1,2) D, (1,3) C, (2,3) D -> (2 - 3) / 5
    assert kendall_tau([1, 1, 0, 2], [1, 1, 5, 3]) == pytest.approx(-0.2)
    # several ties: x = [1, 1, 1, 2], y = [1, 2, 3, 4]: 3 pairs tied in x, 3 concordant
    assert kendall_tau([1, 1, 1, 2], [1, 2, 3, 4]) == pytest.approx(3 / math.sqrt(6 * 3))
    assert kendall_tau([1, 2, 3, 4], [1, 1, 1, 2]) == pytest.approx(3 / math.sqrt(3 * 6))
    # undefined: fewer than 2 pairs, or a constant variable
    assert _nan(kendall_tau([1.0], [2.0])) and _nan(kendall_tau([], []))
    assert _nan(kendall_tau([1, 1, 1], [1, 2, 3])) and _nan(kendall_tau([1, 2, 3], [4, 4, 4]))
    with pytest.raises(ValueError):
        kendall_tau([1, 2], [1, 2, 3])


# ----------------------------------------------------------------------------- bisection
def test_bisect_by_hand():
    # drop(r) = r, target 0.3, tol 0.01 on [0, 2]: midpoints 1 (> .3: hi), .5 (hi), .25 (lo),
    # .375 (hi), .3125 (|.0125| >= tol: hi), .28125 (lo), .296875 (|-.003125| < tol: stop)
    seen = []
    radius, drop, evals = _bisect(
        lambda r: r, 0.3, 0.01, 15, 2.0, lambda k, total, info: seen.append((k, total, info)), "x"
    )
    assert (radius, drop, evals) == (0.296875, 0.296875, 7)
    mids = [1.0, 0.5, 0.25, 0.375, 0.3125, 0.28125, 0.296875]
    assert seen == [(k, 15, {"radius": r, "drop": r}) for k, r in enumerate(mids)]
    # out of steps: the last midpoint
    assert _bisect(lambda r: r, 0.3, 0.01, 3, 2.0, False, "x") == (0.25, 0.25, 3)
    # a drop exactly at the target stops at once; a drop always above it halves towards 0
    assert _bisect(lambda r: 0.3, 0.3, 0.01, 15, 2.0, False, "x") == (1.0, 0.3, 1)
    assert _bisect(lambda r: 1.0, 0.3, 0.01, 4, 2.0, False, "x") == (0.125, 1.0, 4)
    assert _bisect(lambda r: 0.0, 0.3, 0.01, 2, 2.0, False, "x") == (1.5, 0.0, 2)
    # tol is strict: |drop - target| = tol does not stop
    assert _bisect(lambda r: 0.25, 0.5, 0.25, 2, 2.0, False, "x")[2] == 2


# ----------------------------------------------------------------------------- noise
def test_noise_std_and_draws_by_hand():
    w = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[-4.0]])}
    # magnitude-aware: sqrt(sigma^2 w^2 + eps^2), sigma 0.5, eps 2: [sqrt(2.25 + 4), 2], sqrt(8)
    std = noise_std(w, 0.5, magnitude_aware=True, eps=2.0)
    assert std["a"].tolist() == pytest.approx([2.5, 2.0])
    assert std["b"].tolist() == [[pytest.approx(math.sqrt(8.0))]]
    plain = noise_std(w, 0.5)
    assert plain["a"].tolist() == [0.5, 0.5] and plain["b"].tolist() == [[0.5]]
    assert noise_std({"c": torch.ones(1)}, 0.0, magnitude_aware=True)["c"].item() == (
        pytest.approx(1e-3)
    )  # default eps
    z = torch.randn(2, generator=torch.Generator().manual_seed(3))
    d = draw_noise({"a": w["a"]}, 0.5, magnitude_aware=True, eps=2.0,
                   generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert d["a"].tolist() == pytest.approx((z * torch.tensor([2.5, 2.0])).tolist())
    d = draw_noise({"a": w["a"]}, 0.5, generator=torch.Generator().manual_seed(3))
    assert d["a"].tolist() == pytest.approx((z * 0.5).tolist())
    d = draw_noise({"a": torch.ones(1)}, 0.0, magnitude_aware=True,
                   generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert d["a"].item() == pytest.approx(z[0].item() * 1e-3)
    half = draw_noise({"a": torch.ones(2, dtype=torch.float64)}, 1.0)["a"]
    assert half.dtype == torch.float64
    # the normals are drawn in float32 (the same numbers whatever the weights' dtype)
    z64 = _normal(torch.ones(2, dtype=torch.float64), torch.Generator().manual_seed(3))
    assert z64.dtype == torch.float64 and z64.tolist() == z.tolist()


def test_noise_streams_are_seeded_by_formula():
    # seed: SEED_BASE + 1000003 seed + sum_i s_i 7919^(i+1), mod 2^62
    assert _SEED_BASE == 10348628753
    assert _generator(0).initial_seed() == 10348628753
    assert (
        _generator(2, 3, 4).initial_seed() == 10348628753 + 2 * 1_000_003 + 3 * 7919 + 4 * 7919**2
    )
    big = _generator(0, 1 << 50, 1 << 50).initial_seed()
    assert big == (10348628753 + (1 << 50) * 7919 + (1 << 50) * 7919**2) % (1 << 62)
    s = 123456789123456789  # its sum is different mod 2^62, 2^63 and 2^64
    assert _generator(0, s).initial_seed() == (10348628753 + s * 7919) % (1 << 62)


# ----------------------------------------------------------------------------- bounds
# w = [[3], [4]] (||w||^2 = 25), w0 = [[0], [1]] (w - w0 = [3, 3], ||.||^2 = 18), omega = 2;
# a bias [1] is left out (weights_only); m = 100 training samples.
_W = {"w": torch.tensor([[3.0], [4.0]]), "b": torch.tensor([1.0])}
_W0 = {"w": torch.tensor([[0.0], [1.0]]), "b": torch.tensor([0.0])}


def test_pac_bayes_bounds_by_hand():
    eps2 = 1e-6
    out = pac_bayes_bounds(_W, _W0, 100, sigma=0.5, sigma_mag=2.0, alpha=0.25, alpha_mag=3.0)

    def root(v):
        return math.sqrt(v / 100)

    log4 = math.log(4.0)  # log(2 omega)

    # 1/4 sum_i log((eps^2 + coef ||.||^2 / omega) / (eps^2 + r^2 (w_i - w0_i)^2)): both terms
    # of the sum are equal here (w - w0 = [3, 3])
    def mag(coef, r, norm2):
        return (
            0.5 * math.log((eps2 + coef * norm2 / 2) / (eps2 + r * r * 9)) + math.log(100 / r) + 10
        )

    expected = {
        "pacbayes_flatness": root(1 / 0.25),
        "pacbayes_orig": root(25 / (4 * 0.25) + math.log(100 / 0.5) + 10),
        "pacbayes_init": root(18 / (4 * 0.25) + math.log(100 / 0.5) + 10),
        "pacbayes_mag_flatness": root(1 / 4),
        "pacbayes_mag_orig": root(mag(4 + 1, 2.0, 25)),
        "pacbayes_mag_init": root(mag(4 + 1, 2.0, 18)),
        "sharpness_flatness": root(1 / 0.0625),
        "sharpness_orig": root(25 * log4 / (4 * 0.0625) + math.log(100 / 0.25) + 10),
        "sharpness_init": root(18 * log4 / (4 * 0.0625) + math.log(100 / 0.25) + 10),
        "sharpness_mag_flatness": root(1 / 9),
        "sharpness_mag_orig": root(mag(9 + 4 * log4, 3.0, 25)),
        "sharpness_mag_init": root(mag(9 + 4 * log4, 3.0, 18)),
    }
    assert out == pytest.approx(expected, rel=1e-9)


def test_pac_bayes_bounds_options():
    # without init weights: no *_init keys, the magnitude-aware denominator takes w0 = 0
    out = pac_bayes_bounds(_W, None, 100, sigma_mag=2.0)
    num = 1e-6 + 5.0 * 25 / 2
    v = 0.25 * (math.log(num / (1e-6 + 36)) + math.log(num / (1e-6 + 64))) + math.log(50) + 10
    assert out == pytest.approx(
        {"pacbayes_mag_flatness": 0.05, "pacbayes_mag_orig": math.sqrt(v / 100)}
    )
    # every tensor (weights_only=False): the bias joins, ||w||^2 = 26, omega = 3
    out = pac_bayes_bounds(_W, None, 100, alpha=0.5, weights_only=False)
    assert out["sharpness_orig"] == pytest.approx(
        math.sqrt((26 * math.log(6) / (4 * 0.25) + math.log(200) + 10) / 100)
    )
    # a radius of 0 or None gives no keys; a non-positive value is reported as NaN
    assert pac_bayes_bounds(_W, _W0, 100, sigma=0.0, alpha=0.0, sigma_mag=0.0, alpha_mag=0.0) == {}
    # a radius below 1 is reported like any positive one; sigma'^2 + 1 at sigma' = 1/2
    half = pac_bayes_bounds(_W, _W0, 100, sigma_mag=0.5)
    num_w, num_d, den = 1e-6 + 1.25 * 25 / 2, 1e-6 + 1.25 * 18 / 2, 1e-6 + 0.25 * 9
    for key, num in (("pacbayes_mag_orig", num_w), ("pacbayes_mag_init", num_d)):
        v = 0.5 * math.log(num / den) + math.log(100 / 0.5) + 10  # two equal terms of 1/4 log
        assert half[key] == pytest.approx(math.sqrt(v / 100)), key
    small = pac_bayes_bounds(_W, None, 100, alpha_mag=0.5)
    assert small["sharpness_mag_flatness"] == pytest.approx(math.sqrt(4 / 100))
    huge = pac_bayes_bounds({"w": torch.full((1, 1), 1e-3)}, None, 1, sigma=1e5)
    assert huge["pacbayes_flatness"] == pytest.approx(1e-5)
    assert _nan(huge["pacbayes_orig"])  # 1e-6 / 4e10 + log(1e-5) + 10 < 0
    # exactly 0 (w = 0, log(m / sigma) = -10) is not a bound either
    zero = pac_bayes_bounds({"w": torch.zeros(1, 1)}, None, 1, sigma=1 / math.exp(-10))
    assert _nan(zero["pacbayes_orig"])
    # a large eps: num = eps^2 + (sigma'^2 + 1) ||w||^2 / omega, den = eps^2 + sigma'^2 w_i^2
    big = pac_bayes_bounds(_W, None, 100, sigma_mag=2.0, eps=0.5)
    num = 0.25 + 5.0 * 25 / 2
    v = 0.25 * (math.log(num / (0.25 + 36)) + math.log(num / (0.25 + 64))) + math.log(50) + 10
    assert big["pacbayes_mag_orig"] == pytest.approx(math.sqrt(v / 100), rel=1e-12)
    one = pac_bayes_bounds(_W, None, 1, sigma=0.5)
    assert one["pacbayes_flatness"] == pytest.approx(2.0)
    for bad in (0, -1, 2.0):
        with pytest.raises(ConfigError):
            pac_bayes_bounds(_W, None, bad, sigma=0.5)
    with pytest.raises(ConfigError):
        pac_bayes_bounds({"b": torch.ones(2)}, None, 10, sigma=0.5)
    with pytest.raises(ConfigError):
        pac_bayes_bounds(_W, {"b": torch.ones(1)}, 10, sigma=0.5)


# ----------------------------------------------------------------------------- Student's t
def test_incomplete_beta_by_hand():
    # I_x(1, 1) = x; I_x(2, 3) = sum_{j=2..4} C(4, j) x^j (1 - x)^(4 - j):
    # x = .3: 6 .09 .49 + 4 .027 .7 + .0081 = .3483 (below (a+1)/(a+b+2) = 3/7: direct fraction)
    # x = .6: 6 .36 .16 + 4 .216 .4 + .1296 = .8208 (above: 1 - I_{1-x}(b, a))
    assert betainc(1.0, 1.0, 0.25) == pytest.approx(0.25, rel=1e-12)
    assert betainc(2.0, 3.0, 0.3) == pytest.approx(0.3483, rel=1e-12)
    assert betainc(2.0, 3.0, 0.6) == pytest.approx(0.8208, rel=1e-12)
    # I_x(1/2, 1/2) = 2/pi asin(sqrt x), on both sides of 1/2
    for x in (0.3, 0.8):
        arcsine = 2 / math.pi * math.asin(math.sqrt(x))
        assert betainc(0.5, 0.5, x) == pytest.approx(arcsine, rel=1e-12)
    # a fraction that needs many terms (scipy.special.betainc: 0.2925184553957732)
    assert betainc(5.5, 0.5, 0.9) == pytest.approx(0.2925184553957732, rel=1e-10)
    assert betainc(5.5, 0.5, 0.2) == pytest.approx(3.693776094906204e-05, rel=1e-10)
    # a large a, b: only the side of the switch point the fraction converges on gets this
    assert betainc(2000.0, 2000.0, 0.55) == pytest.approx(0.9999999998851599, rel=1e-12)
    assert betainc(2.0, 3.0, 0.0) == 0.0 and betainc(2.0, 3.0, -1.0) == 0.0
    assert betainc(2.0, 3.0, 1.0) == 1.0 and betainc(2.0, 3.0, 2.0) == 1.0


def test_student_t_by_hand():
    # df 1 (Cauchy): 1/2 + atan(t)/pi; df 2: 1/2 + t / (2 sqrt(2 + t^2))
    assert t_cdf(1.0, 1) == pytest.approx(0.75, rel=1e-12)
    assert t_cdf(-1.0, 1) == pytest.approx(0.25, rel=1e-12)
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 1 / math.sqrt(6), rel=1e-12)
    assert t_cdf(0.0, 3) == 0.5
    assert t_cdf(-1.5, 7) == pytest.approx(0.088649243494985, rel=1e-10)  # scipy.stats.t.cdf
    assert t_cdf(3.0, 50) == pytest.approx(0.9978991484064659, rel=1e-10)
    # the tables' 2.776 (df 4), 12.706 (df 1), 4.303 (df 2); scipy.stats.t.ppf to 1e-10
    assert t_quantile(0.975, 4) == pytest.approx(2.7764451051977934, rel=1e-10)
    assert t_quantile(0.975, 1) == pytest.approx(12.706204736174694, rel=1e-10)
    assert t_quantile(0.975, 2) == pytest.approx(4.302652729749462, rel=1e-10)
    assert t_quantile(0.025, 4) == pytest.approx(-2.7764451051977934, rel=1e-10)
    assert t_quantile(0.9, 30.5) == pytest.approx(1.309931316030375, rel=1e-10)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-11)
    assert t_quantile(0.75, 1) == pytest.approx(1.0, rel=1e-10)
    for p, df in ((0.0, 4), (1.0, 4), (0.5, 0), (-0.1, 4), (1.5, 4), (0.9, -1)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


def test_paired_differences_by_hand():
    # seeds 1-3 on both sides (d = 1, 2, 3); 5 only in the arm, 4 and 6 only in the control
    # (None at 4 in the arm, NaN and a bool are not numbers either)
    arm = {3: 4.0, 1: 2.0, 2: 3, 4: None, 5: 1.0, 7: math.nan, 8: True}
    control = {1: 1.0, 2: 1.0, 3: 1.0, 6: 0.0, 4: 0.0, 7: 1.0, 8: 1.0}
    d = paired_differences(arm, control, tie=1)
    assert d.diffs == ((1, 1.0), (2, 2.0), (3, 3.0)) and d.unpaired == 5
    assert isinstance(d.tie, float) and isinstance(d.level, float) and d.level == 0.95
    assert (d.n, d.values, d.mean, d.sd) == (3, [1.0, 2.0, 3.0], 2.0, 1.0)
    hw = 4.302652729749462 / math.sqrt(3)  # t_{.975, 2} sd / sqrt(n)
    assert d.half_width == pytest.approx(hw, rel=1e-9)
    assert (d.lo, d.hi) == (pytest.approx(2 - hw, rel=1e-9), pytest.approx(2 + hw, rel=1e-9))
    assert (d.wins, d.ties, d.losses) == (2, 1, 0)  # d > 1; |d| <= 1; d < -1
    assert d.verdict() == "no detectable difference (n=3)"
    neg = paired_differences({0: -1.0, 1: -3.0}, {0: 0.0, 1: 0.0}, tie=1.0)
    assert (neg.wins, neg.ties, neg.losses) == (0, 1, 1)
    level = paired_differences(arm, control, level=0.9)
    assert level.half_width == pytest.approx(2.9199855803537242 / math.sqrt(3), rel=1e-9)
    assert (level.wins, level.ties, level.losses) == (3, 0, 0)  # tie 0: d > 0


def test_paired_verdicts():
    up = Paired(((0, 2.0), (1, 2.1), (2, 1.9)), 0)  # mean 2, sd .1: interval [1.75, 2.25]
    assert up.lo == pytest.approx(2 - 0.4302652729749462 / math.sqrt(3), rel=1e-9)
    assert up.verdict() == "better" and up.verdict(True) == "better"
    assert up.verdict(False) == "worse" and up.verdict(None) == "higher"
    down = Paired(((0, -2.0), (1, -2.1), (2, -1.9)), 0)
    assert down.verdict() == "worse" and down.verdict(False) == "better"
    assert down.verdict(None) == "lower"
    one = Paired(((0, 1.0),), 2)
    assert one.verdict() == "no interval (n=1)"
    assert (one.mean, one.sd, one.half_width, one.lo, one.hi) == (1.0, None, None, None, None)
    # an interval inside (0, 1) or (-1, 0) is still one side; [0, 0] is not
    small = Paired(((0, 0.5), (1, 0.6), (2, 0.4)), 0)  # [0.25, 0.75]
    assert small.verdict() == "better" and small.verdict(None) == "higher"
    assert small.verdict(False) == "worse"
    assert Paired(((0, -0.5), (1, -0.6), (2, -0.4)), 0).verdict(None) == "lower"
    around = Paired(((0, 0.1), (1, -0.1), (2, 0.0)), 0)  # [-0.25, 0.25]
    assert around.verdict() == "no detectable difference (n=3)" and around.hi < 1
    flat = Paired(((0, 0.0), (1, 0.0)), 0)  # sd 0: the interval is [0, 0]
    assert (flat.lo, flat.hi) == (0.0, 0.0)
    assert flat.verdict() == "no detectable difference (n=2)"
    none = Paired((), 0)
    assert none.verdict() == "no paired seeds" and none.mean is None
    assert (none.tie, none.level) == (0.0, 0.95)
