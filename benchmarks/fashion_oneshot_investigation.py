"""Is grad-kd's poor showing the method or the implementation? (issue 17, part 1)

    python benchmarks/fashion_oneshot_investigation.py [--work runs/fashion_oneshot] [--epochs 2]

Needs the teacher and the seed-0 dense student of benchmarks/fashion_oneshot.py (its first two phases)
in ``--work``. Part A checks s2h.unstructured.importance (fp32, fused CA-KLD kernel) against an
independent fp64 computation: autograd of the loss written out here by hand, without s2h_kernels.
Part B scores the same dense student with variants of the gradient importance (T² factor, logit
standardisation, alpha, T, eval/train mode, batches, summing scores vs gradients), prunes it at 95%
and 98% and retrains each for ``--epochs`` epochs with KD on the same batches. Writes
``benchmarks/results/fashion_oneshot_investigation.md``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_common as fc  # noqa: E402
import fashion_oneshot as fo  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "fashion_oneshot_investigation.md"
DEFAULT = dict(alpha=0.5, T=4.0, kd_scale=None, standardize=True, mode="eval", batches=16, accumulate="abs")
VARIANTS = [
    ("magnitude", None),
    ("grad-ce (alpha 0)", dict(alpha=0.0)),
    ("grad-ce, gradients summed first", dict(alpha=0.0, accumulate="grad")),
    ("grad-kd, library default (alpha 0.5, T 4, T² factor, standardised, eval, 16 batches, scores summed)", {}),
    ("grad-kd, no T² factor (kd_scale 1)", dict(kd_scale=1.0)),
    ("grad-kd, raw logits (no standardisation)", dict(standardize=False)),
    ("grad-kd, alpha 0.9", dict(alpha=0.9)),
    ("grad-kd, alpha 1 (KD term only)", dict(alpha=1.0)),
    ("grad-kd, T 1", dict(T=1.0)),
    ("grad-kd, T 8", dict(T=8.0)),
    ("grad-kd, train mode (batch statistics)", dict(mode="train")),
    ("grad-kd, 4 batches", dict(batches=4)),
    ("grad-kd, 64 batches", dict(batches=64)),
    ("grad-kd, gradients summed first", dict(accumulate="grad")),
    ("grad-kd, gradients summed first, no T² factor", dict(accumulate="grad", kd_scale=1.0)),
]


def hand_loss(zs, zt, y, alpha, T, kd_scale, standardize, eps=1e-7):
    """alpha·kd_scale·[γ KL(P_T‖P_S) + (1−γ) KL(P_S‖P_T)] + (1−alpha)·CE, written out from the formula."""
    ce = F.cross_entropy(zs, y)
    if alpha == 0:
        return ce
    gamma = torch.softmax(zt, -1).max(-1).values.mean()
    if standardize:
        zs = (zs - zs.mean(-1, keepdim=True)) / (zs.std(-1, keepdim=True) + eps)
        zt = (zt - zt.mean(-1, keepdim=True)) / (zt.std(-1, keepdim=True) + eps)
    ls, lt = torch.log_softmax(zs / T, -1), torch.log_softmax(zt / T, -1)
    kl_ts = (lt.exp() * (lt - ls)).sum(-1).mean()
    kl_st = (ls.exp() * (ls - lt)).sum(-1).mean()
    scale = T * T if kd_scale is None else kd_scale
    return alpha * scale * (gamma * kl_ts + (1 - gamma) * kl_st) + (1 - alpha) * ce


def hand_scores(student, teacher, batches, cfg: dict, dtype=torch.float32) -> dict:
    """|θ·∂L/∂θ| per prunable weight, by autograd of :func:`hand_loss` (no s2h_kernels)."""
    from s2h.unstructured import prunable_weights

    net = copy.deepcopy(student).to(dtype)
    tch = copy.deepcopy(teacher).to(dtype).eval()
    net.train(cfg["mode"] == "train")
    weights = prunable_weights(net)
    names, params = list(weights), list(weights.values())
    acc = [torch.zeros_like(p) for p in params]
    used = batches[:cfg["batches"]]
    for x, y in used:
        x = x.to(dtype)
        with torch.no_grad():
            zt = tch(x)
        loss = hand_loss(net(x), zt, y, cfg["alpha"], cfg["T"], cfg["kd_scale"], cfg["standardize"])
        grads = torch.autograd.grad(loss, params)
        for a, p, g in zip(acc, params, grads):
            a.add_((p.detach() * g).abs() if cfg["accumulate"] == "abs" else g)
    if cfg["accumulate"] == "grad":
        return {n: (p.detach() * a / len(used)).abs().float() for n, p, a in zip(names, params, acc)}
    return {n: (a / len(used)).float() for n, a in zip(names, acc)}


def gradient_check(student, teacher, batches) -> list[str]:
    """Part A: the library (fp32, fused kernel) against the fp64 hand-written loss, on real batches."""
    from s2h.unstructured import importance, prune

    lines = ["| importance | batches | max rel. error of the scores | weights kept by both at 95% / kept by the "
             "fp64 reference |", "|---|---:|---:|---:|"]
    for alpha, label in ((0.5, "grad-kd (library defaults)"), (0.0, "grad-ce")):
        for nb in (1, 16):
            lib = importance(student, teacher if alpha else None, batches, alpha=alpha, temperature=4.0, batches=nb)
            ref = hand_scores(student, teacher, batches, {**DEFAULT, "alpha": alpha, "batches": nb}, torch.float64)
            err = max(float(((lib[n].double() - ref[n].double()).abs().max() / ref[n].double().abs().max()))
                      for n in ref)
            net = copy.deepcopy(student)
            m_lib = prune(net, lib, 0.95, apply=False)
            m_ref = prune(net, ref, 0.95, apply=False)
            both = sum(int((m_lib[n] & m_ref[n]).sum()) for n in m_ref)
            kept = sum(int(m_ref[n].sum()) for n in m_ref)
            lines.append(f"| {label} | {nb} | {err:.1e} | {both} / {kept} |")
    return lines


def term_lines(study, student, teacher, batches) -> list[str]:
    """Per layer, the gradient norm of each term of the default loss on one batch, and how many of the
    weights grad-kd keeps at 95% grad-ce and magnitude keep too (16 batches, library scores)."""
    from s2h.unstructured import compute_importance, prunable_weights, prune, total_loss

    net = copy.deepcopy(student).eval()
    params = list(prunable_weights(net).values())
    x, y = batches[0]
    out = net(x)
    with torch.no_grad():
        zt = teacher(x)
    g_ce = torch.autograd.grad(0.5 * F.cross_entropy(out, y), params, retain_graph=True)
    g_kd = torch.autograd.grad(0.5 * total_loss(out, y, zt, alpha=1.0, temperature=study.temperature), params)
    lines = ["| layer | ‖∂(0.5·CE)/∂θ‖ | ‖∂(0.5·T²·CA-KLD)/∂θ‖ | ratio |", "|---|---:|---:|---:|"]
    for n, a, b in zip(prunable_weights(net), g_ce, g_kd):
        lines.append(f"| `{n}` | {float(a.norm()):.3g} | {float(b.norm()):.3g} | {float(a.norm() / b.norm()):.1f} |")
    sc = {m: compute_importance(m, net, teacher, batches, batches=study.batches) for m in ("magnitude", "grad-ce", "grad-kd")}
    masks = {m: prune(net, v, 0.95, apply=False) for m, v in sc.items()}
    kept = sum(int(v.sum()) for v in masks["grad-kd"].values())
    shared = {m: sum(int((masks["grad-kd"][k] & masks[m][k]).sum()) for k in masks[m]) for m in ("grad-ce", "magnitude")}
    lines += ["", f"At 95% grad-kd keeps {kept} weights; grad-ce keeps {shared['grad-ce']} of the same ones, "
              f"magnitude {shared['magnitude']}. Student logits: row std {float(out.std(-1).mean()):.2f} "
              f"(teacher {float(zt.std(-1).mean()):.2f}); CE {float(F.cross_entropy(out, y)):.3f}, "
              f"T²·CA-KLD {float(total_loss(out, y, zt, alpha=1.0, temperature=study.temperature)):.4f}."]
    return lines


def kept_counts(masks: dict) -> str:
    return ", ".join(f"{int(m.sum())}" for m in masks.values())


def evaluate_variant(study, student, scores, sparsity, data, cache_fn, epochs, batches) -> tuple[float, float, str]:
    """Top-1 of the pruned student with its BatchNorm statistics re-estimated (epochs=0), or after
    ``epochs`` of KD retraining on the sweep's batches; and the weights kept per layer."""
    from s2h.unstructured import apply_masks, prune, recalibrate_bn

    net = copy.deepcopy(student)
    masks = prune(net, scores, sparsity)
    before = fc.accuracy(net, data.x_test, data.y_test)
    if epochs == 0:
        recalibrate_bn(net, batches, batches=16)
    else:
        fc.train_supervised(net, data, epochs, 1000, loss_fn=fo.kd_loss_fn(cache_fn(), study),
                            after_step=lambda: apply_masks(net, masks), lr=study.lr)
    return before, fc.accuracy(net, data.x_test, data.y_test), kept_counts(masks)


