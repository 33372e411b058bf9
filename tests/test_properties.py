"""Property-based tests: any input gives a clear error or finite outputs of the right shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from vmonf import VMoNF
from vmonf._validation import check_array
from vmonf.coupling import bounded_log_scale
from vmonf.flows import ComponentFlows

FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=64)
ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=64)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def small_model() -> VMoNF:
    X = np.random.default_rng(0).normal(size=(200, 2))
    return VMoNF(2, max_epochs=2, n_layers=2, hidden_features=8, init_steps=5, random_state=0).fit(
        X
    )


@SETTINGS
@given(arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 4)), elements=ANY_FLOAT))
def test_check_array_errors_exactly_on_non_finite(X):
    if np.isfinite(X).all():
        np.testing.assert_array_equal(check_array(X), X)
    else:
        with pytest.raises(ValueError, match="NaN or infinite"):
            check_array(X)


@SETTINGS
@given(st.lists(FINITE, min_size=1, max_size=50), st.floats(0.1, 10.0))
def test_bounded_log_scale_stays_in_bounds(values, bound):
    out = bounded_log_scale(torch.tensor(values), bound)
    assert torch.all(out.abs() <= bound)


@SETTINGS
@given(arrays(np.float64, st.tuples(st.integers(1, 20), st.just(3)), elements=st.floats(-50, 50)))
def test_flows_invert_any_finite_input(X):
    torch.manual_seed(0)
    flows = ComponentFlows(3, 2, n_layers=3, hidden_features=8)
    with torch.no_grad():
        for p in flows.parameters():
            p.normal_(0, 0.3)
        x = torch.as_tensor(X)
        z, logdet = flows(x)
        back, _ = flows.inverse(z)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(back, x.expand_as(back), atol=1e-7, rtol=1e-7)


@SETTINGS
@given(arrays(np.float64, st.tuples(st.integers(1, 20), st.integers(1, 3)), elements=ANY_FLOAT))
def test_fitted_model_clear_error_or_finite_scores(small_model, X):
    if X.shape[1] != 2:
        with pytest.raises(ValueError, match="features"):
            small_model.score_samples(X)
    elif not np.isfinite(X).all():
        with pytest.raises(ValueError, match="NaN or infinite"):
            small_model.score_samples(X)
    elif np.abs(X).max() > 1e14:  # beyond float32 arithmetic: a clear error is allowed
        try:
            scores = small_model.score_samples(X)
        except ValueError as error:
            assert "standard deviations" in str(error)
        else:
            assert not np.isnan(scores).any()
    else:
        scores = small_model.score_samples(X)
        proba = small_model.predict_proba(X)
        assert scores.shape == (X.shape[0],) and proba.shape == (X.shape[0], 2)
        assert not np.isnan(scores).any() and np.isfinite(proba).all()
