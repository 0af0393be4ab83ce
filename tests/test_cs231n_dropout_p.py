"""The two meanings of dropout's ``p`` in jaxbn.cs231n: the 2016-17 drop probability (default)
and the 2018+ keep probability after ``jaxbn.cs231n.set_dropout_p("keep")``."""

from __future__ import annotations

import numpy as np
import pytest

import jaxbn.cs231n
from jaxbn.cs231n import FullyConnectedNet, dropout_backward, dropout_forward


@pytest.fixture
def keep():
    previous = jaxbn.cs231n.set_dropout_p("keep")
    try:
        yield
    finally:
        jaxbn.cs231n.set_dropout_p(previous)


def test_default_is_the_write_ups_drop_probability():
    assert jaxbn.cs231n.dropout_p() == "drop"
    x = np.random.default_rng(0).normal(size=(400, 400)) + 10
    out, _ = dropout_forward(x, {"mode": "train", "p": 0.25, "seed": 1})
    assert abs(np.mean(out == 0) - 0.25) < 0.01


def test_keep_runs_the_later_notebooks_cell_with_the_fractions_it_expects(keep):
    # The 2018+ notebook: "Fraction of train-time output set to zero" should be about 1 - p.
    x = np.random.default_rng(0).normal(size=(500, 500)) + 10
    for p in (0.25, 0.4, 0.7):
        out, _ = dropout_forward(x, {"mode": "train", "p": p})
        zero = np.mean(out == 0)
        assert abs(zero - (1 - p)) <= 4 * np.sqrt(p * (1 - p) / x.size)
        kept = out != 0
        scale = out[kept] / x[kept]  # one scale, 1 / keep (of the keep probability as realized)
        np.testing.assert_allclose(scale, scale[0], rtol=1e-12)
        np.testing.assert_allclose(scale[0], 1 / p, rtol=1e-4)
        np.testing.assert_array_equal(dropout_forward(x, {"mode": "test", "p": p})[0], x)


def test_keep_p_is_the_drop_rate_one_minus_p_with_the_same_seed(keep):
    rng = np.random.default_rng(2)
    x, dout = rng.normal(size=(30, 40)), rng.normal(size=(30, 40))
    out_keep, cache_keep = dropout_forward(x, {"mode": "train", "p": 0.3, "seed": 5})
    jaxbn.cs231n.set_dropout_p("drop")
    out_drop, cache_drop = dropout_forward(x, {"mode": "train", "p": 0.7, "seed": 5})
    np.testing.assert_allclose(out_keep, out_drop, rtol=1e-12)
    np.testing.assert_allclose(dropout_backward(dout, cache_keep),
                               dropout_backward(dout, cache_drop), rtol=1e-12)


def _data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(8, 6)), np.array([0, 1, 2, 0, 1, 2, 0, 1])


def _loss(model, params):
    model.params = params
    return model.loss(*_data())


def test_keep_fully_connected_net_reads_dropout_as_keep_probability(keep):
    np.random.seed(0)
    later = FullyConnectedNet([7], input_dim=6, num_classes=3, dropout=0.25, seed=9)
    assert later.use_dropout and later.dropout_param["p"] == 0.25  # the keep probability
    assert not FullyConnectedNet([7], input_dim=6, num_classes=3, dropout=1).use_dropout
    assert not FullyConnectedNet([7], input_dim=6, num_classes=3).use_dropout
    ratio = FullyConnectedNet([7], input_dim=6, num_classes=3, dropout_keep_ratio=0.25, seed=9)
    assert ratio.dropout_param["p"] == 0.25
    with pytest.raises(ValueError, match="dropout=0 would drop every unit.*keeping"):
        FullyConnectedNet([7], input_dim=6, num_classes=3, dropout=0)
    with pytest.raises(ValueError, match="keep probability here.*not both"):
        FullyConnectedNet([7], input_dim=6, num_classes=3, dropout=0.5, dropout_keep_ratio=0.5)
    jaxbn.cs231n.set_dropout_p("drop")
    earlier = FullyConnectedNet([7], input_dim=6, num_classes=3, dropout=0.75, seed=9)
    assert earlier.dropout_param["p"] == 0.75
    # Keep 0.25 (2018+) is drop 0.75 (2016-17): the same loss and gradients for the same seed;
    # the later model still reads its p as a keep probability after the setting changed back.
    (loss_later, grads_later), (loss_earlier, grads_earlier) = (
        _loss(later, earlier.params), _loss(earlier, earlier.params))
    assert loss_later == pytest.approx(loss_earlier, rel=1e-6)
    for name in grads_earlier:
        np.testing.assert_allclose(grads_later[name], grads_earlier[name], rtol=1e-5, atol=1e-7)
    assert _loss(ratio, earlier.params)[0] == pytest.approx(loss_earlier, rel=1e-6)
    no_dropout = FullyConnectedNet([7], input_dim=6, num_classes=3, dropout=0)
    assert _loss(no_dropout, earlier.params)[0] != pytest.approx(loss_earlier, rel=1e-6)


def test_set_dropout_p_returns_the_previous_meaning_and_refuses_others():
    assert jaxbn.cs231n.set_dropout_p("keep") == "drop"
    try:
        assert jaxbn.cs231n.dropout_p() == "keep"
        with pytest.raises(ValueError, match="'drop'.*'keep'.*got 'keeping'"):
            jaxbn.cs231n.set_dropout_p("keeping")
        assert jaxbn.cs231n.dropout_p() == "keep"  # a refused value changes nothing
    finally:
        assert jaxbn.cs231n.set_dropout_p("drop") == "keep"
