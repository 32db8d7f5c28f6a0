"""The parameterisation layer: the conversions are each other's inverses and match the flow path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignrl.errors import ConfigError
from alignrl.sampling.parameterisation import FLOW, logit_normal_density, sample_t


@pytest.mark.parametrize("t", [0.3, torch.tensor(0.7), torch.tensor([0.0, 0.25, 0.5, 1.0])])
def test_flow_conversions_invert_each_other(t):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    x_t = FLOW.add_noise(x0, eps, t)
    v = FLOW.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)  # the straight path's velocity
    torch.testing.assert_close(FLOW.to_x0(x_t, v, t), x0)
    torch.testing.assert_close(FLOW.to_eps(x_t, v, t), eps)
    tt = t.reshape(-1, 1, 1, 1) if isinstance(t, torch.Tensor) and t.ndim else t
    torch.testing.assert_close(x_t, (1 - tt) * x0 + tt * eps)


def test_endpoints_are_data_and_noise():
    x0, eps = torch.ones(2, 4), -torch.ones(2, 4)
    assert torch.equal(FLOW.add_noise(x0, eps, 0.0), x0) and torch.equal(FLOW.add_noise(x0, eps, 1.0), eps)


def test_time_sampling_follows_its_density():
    g = torch.Generator().manual_seed(1)
    t = sample_t(200_000, g, kind="logit_normal").numpy()
    assert 0 < t.min() and t.max() < 1 and abs(np.median(t) - 0.5) < 0.01
    hist, edges = np.histogram(t, bins=10, range=(0, 1), density=True)
    centres = (edges[:-1] + edges[1:]) / 2
    expect = np.array([logit_normal_density(c) for c in centres])
    assert np.allclose(hist[2:-2], expect[2:-2], rtol=0.05)  # the inner bins, where the density is smooth
    u = sample_t(100_000, g).numpy()
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.002
    with pytest.raises(ConfigError, match="unknown time sampling 'beta'"):
        sample_t(4, g, kind="beta")
