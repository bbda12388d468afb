"""Teacher-guided one-shot unstructured pruning on Fashion-MNIST against the classic baselines.

    python benchmarks/fashion_oneshot.py                 # the default sweep (80 runs; see Study and the .md)
    python benchmarks/fashion_oneshot.py --smoke         # the pipeline end to end in under a minute
    python benchmarks/fashion_oneshot.py --epochs 10 --seeds 3 --n-train 60000   # larger

A dense CIFAR-style ResNet teacher (trained once, cached in ``--work``), a ``small_cnn_student`` per
seed distilled from it, then per (sparsity, seed): one-shot pruning by ``magnitude``, ``grad-ce``
and ``grad-kd`` (s2h.unstructured, one global threshold), PyTorch's
``torch.nn.utils.prune.global_unstructured`` with ``L1Unstructured``, and gradual magnitude pruning
(Zhu & Gupta's cubic schedule) over the retraining epochs; every one retrained for the same
epochs with KD and with CE only, through ``fashion_common.train_supervised`` (the same batches,
augmentation and SGD + cosine). Writes ``benchmarks/results/fashion_oneshot.md`` and ``.png``.
Finished runs are kept under ``--work`` (one JSON file and one pruned model per run): resumable.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_common as fc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("magnitude", "grad-ce", "grad-kd", "torch-l1", "gmp")
RETRAIN = ("kd", "ce")
GMP_END = 0.75          # gradual pruning reaches the final sparsity at 75% of the steps, then fine-tunes
GMP_UPDATES_PER_EPOCH = 4


@dataclass(frozen=True)
class Study:
    n_train: int | None = 8000
    n_test: int | None = None
    teacher_depth: int = 20
    teacher_epochs: int = 6
    student_epochs: int = 6        # KD of the dense student
    epochs: int = 3                # retraining epochs, every method
    seeds: tuple[int, ...] = (0, 1)
    sparsities: tuple[float, ...] = (0.90, 0.95, 0.98, 0.99)
    alpha: float = 0.5
    temperature: float = 4.0
    batches: int = 16              # importance batches
    lr: float = 0.05               # retraining (and student distillation) peak learning rate
    workers: int = 2
    work: Path = Path("runs/fashion_oneshot")
    importance_kw: tuple = ()      # extra s2h.unstructured.importance keywords, ((name, value), ...)


@dataclass(frozen=True)
class Job:
    method: str        # teacher | student | one of METHODS
    seed: int = 0
    sparsity: float = 0.0
    retrain: str = ""  # kd | ce

    @property
    def key(self) -> str:
        if self.method == "teacher":
            return "teacher"
        if self.method == "student":
            return f"student-s{self.seed}"
        return f"{self.method}-{self.retrain}-p{round(1000 * self.sparsity)}-s{self.seed}"


# ------------------------------------------------------------------------------------------------
# data, models and the cached teacher logits

_DATA: dict = {}


def data_for(study: Study) -> fc.FashionData:
    k = (study.n_train, study.n_test)
    if k not in _DATA:
        _DATA[k] = fc.load_fashion(study.n_train, n_test=study.n_test)
    return _DATA[k]


def teacher_net(depth: int) -> nn.Module:
    from fashion_structured import resnet
    return resnet(depth)


def student_net() -> nn.Module:
    from s2h.models import small_cnn_student
    return small_cnn_student(10, 1)


def load_model(study: Study, name: str, net: nn.Module) -> nn.Module:
    net.load_state_dict(torch.load(Path(study.work) / f"{name}.pt", weights_only=True))
    return net


def load_teacher(study: Study) -> nn.Module:
    return load_model(study, "teacher", teacher_net(study.teacher_depth)).eval()


@torch.no_grad()
def teacher_logits(study: Study, teacher: nn.Module, data: fc.FashionData, epochs: int, seed: int) -> dict:
    """The teacher's eval-mode logits for every step of ``training_batches(data, epochs, seed)``, cached
    on disk: every KD run with those batches reuses them (the batches are deterministic)."""
    path = Path(study.work) / f"tlogits-b{seed}-e{epochs}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    teacher.eval()
    logits, sums = [], []
    for _, _, x, _ in fc.training_batches(data, epochs, seed):
        logits.append(teacher(x))
        sums.append(x.double().sum())
    cache = {"logits": torch.stack(logits), "sums": torch.stack(sums)}
    tmp = path.with_suffix(".tmp")
    torch.save(cache, tmp)
    tmp.replace(path)
    return cache


def kd_loss_fn(cache: dict, study: Study):
    """``loss_fn(net, x, y)`` for train_supervised: the s2h total loss against the cached teacher logits
    of the step it is called for (calls are counted; each batch is checked against the cached sum)."""
    from s2h.unstructured import total_loss

    state = {"i": 0}

    def fn(net, x, y):
        i = state["i"]
        state["i"] += 1
        if i >= len(cache["sums"]) or abs(float(x.double().sum() - cache["sums"][i])) > 1e-3 * (1 + abs(float(cache["sums"][i]))):
            raise RuntimeError(f"kd_loss_fn: step {i} is not the batch the teacher logits were cached for")
        return total_loss(net(x), y, cache["logits"][i], study.alpha, study.temperature)

    return fn


def scoring_batches(data: fc.FashionData, study: Study, seed: int) -> list:
    out = []
    for i, (_, _, x, y) in enumerate(fc.training_batches(data, 1, seed + 2000)):
        if i == study.batches:
            break
        out.append((x, y))
    return out


# ------------------------------------------------------------------------------------------------
# pruning methods


def oneshot_masks(net: nn.Module, scores: dict, sparsity: float) -> dict:
    from s2h.unstructured import prune
    return prune(net, scores, sparsity)


def torch_l1(net: nn.Module, sparsity: float):
    """PyTorch's global L1 pruning over the same layers; returns (pruned param pairs, amount)."""
    import torch.nn.utils.prune as tprune
    from s2h.unstructured import prunable_weights

    names = list(prunable_weights(net))
    mods = dict(net.named_modules())
    pairs = [(mods[n.rsplit(".", 1)[0]], "weight") for n in names]
    amount = int(round(sparsity * sum(m.weight.numel() for m, _ in pairs)))
    tprune.global_unstructured(pairs, pruning_method=tprune.L1Unstructured, amount=amount)
    return names, pairs