def variants_table(study, student, teacher, batches, data, epochs, sparsities) -> list[str]:
    from s2h.unstructured import magnitude_importance, prunable_weights

    sizes = ", ".join(f"{n} {p.numel()}" for n, p in prunable_weights(student).items())
    lines = [f"Weights kept per layer ({sizes}).", "",
             "| importance variant | sparsity | top-1 pruned, no retraining | top-1 after "
             + (f"{epochs} epochs KD retraining" if epochs else "BatchNorm re-estimated (16 batches)")
             + " | weights kept per layer |", "|---|---:|---:|---:|---|"]
    cache_fn = lambda: fo.teacher_logits(study, teacher, data, epochs, 1000)  # noqa: E731
    for label, cfg in VARIANTS:
        t0 = time.perf_counter()
        scores = magnitude_importance(student) if cfg is None else hand_scores(student, teacher, batches,
                                                                                {**DEFAULT, **cfg})
        for s in sparsities:
            before, after, kept = evaluate_variant(study, student, scores, s, data, cache_fn, epochs, batches)
            lines.append(f"| {label} | {100 * s:g}% | {before:.2f} | {after:.2f} | {kept} |")
        print(f"{label}: {time.perf_counter() - t0:.0f} s", flush=True)
    return lines


def scope_table(study, student, teacher, batches, data, epochs, sparsities, min_density) -> list[str]:
    """Part C: the same scores when no layer can be emptied: per-layer sparsity (``scope="layer"``) and
    the global threshold with ``min_density``. Does grad-kd beat the others then?"""
    from s2h.unstructured import apply_masks, magnitude_importance, prune

    lines = ["| importance | sparsity | pruning | top-1 pruned, no retraining | top-1 after "
             f"{epochs} epochs KD retraining | weights kept per layer |", "|---|---:|---|---:|---:|---|"]
    cache = fo.teacher_logits(study, teacher, data, epochs, 1000)
    for label, cfg in [VARIANTS[0], VARIANTS[1], VARIANTS[3]]:
        scores = magnitude_importance(student) if cfg is None else hand_scores(student, teacher, batches,
                                                                                {**DEFAULT, **cfg})
        for s in sparsities:
            for scope, md in (("layer", 0.0), ("global", min_density)):
                net = copy.deepcopy(student)
                masks = prune(net, scores, s, scope=scope, min_density=md)
                before = fc.accuracy(net, data.x_test, data.y_test)
                fc.train_supervised(net, data, epochs, 1000, loss_fn=fo.kd_loss_fn(cache, study),
                                    after_step=lambda: apply_masks(net, masks), lr=study.lr)
                how = "per layer" if scope == "layer" else f"global, min_density {md}"
                lines.append(f"| {label} | {100 * s:g}% | {how} | {before:.2f} | "
                             f"{fc.accuracy(net, data.x_test, data.y_test):.2f} | {kept_counts(masks)} |")
                print(lines[-1], flush=True)
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(fo.Study.work))
    p.add_argument("--epochs", type=int, default=fo.Study.epochs, help="KD retraining epochs per variant (default: the sweep's)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98, 0.99])
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--scope-layer", action="store_true", help="part C only: no layer emptied")
    p.add_argument("--min-density", type=float, default=0.005, help="part C: prune(min_density=) (default 0.005)")
    p.add_argument("--n-test", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--terms", action="store_true", help="only the gradient norms of the two loss terms")
    p.add_argument("--skip-check", action="store_true", help="skip part A")
    p.add_argument("--smoke", action="store_true", help="on the work folder of fashion_oneshot.py --smoke")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    study = fo.Study(work=Path(a.work), n_test=a.n_test)
    if a.smoke:  # the work folder of fashion_oneshot.py --smoke
        study = fo.Study(work=Path(a.work), n_train=640, n_test=a.n_test or 500, teacher_depth=8)
    data = fo.data_for(study)
    teacher = fo.load_teacher(study)
    student = fo.load_model(study, "student-s0", fo.student_net())
    batches = []
    for i, (_, _, x, y) in enumerate(fc.training_batches(data, 1, 2000)):
        if i == 64:
            break
        batches.append((x, y))
    t0 = time.perf_counter()
    if a.terms:
        Path(a.out).write_text("\n".join(["## The two terms of the loss", "", *term_lines(study, student, teacher,
                                                                                         batches), ""]))
        print(Path(a.out).read_text())
        return
    if a.scope_layer:
        lines = scope_table(study, student, teacher, batches, data, a.epochs, a.sparsities, a.min_density)
        Path(a.out).write_text("\n".join(["## C. When no layer can be emptied", "",
                                           f"Seed-0 dense student, {fc.machine_line()}.", "", *lines, ""]))
        print(f"wrote {a.out}")
        return
    check = [] if a.skip_check else gradient_check(student, teacher, batches)
    print("\n".join(check), flush=True)
    table = variants_table(study, student, teacher, batches, data, a.epochs, a.sparsities)
    text = ["# grad-kd on Fashion-MNIST: method or implementation?", "",
            f"Produced by `benchmarks/fashion_oneshot_investigation.py` on the teacher (ResNet-{study.teacher_depth}, "
            f"{fc.accuracy(teacher, data.x_test, data.y_test):.2f}%) and the seed-0 dense student "
            f"({fc.accuracy(student, data.x_test, data.y_test):.2f}%) of `benchmarks/fashion_oneshot.py` "
            f"({study.n_train} training images). {fc.machine_line()}; {(time.perf_counter() - t0) / 60:.0f} min.", "",
            "## A. The importance gradient against an independent fp64 computation", "",
            *check, "", "## B. What changes the importance", "", *table, ""]
    Path(a.out).write_text("\n".join(text))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
