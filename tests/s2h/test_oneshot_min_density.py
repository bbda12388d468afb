"""prune(min_density=...): one global threshold that cannot empty a layer."""
import math

import pytest
import torch

from s2h import unstructured as oneshot
from s2h.models.small_cnn import SmallCNN


def model_and_skewed_scores(seed=0):
    torch.manual_seed(seed)
    model = SmallCNN(10, 1, widths=(4, 8, 8), hidden=8)
    g = torch.Generator().manual_seed(seed)
    weights = oneshot.prunable_weights(model)
    # the first prunable layer scores 1000x lower than the others: a plain global threshold empties it
    scores = {n: torch.rand(p.shape, generator=g) * (1e-3 if i == 0 else 1.0) for i, (n, p) in enumerate(weights.items())}
    return model, scores


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.85])
def test_min_density_keeps_the_top_of_every_layer_and_the_exact_total(sparsity):
    model, scores = model_and_skewed_scores()
    first = next(iter(scores))
    plain = oneshot.prune(model, scores, sparsity, apply=False)
    assert int(plain[first].sum()) == 0  # the failure min_density is for
    masks = oneshot.prune(model, scores, sparsity, min_density=0.1)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    for n, m in masks.items():
        assert int(m.sum()) >= math.ceil(0.1 * m.numel()), n
        if 0 < int(m.sum()) < m.numel():  # within a layer the highest scores are the ones kept
            assert scores[n][~m].max() <= scores[n][m].min()
    # the reserved weights of the low layer are exactly its top ceil(0.1 n), the rest follow the threshold
    n0 = scores[first].numel()
    assert int(masks[first].sum()) == math.ceil(0.1 * n0)
    params = dict(model.named_parameters())
    assert all(bool((params[n][~m] == 0).all()) for n, m in masks.items())


def test_min_density_zero_is_the_plain_threshold_and_bad_values_raise():
    model, scores = model_and_skewed_scores(1)
    a = oneshot.prune(model, scores, 0.7, apply=False)
    b = oneshot.prune(model, scores, 0.7, apply=False, min_density=0.0)
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="min_density"):
        oneshot.prune(model, scores, 0.95, apply=False, min_density=0.2)  # reserves more than 5% keeps
    with pytest.raises(ValueError, match="min_density"):
        oneshot.prune(model, scores, 0.5, apply=False, min_density=1.5)
