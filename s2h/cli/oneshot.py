"""``python -m s2h oneshot``: teacher-guided one-shot unstructured pruning end to end (docs/DESIGN.md §3).

Train (or load) a teacher, distill a dense student, score its weights with each importance method,
prune to each sparsity in one shot, retrain with the mask fixed; write every pruned model
(:func:`s2h.unstructured.save_pruned`), ``summary.json``, ``log.txt`` and, for several sparsities,
``accuracy_vs_sparsity.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..data import add_data_arguments, loaders_from_args
from ..engine.batches import iterate_batches
from ..engine.evaluation import evaluate, recalibrate_bn
from ..engine.plots import plot_accuracy_vs_sparsity
from ..engine.seeding import seed_everything
from ..models import build_model
from ..unstructured.io import save_pruned
from ..unstructured.pruning import DEFAULT_EXCLUDE, prunable_weights, prune, sparsity_report
from ..unstructured.retraining import distill, retrain, train_cross_entropy
from ..unstructured.scoring import IMPORTANCE_METHODS, compute_importance

__all__ = ["add_arguments", "main"]


def _sparsity_list(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not a number") from None
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise argparse.ArgumentTypeError(f"sparsity {part} is outside [0, 1) (use 0.9 for 90%)")
        out.append(v)
    if not out:
        raise argparse.ArgumentTypeError("no sparsity given")
    return out


def _method_list(text: str) -> list[str]:
    out = [m.strip() for m in text.split(",") if m.strip()]
    for m in out:
        if m not in IMPORTANCE_METHODS:
            raise argparse.ArgumentTypeError(f"unknown importance {m!r}; choose from {', '.join(IMPORTANCE_METHODS)}")
    if not out:
        raise argparse.ArgumentTypeError("no importance method given")
    return list(dict.fromkeys(out))


def _exclude_list(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _alpha(text: str) -> float:
    """A number in [0, 1] (alpha, gamma)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return v


