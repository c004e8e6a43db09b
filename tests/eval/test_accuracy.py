"""Label accuracy with the digits classifier: real digits score high, shuffled labels near chance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scm_graph.data.digits import load_digits_uint8
from scm_graph.errors import UserError
from scm_graph.eval.accuracy import images_label_accuracy, label_accuracy
from scm_graph.eval.digits import digits_predictions
from scm_graph.model import build_model
from scm_graph.sample.generate import Generator
from tests.helpers import tiny_spec


def test_real_digits_high_accuracy_and_shuffled_near_chance(scm_cache):
    x, y = load_digits_uint8()
    pred = digits_predictions(x)
    assert pred.shape == (x.shape[0],) and pred.dtype == np.int64
    assert images_label_accuracy(x, y) >= 0.97  # 1500 of the 1797 are its training split, 99 % held out
    assert images_label_accuracy(torch.from_numpy(x), torch.from_numpy(y)) == images_label_accuracy(x, y)
    shuffled = np.random.default_rng(0).permutation(y)
    assert 0.05 <= images_label_accuracy(x, shuffled) <= 0.16
    assert images_label_accuracy(x, (y + 1) % 10) <= 0.02  # every label wrong
    with pytest.raises(UserError, match="labels"):
        images_label_accuracy(x, y[:-1])


def _generator(class_conditional: bool) -> Generator:
    torch.manual_seed(0)
    spec = tiny_spec(class_conditional=class_conditional)
    return Generator(build_model(spec).eval(), spec, torch.device("cpu"))


def test_label_accuracy_of_a_generator(scm_cache):
    g = _generator(True)
    labels = torch.arange(20) % 10
    a = label_accuracy(g, labels, steps=2, solver="euler", seed=0)
    assert 0.0 <= a <= 1.0
    assert label_accuracy(g, labels, steps=2, solver="euler", seed=0) == a  # deterministic in the seed
    with pytest.raises(UserError, match="class-conditional"):
        label_accuracy(_generator(False), labels, steps=2)
