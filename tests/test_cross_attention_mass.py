"""experiments/cross_attention_mass.py: the split of attention mass into start token, caption and what follows."""

from __future__ import annotations

import pytest
import torch

from experiments.cross_attention_mass import position_mass


def test_position_mass_splits_each_row_at_its_own_caption_length():
    # two rows over 6 positions; captions of 2 and 3 tokens (positions 1-2 and 1-3)
    mass = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.2, 0.1],
                         [0.0, 0.5, 0.1, 0.1, 0.3, 0.0]])
    start, caption, after = position_mass(mass, [2, 3])
    assert start == pytest.approx((0.1 + 0.0) / 2)
    assert caption == pytest.approx(((0.2 + 0.3) + (0.5 + 0.1 + 0.1)) / 2)
    assert after == pytest.approx(((0.1 + 0.2 + 0.1) + (0.3 + 0.0)) / 2)
    assert start + caption + after == pytest.approx(1.0)