def _positive(text: str) -> float:
    v = float(text)
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``python -m s2h oneshot``."""
    add_data_arguments(p)
    m = p.add_argument_group("models")
    m.add_argument("--teacher", default=None,
                   help="teacher architecture: small_cnn_teacher (default for digits), resnet50 (default "
                        "otherwise) or any torchvision model name")
    m.add_argument("--student", default=None,
                   help="student architecture: small_cnn_student (default for digits), resnet18 (default otherwise)")
    m.add_argument("--teacher-ckpt", default=None, help="state_dict of a trained teacher (skips teacher training)")
    m.add_argument("--student-ckpt", default=None, help="state_dict to initialise the student from")
    t = p.add_argument_group("training")
    t.add_argument("--teacher-epochs", type=int, default=15, help="CE epochs for the teacher when no --teacher-ckpt")
    t.add_argument("--distill-epochs", type=int, default=15, help="KD epochs for the dense student")
    t.add_argument("--retrain-epochs", type=int, default=10, help="fixed-mask retraining epochs per sparsity")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    t.add_argument("--lr", type=_positive, default=0.05, help="peak learning rate (cosine schedule)")
    t.add_argument("--retrain-lr", type=_positive, default=None, help="retraining learning rate (default --lr)")
    t.add_argument("--momentum", type=float, default=0.9)
    t.add_argument("--weight-decay", type=float, default=5e-4)
    k = p.add_argument_group("distillation and pruning")
    k.add_argument("--alpha", type=_alpha, default=0.5, help="weight of CA-KLD in alpha*CA-KLD + (1-alpha)*CE")
    k.add_argument("--temperature", type=_positive, default=4.0, help="CA-KLD temperature T")
    k.add_argument("--gamma", type=_alpha, default=None,
                   help="CA-KLD direction mix (default: the teacher's mean top-1 probability per batch)")
    k.add_argument("--no-standardize", action="store_true", help="do not standardise logits per row in CA-KLD")
    k.add_argument("--kd-scale", type=float, default=None,
                   help="factor on CA-KLD in the loss (default T^2, Hinton's convention; 1 for the bare KL)")
    k.add_argument("--sparsity", type=_sparsity_list, default=[0.9],
                   help="fraction of prunable weights removed, or a comma list (0.5,0.75,0.9,0.95,0.98)")
    k.add_argument("--importance", type=_method_list, default=["grad-kd"],
                   help="magnitude | grad-ce | grad-kd, or a comma list to compare them on the same dense student")
    k.add_argument("--importance-batches", type=int, default=16, help="batches the gradient importance averages over")
    k.add_argument("--accumulate", choices=("abs", "grad"), default="abs",
                   help="average per-batch |theta*g| (abs) or the gradients (grad) over the importance batches")
    k.add_argument("--scope", choices=("global", "layer"), default="global", help="one global threshold, or per layer")
    k.add_argument("--exclude", type=_exclude_list, default=DEFAULT_EXCLUDE,
                   help="layers never pruned: comma list of 'first conv', 'classifier', module names or "
                        "patterns (layer4.*); 'none' prunes all (default: 'first conv,classifier')")
    k.add_argument("--no-kd-retrain", action="store_true", help="retrain the pruned student with CE only")
    k.add_argument("--recalibrate-bn", type=int, default=0, metavar="BATCHES",
                   help="also report the pruned student's accuracy before retraining with BatchNorm statistics "
                        "re-estimated on this many training batches (on a copy; retraining is unaffected)")
    o = p.add_argument_group("run")
    o.add_argument("--out", default=None, help="output folder (default runs/oneshot-<data>)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    o.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's choice)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")


class _Log:
    def __init__(self, path: Path | None):
        self.path = path

    def __call__(self, msg: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def _load_state(model: nn.Module, path: str, what: str) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"oneshot: {what} checkpoint {path} does not exist") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"oneshot: the {what} checkpoint {path} does not fit the {what} architecture "
                         f"(different model or class count?): {str(e).splitlines()[-1].strip()}") from None


def _device(args) -> torch.device:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"oneshot: --device {args.device} asked for, but no CUDA GPU is available")
    return device


def _teacher(args, data, arch: str, device, out: Path, opt: dict, log) -> tuple[nn.Module, dict]:
    """The teacher, trained with CE or loaded from --teacher-ckpt; its summary entry."""
    info = data.info
    teacher = build_model(arch, info.num_classes, info.in_channels, info.image_size).to(device)
    t0 = time.perf_counter()
    if args.teacher_ckpt:
        _load_state(teacher, args.teacher_ckpt, "teacher")
        hist = []
    else:
        hist = train_cross_entropy(teacher, data.train, args.teacher_epochs, lr=args.lr, desc="teacher", **opt)
        torch.save({k: v.cpu() for k, v in teacher.state_dict().items()}, out / "teacher.pt")
    teacher.eval()
    acc = evaluate(teacher, data.test, device)
    log(f"teacher {arch}: top-1 {acc['top1']:.2f}%")
    return teacher, {"arch": arch, "params": sum(p.numel() for p in teacher.parameters()), "top1": acc["top1"],
                     "epochs": len(hist), "seconds": time.perf_counter() - t0}


def _student(args, data, arch: str, teacher, device, out: Path, spec: dict, opt: dict, kd: dict, log):
    """The dense student, distilled from the teacher (CE only when --alpha 0); its summary entry."""
    info = data.info
    student = build_model(arch, info.num_classes, info.in_channels, info.image_size).to(device)
    if args.student_ckpt:
        _load_state(student, args.student_ckpt, "student")
    _check_same_classes(teacher, student, data.train, device)
    t0 = time.perf_counter()
    if args.alpha > 0:
        hist = distill(student, teacher, data.train, args.distill_epochs, lr=args.lr, **kd, **opt)
    else:
        hist = train_cross_entropy(student, data.train, args.distill_epochs, lr=args.lr, desc="student", **opt)
    acc = evaluate(student, data.test, device)
    n_prunable = sum(p.numel() for p in prunable_weights(student, args.exclude).values())
    torch.save({k: v.cpu() for k, v in student.state_dict().items()}, out / "student_dense.pt")
    (out / "student_dense.json").write_text(json.dumps({"spec": spec}, indent=2) + "\n")
    log(f"dense student {arch}: top-1 {acc['top1']:.2f}% ({n_prunable} prunable weights)")
    return student, {"arch": arch, "params": sum(p.numel() for p in student.parameters()),
                     "prunable_weights": n_prunable, "top1": acc["top1"], "epochs": len(hist),
                     "seconds": time.perf_counter() - t0}


def _scores(args, method: str, student, teacher, data, device, progress: bool) -> dict:
    # Importance batches drawn by their own seeded generator, anew per method: every method sees
    # the same batches, and the same dense student gets the same scores whatever ran before
    # (teacher training, distillation or a checkpoint instead, other methods).
    score_loader = torch.utils.data.DataLoader(
        data.train.dataset, batch_size=data.train.batch_size, shuffle=True, num_workers=data.train.num_workers,
        generator=torch.Generator().manual_seed(args.seed + 1), pin_memory=data.train.pin_memory)
    extra = {} if method == "magnitude" else dict(
        gamma=args.gamma, standardize=not args.no_standardize, kd_scale=args.kd_scale, accumulate=args.accumulate,
        device=device, progress=progress)
    return compute_importance(method, student, teacher, score_loader, alpha=args.alpha, temperature=args.temperature,
                              batches=args.importance_batches, exclude=args.exclude, **extra)


def _prune_one(args, method: str, sparsity: float, student, scores, retrain_teacher, data, device, out: Path,
               spec: dict, opt: dict, kd: dict, log) -> dict:
    """Prune the dense student to one sparsity, retrain, save; the run's summary entry."""
    t0 = time.perf_counter()
    masks = prune(student, scores, sparsity, exclude=args.exclude, scope=args.scope)
    before = evaluate(student, data.test, device)
    before_bn = None
    if args.recalibrate_bn > 0:
        recalibrated = copy.deepcopy(student)
        recalibrate_bn(recalibrated, data.train, args.recalibrate_bn, device)
        before_bn = evaluate(recalibrated, data.test, device)
    hist = retrain(student, masks, data.train, args.retrain_epochs, teacher=retrain_teacher,
                   lr=args.retrain_lr or args.lr, **kd, **opt)
    after = evaluate(student, data.test, device)
    rep = sparsity_report(student, masks)
    rel = Path(method) / f"sparsity_{sparsity:g}"
    save_pruned(out / rel, student, masks, spec=spec, extra={"importance": method, "top1": after["top1"]})
    run = {"importance": method, "sparsity": sparsity, "pruned": rep["pruned"], "prunable": rep["numel"],
           "actual_sparsity": rep["sparsity"], "top1_pruned": before["top1"], "top1_retrained": after["top1"],
           "retrain_kd": retrain_teacher is not None, "retrain_epochs": len(hist),
           "seconds": time.perf_counter() - t0, "path": str(rel),
           "layers": {k: v["sparsity"] for k, v in rep["layers"].items()}}
    bn_note = ""
    if before_bn is not None:
        run["top1_pruned_bn_recalibrated"] = before_bn["top1"]
        bn_note = f" ({before_bn['top1']:.2f}% with BN recalibrated)"
    log(f"{method:>9s} sparsity {sparsity:.2%}: pruned {rep['pruned']}/{rep['numel']} -> top-1 {before['top1']:.2f}% "
        f"before retraining{bn_note}, {after['top1']:.2f}% after {'KD ' if run['retrain_kd'] else ''}retraining")
    return run


