import math

import pytest

from optimizers.schedules import warmup_cosine_factor


def test_warmup_is_linear_then_cosine_reaches_min_ratio():
    f = lambda s: warmup_cosine_factor(s, warmup_steps=10, total_steps=110, min_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_constant_decay_and_unknown_decay():
    assert warmup_cosine_factor(1000, 10, 100, decay="constant") == 1.0
    with pytest.raises(ValueError, match="lr decay"):
        warmup_cosine_factor(50, 10, 100, decay="linear")
    assert math.isclose(warmup_cosine_factor(5, 0, None), 1.0)
