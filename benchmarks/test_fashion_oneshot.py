"""benchmarks/fashion_oneshot.py end to end on a tiny subset (the pipeline, not the accuracy)."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_common as fc  # noqa: E402
import fashion_oneshot as fo  # noqa: E402

from s2h.data import fashion_mnist  # noqa: E402

needs_data = pytest.mark.skipif(not (fashion_mnist.DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist not installed (make data)")


def test_gmp_schedule_is_cubic_and_ends_at_the_target():
    vals = [fo.gmp_sparsity(t, 40, 0.98) for t in range(0, 51)]
    assert vals[0] == 0.0 and vals[40] == pytest.approx(0.98) and vals[50] == pytest.approx(0.98)
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert fo.gmp_sparsity(20, 40, 0.98) == pytest.approx(0.98 * (1 - 0.5 ** 3))


def test_gradual_magnitude_hook_prunes_monotonically_to_the_exact_sparsity():
    from s2h.unstructured import prunable_weights

    net = fo.student_net()
    hook = fo.GradualMagnitude(net, 0.9, total_steps=40, steps_per_epoch=10)
    n = sum(p.numel() for p in prunable_weights(net).values())
    pruned_before = 0
    for _ in range(40):
        with torch.no_grad():  # a "step" that would revive pruned weights if the hook did not re-apply masks
            for p in prunable_weights(net).values():
                p.add_(0.01)
        hook()
        pruned = sum(int((~m).sum()) for m in hook.masks.values())
        assert pruned >= pruned_before
        pruned_before = pruned
        assert all(bool((p[~hook.masks[k]] == 0).all()) for k, p in prunable_weights(net).items())
    assert hook.end <= 30 and pruned_before == round(0.9 * n)


def test_kd_loss_fn_rejects_batches_it_was_not_cached_for():
    study = fo.Study()
    cache = {"logits": torch.randn(2, 4, 10), "sums": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    fn = fo.kd_loss_fn(cache, study)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 10))
    x = torch.zeros(4, 4)
    x[0, 0] = 1.0
    assert torch.isfinite(fn(net, x, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(RuntimeError, match="not the batch"):
        fn(net, x, torch.zeros(4, dtype=torch.long))  # step 1 was cached for a batch summing to 2


@needs_data
def test_oneshot_study_smoke(tmp_path):
    from s2h.unstructured import load_pruned

    work = tmp_path / "work"
    fo.main(["--smoke", "--work", str(work), "--results", str(tmp_path)])
    rows = [json.loads(p.read_text()) for p in work.glob("*.json")]
    runs = [r for r in rows if "sparsity" in r]
    data = fo.data_for(fo.Study(n_train=640, n_test=500))
    assert {r["method"] for r in rows} == {"teacher", "student", *fo.METHODS}
    assert len(runs) == len(fo.METHODS) * len(fo.RETRAIN) * 2  # 2 smoke sparsities, 1 seed
    for r in runs:
        assert r["pruned"] == round(r["sparsity"] * r["prunable"]), r["key"]  # exact sparsity, every method
        assert r["zeros"] >= r["pruned"], r["key"]                          # pruned weights still 0 after retraining
        model, masks = load_pruned(work / r["key"])                          # raises if a pruned weight is non-zero
        params = dict(model.named_parameters())
        assert sum(int((~m).sum()) for m in masks.values()) == r["pruned"]
        assert all(bool((params[k][~m] == 0).all()) for k, m in masks.items())
        assert fc.accuracy(model, data.x_test, data.y_test) == pytest.approx(r["top1"])  # the saved model is the row's
    # torch-l1 and s2h magnitude rank the same |θ| under one global threshold: the same masks.
    for p in (900, 980):
        a = torch.load(work / f"magnitude-ce-p{p}-s0" / "masks.pt", weights_only=True)
        b = torch.load(work / f"torch-l1-ce-p{p}-s0" / "masks.pt", weights_only=True)
        assert sum(int((a[k] != b[k]).sum()) for k in a) <= 2  # ties at the threshold may differ
    text = (tmp_path / "fashion_oneshot_smoke.md").read_text()
    for label in ("grad-kd", "grad-ce", "magnitude", "torch global_unstructured L1", "gradual magnitude"):
        assert sum(label in line and line.startswith("|") for line in text.splitlines()) >= 2, label
    assert "| 90% | 98% |" in text and "## Protocol" in text and "Goal:" in text
    assert (tmp_path / "fashion_oneshot_smoke.png").stat().st_size > 10_000
    before = {r["key"]: r["wall_s"] for r in rows}
    fo.main(["--smoke", "--work", str(work), "--results", str(tmp_path)])  # resumes: nothing is rerun
    assert {json.loads(p.read_text())["key"]: json.loads(p.read_text())["wall_s"] for p in work.glob("*.json")} == before