def main(args: argparse.Namespace) -> dict:
    """Run the one-shot pipeline; returns the summary written to ``<out>/summary.json``."""
    t_start = time.perf_counter()
    if args.importance_batches < 1:
        raise SystemExit("oneshot: --importance-batches must be positive")
    out = Path(args.out or f"runs/oneshot-{args.data}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text("")
    log = _Log(out / "log.txt")
    progress = not args.no_progress
    device = _device(args)
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = loaders_from_args(args)
    info = data.info
    digits = info.name == "digits"
    teacher_arch = args.teacher or ("small_cnn_teacher" if digits else "resnet50")
    student_arch = args.student or ("small_cnn_student" if digits else "resnet18")
    spec = {"arch": student_arch, "num_classes": info.num_classes, "in_channels": info.in_channels,
            "image_size": info.image_size}
    log(f"oneshot: data={info.name} ({len(data.train.dataset)} train / {len(data.test.dataset)} test, "
        f"{info.num_classes} classes, {info.in_channels}x{info.image_size}x{info.image_size}) device={device} "
        f"teacher={teacher_arch} student={student_arch}")
    opt = dict(optimizer_name=args.optimizer, momentum=args.momentum, weight_decay=args.weight_decay,
               device=device, progress=progress)
    kd = dict(alpha=args.alpha, temperature=args.temperature, gamma=args.gamma, standardize=not args.no_standardize,
              kd_scale=args.kd_scale)
    summary: dict = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
        "dataset": {"name": info.name, "num_classes": info.num_classes, "in_channels": info.in_channels,
                    "image_size": info.image_size, "train_samples": len(data.train.dataset),
                    "test_samples": len(data.test.dataset)},
        "device": str(device), "torch": torch.__version__,
    }
    teacher, summary["teacher"] = _teacher(args, data, teacher_arch, device, out, opt, log)
    student, summary["student_dense"] = _student(args, data, student_arch, teacher, device, out, spec, opt, kd, log)
    dense_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    runs = []
    retrain_teacher = None if args.no_kd_retrain else teacher
    for method in args.importance:
        t0 = time.perf_counter()
        student.load_state_dict(dense_state)
        scores = _scores(args, method, student, teacher, data, device, progress)
        score_seconds = time.perf_counter() - t0
        for s in args.sparsity:
            student.load_state_dict(dense_state)
            run = _prune_one(args, method, s, student, scores, retrain_teacher, data, device, out, spec, opt, kd, log)
            run["importance_seconds"] = score_seconds
            runs.append(run)
    summary["runs"] = runs
    summary["seconds_total"] = time.perf_counter() - t_start
    if len(args.sparsity) > 1:
        plot_accuracy_vs_sparsity(runs, out / "accuracy_vs_sparsity.png", teacher=summary["teacher"]["top1"],
                                  dense=summary["student_dense"]["top1"],
                                  title=f"{student_arch} on {info.name} (teacher {teacher_arch})")
        summary["plot"] = "accuracy_vs_sparsity.png"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out / 'summary.json'} ({summary['seconds_total']:.1f} s)")
    return summary


def _check_same_classes(teacher: nn.Module, student: nn.Module, loader, device) -> None:
    x, _ = next(iter(iterate_batches(loader, "oneshot")))
    x = x[:2].to(device)
    with torch.no_grad():
        was_t, was_s = teacher.training, student.training
        teacher.eval(), student.eval()
        ct, cs = teacher(x).shape[-1], student(x).shape[-1]
        teacher.train(was_t), student.train(was_s)
    if ct != cs:
        raise ValueError(f"oneshot: the teacher has {ct} classes but the student has {cs}")