def torch_l1_finish(names: list, pairs: list) -> dict:
    import torch.nn.utils.prune as tprune

    masks = {n: m.weight_mask.detach().bool().clone() for n, (m, _) in zip(names, pairs)}
    for m, p in pairs:
        tprune.remove(m, p)
    return masks


def gmp_sparsity(step: int, end: int, final: float) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - t/end)^3 with s_i = 0, reaching s_f at ``end``."""
    return final * (1.0 - (1.0 - min(step, end) / end) ** 3)


class GradualMagnitude:
    """after_step hook: global magnitude pruning on the cubic schedule every ``every`` steps up to
    ``end``, the mask re-applied after every step (pruned weights stay pruned)."""

    def __init__(self, net: nn.Module, final: float, total_steps: int, steps_per_epoch: int):
        from s2h.unstructured import prunable_weights
        self.net, self.final = net, final
        self.every = max(1, steps_per_epoch // GMP_UPDATES_PER_EPOCH)
        self.end = max(self.every, int(total_steps * GMP_END) // self.every * self.every)
        self.step = 0
        self.masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_weights(net).items()}

    def __call__(self) -> None:
        from s2h.unstructured import apply_masks, prune
        self.step += 1
        if self.step % self.every == 0 and self.step <= self.end:
            params = dict(self.net.named_parameters())
            scores = {n: torch.where(m, params[n].detach().abs(), torch.full_like(params[n], -1.0))
                      for n, m in self.masks.items()}
            self.masks = prune(self.net, scores, gmp_sparsity(self.step, self.end, self.final))
        apply_masks(self.net, self.masks)


# ------------------------------------------------------------------------------------------------
# the runs


def train_teacher(study: Study, data: fc.FashionData) -> dict:
    torch.manual_seed(0)
    net = fc.train_supervised(teacher_net(study.teacher_depth), data, study.teacher_epochs, seed=0)
    torch.save(net.state_dict(), Path(study.work) / "teacher.pt")
    return {"top1": fc.accuracy(net, data.x_test, data.y_test), "params": fc.params(net)}


def train_student(study: Study, data: fc.FashionData, seed: int) -> dict:
    """The dense student (KD from the teacher), its three importance scores, and the teacher logits of
    the retraining batches."""
    from s2h.unstructured import compute_importance

    teacher = load_teacher(study)
    torch.manual_seed(seed)
    net = student_net()
    cache = teacher_logits(study, teacher, data, study.student_epochs, seed)
    fc.train_supervised(net, data, study.student_epochs, seed, loss_fn=kd_loss_fn(cache, study), lr=study.lr)
    torch.save(net.state_dict(), Path(study.work) / f"student-s{seed}.pt")
    teacher_logits(study, teacher, data, study.epochs, seed + 1000)
    batches = scoring_batches(data, study, seed)
    kw = dict(study.importance_kw)
    for method in ("magnitude", "grad-ce", "grad-kd"):
        t0 = time.perf_counter()
        scores = compute_importance(method, net, teacher, batches, alpha=study.alpha,
                                    temperature=study.temperature, batches=study.batches, **kw)
        torch.save({"scores": scores, "seconds": time.perf_counter() - t0},
                   Path(study.work) / f"scores-{method}-s{seed}.pt")
    return {"top1": fc.accuracy(net, data.x_test, data.y_test), "params": fc.params(net)}


def prune_and_retrain(job: Job, study: Study, data: fc.FashionData) -> tuple[nn.Module, dict, dict]:
    net = load_model(study, f"student-s{job.seed}", student_net())
    loss_fn = None
    if job.retrain == "kd":
        loss_fn = kd_loss_fn(teacher_logits(study, load_teacher(study), data, study.epochs, job.seed + 1000), study)
    extra: dict = {}
    torch.manual_seed(job.seed + 1000)
    if job.method in ("magnitude", "grad-ce", "grad-kd"):
        from s2h.unstructured import apply_masks
        scores = torch.load(Path(study.work) / f"scores-{job.method}-s{job.seed}.pt", weights_only=True)["scores"]
        masks = oneshot_masks(net, scores, job.sparsity)
        extra["top1_oneshot"] = fc.accuracy(net, data.x_test, data.y_test)
        fc.train_supervised(net, data, study.epochs, job.seed + 1000, loss_fn=loss_fn,
                            after_step=lambda: apply_masks(net, masks), lr=study.lr)
    elif job.method == "torch-l1":
        names, pairs = torch_l1(net, job.sparsity)
        extra["top1_oneshot"] = fc.accuracy(net, data.x_test, data.y_test)
        fc.train_supervised(net, data, study.epochs, job.seed + 1000, loss_fn=loss_fn, lr=study.lr)
        masks = torch_l1_finish(names, pairs)
    elif job.method == "gmp":
        spe = fc.steps_per_epoch(data)
        hook = GradualMagnitude(net, job.sparsity, study.epochs * spe, spe)
        fc.train_supervised(net, data, study.epochs, job.seed + 1000, loss_fn=loss_fn, after_step=hook, lr=study.lr)
        masks = hook.masks
        extra["gmp_end_step"], extra["gmp_every"] = hook.end, hook.every
    else:
        raise ValueError(f"unknown method {job.method}")
    return net, masks, extra


def run_job(args: tuple[Job, Study]) -> dict:
    job, study = args
    store = fc.ResultStore(study.work)
    done = store.result_or_claim(job.key)
    if done is not None:
        return done
    t0 = time.perf_counter()
    data = data_for(study)
    base = {"key": job.key, "method": job.method, "seed": job.seed}
    if job.method == "teacher":
        result = {**base, **train_teacher(study, data)}
    elif job.method == "student":
        result = {**base, **train_student(study, data, job.seed)}
    else:
        from s2h.unstructured import save_pruned, sparsity_report
        net, masks, extra = prune_and_retrain(job, study, data)
        rep = sparsity_report(net, masks)
        save_pruned(Path(study.work) / job.key, net, masks,
                    spec={"arch": "small_cnn_student", "num_classes": 10, "in_channels": 1, "image_size": 28})
        result = {**base, "sparsity": job.sparsity, "retrain": job.retrain,
                  "top1": fc.accuracy(net, data.x_test, data.y_test), "pruned": rep["pruned"],
                  "prunable": rep["numel"], "zeros": rep["zeros"],
                  "layers": {k: v["sparsity"] for k, v in rep["layers"].items()}, **extra}
    result["wall_s"] = time.perf_counter() - t0
    store.put(job.key, result)
    return result


def plan(study: Study) -> list[list[Job]]:
    # seed-major, the high sparsities the goal is about first: a sweep cut short has one seed of them
    order = sorted(study.sparsities, key=lambda p: (p < 0.95, p))
    runs = [Job(m, s, p, r) for s in study.seeds for p in order for m in METHODS for r in RETRAIN]
    return [[Job("teacher")], [Job("student", s) for s in study.seeds], runs]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=Study.epochs, help="retraining epochs of every method (default 3)")
    p.add_argument("--student-epochs", type=int, default=Study.student_epochs)
    p.add_argument("--teacher-epochs", type=int, default=Study.teacher_epochs)
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (default 2)")
    p.add_argument("--n-train", type=int, default=Study.n_train, help="fixed training subset (default 8000; 60000 = all)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(Study.sparsities))
    p.add_argument("--workers", type=int, default=Study.workers, help="runs in parallel, 1 thread each (default 2)")
    p.add_argument("--work", default=str(Study.work), help="folder of finished runs (resumable)")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .png go")
    p.add_argument("--smoke", action="store_true", help="tiny subset, 1 seed, 2 sparsities: checks the pipeline")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs, run nothing")
    a = p.parse_args(argv)
    study = Study(n_train=a.n_train, teacher_epochs=a.teacher_epochs, student_epochs=a.student_epochs,
                  epochs=a.epochs, seeds=tuple(range(a.seeds)), sparsities=tuple(a.sparsities), workers=a.workers,
                  work=Path(a.work))
    if a.smoke:
        study = replace(study, n_train=640, n_test=500, teacher_depth=8, teacher_epochs=1, student_epochs=1,
                        epochs=2, seeds=(0,), sparsities=(0.9, 0.98), batches=2, workers=1)
    Path(study.work).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for phase in plan(study):
        if a.report_only:
            results += fc.ResultStore(study.work).finished(j.key for j in phase)
        else:
            results += fc.run_parallel(run_job, [(j, study) for j in phase], study.workers)
    from fashion_oneshot_report import write_report

    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("fashion_oneshot_smoke" if a.smoke else "fashion_oneshot")
    write_report(study, results, stem, wall_s=time.perf_counter() - t0)
    print(f"wrote {stem}.md/.png in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
