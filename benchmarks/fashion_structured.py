"""Structured pruning on Fashion-MNIST: S2H against dense, uniform width and Torch-Pruning.

    python benchmarks/fashion_structured.py                 # the default study (about 90 min, 2 cores)
    python benchmarks/fashion_structured.py --smoke         # the pipeline end to end in under a minute
    python benchmarks/fashion_structured.py --epochs 30 --seeds 3 --n-train 60000   # larger
    python benchmarks/fashion_structured.py --curve 4 8 16  # the budget curve: S2H and its peers at E = 4, 8, 16

Writes ``benchmarks/results/fashion_structured.md`` and ``fashion_structured.png``. Finished rows
are kept under ``--work`` (one JSON file and one model file per run), so a study cut short
resumes where it stopped. The protocol is written at the top of the results file.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_common as fc  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The settings S2H runs with here (the library defaults; benchmarks/results/fashion_s2h_settings.md), passed
# explicitly so the table says what ran: θ coefficients 1 and 1, the resource loss on the hard
# network's FLOPs, Adam on the masks.
S2H_SETTINGS = {"ce_coef": 1.0, "gap_coef": 1.0, "resource_target": "hard", "mask_optimizer": ("adam", 0.02)}
TAYLOR_BATCHES = 8  # gradient batches accumulated for GroupTaylorImportance
TABLE5_NAMES = {1: "+ G_soft→θ (the term the paper blocks)", 2: "full method", 3: "− G_hard→θ",
                4: "− L→θ (no CE on θ)", 5: "− L→u, − G→u (masks by the resource loss alone)"}


@dataclass(frozen=True)
class Study:
    epochs: int = 8
    seeds: tuple[int, ...] = (0, 1)
    n_train: int | None = 12000
    n_test: int | None = None
    targets: tuple[float, ...] = (0.15, 0.30)
    depth: int = 20
    workers: int = 2
    work: Path = Path("runs/fashion_structured")
    s2h: dict = field(default_factory=lambda: dict(S2H_SETTINGS))  # S2HPruner keyword arguments
    table5: bool = True
    latency: bool = True


@dataclass(frozen=True)
class Job:
    method: str                 # dense | uniform | tp-magnitude | tp-taylor | s2h | s2h-arch
    seed: int
    target: float = 1.0
    pretrain: int = 0           # Torch-Pruning: dense epochs before pruning
    epochs: int = 0             # training (or fine-tuning) epochs of this run
    table5_row: int = 0         # S2H: a Table 5 row other than the default (2)

    @property
    def key(self) -> str:
        k = f"{self.method}-t{round(100 * self.target)}-s{self.seed}-e{self.epochs}"
        if self.pretrain:
            k += f"-pre{self.pretrain}"
        if self.table5_row:
            k += f"-table5row{self.table5_row}"
        return k


# ------------------------------------------------------------------------------------------------
# the network


def resnet(depth: int, widths=(16, 32, 64)) -> nn.Module:
    """A CIFAR ResNet (3x3 stem, three stages) for 1-channel 28x28 images, 10 classes."""
    import s2h

    return s2h.models.build_model(f"resnet{depth}", num_classes=10, in_channels=1, image_size=28,
                                  widths=tuple(widths))


def reinit(net: nn.Module, seed: int) -> nn.Module:
    """Fresh weights, initialised as the CIFAR ResNets are (Kaiming fan-out convs, default BN/linear)."""
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.Linear)):
            m.reset_parameters()
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
    return net


def uniform_widths(depth: int, target: float) -> tuple[int, ...]:
    """Stage widths 16/32/64 scaled by one factor, rounded, with MACs closest to ``target``."""
    dense = fc.macs(resnet(depth))

    def widths(s: float) -> tuple[int, ...]:
        return tuple(max(1, round(c * s)) for c in (16, 32, 64))

    lo, hi = 0.0, 1.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fc.macs(resnet(depth, widths(mid))) / dense <= target else (lo, mid)
    return min({widths(lo), widths(hi)}, key=lambda w: abs(fc.macs(resnet(depth, w)) / dense - target))


# ------------------------------------------------------------------------------------------------
# Torch-Pruning


def tp_prune(net: nn.Module, importance: str, target: float, data: fc.FashionData, seed: int) -> nn.Module:
    """Global channel pruning with Torch-Pruning's MetaPruner; the ratio bisected so MACs hit ``target``."""
    import torch_pruning as tp

    example = torch.zeros(1, 1, 28, 28)
    dense = fc.macs(net)

    scored = copy.deepcopy(net)
    if importance == "taylor":  # the gradients GroupTaylorImportance reads, computed once
        scored.train()
        for i, (_, _, x, y) in enumerate(fc.training_batches(data, 1, seed)):
            if i == TAYLOR_BATCHES:
                break
            F.cross_entropy(scored(x), y).backward()

    def pruned(ratio: float) -> nn.Module:
        m = copy.deepcopy(net)
        imp = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "magnitude"
               else tp.importance.GroupTaylorImportance())
        linears = [mod for mod in m.modules() if isinstance(mod, nn.Linear)]
        pruner = tp.pruner.MetaPruner(m, example, importance=imp, global_pruning=True, pruning_ratio=ratio,
                                      max_pruning_ratio=0.95, ignored_layers=linears)
        grads = dict(scored.named_parameters())
        for name, prm in m.named_parameters():  # the Taylor gradients, after the pruner's own trace
            g = grads[name].grad
            prm.grad = None if g is None else g.clone()
        pruner.step()
        m.zero_grad(set_to_none=True)
        return m

    lo, hi = 0.0, 0.95
    best = (abs(1.0 - target), net)
    for _ in range(18):
        mid = (lo + hi) / 2
        m = pruned(mid)
        f = fc.macs(m) / dense
        if abs(f - target) < best[0]:
            best = (abs(f - target), m)
        if f > target:
            lo = mid
        else:
            hi = mid
        if best[0] < 0.002:
            break
    return best[1]


# ------------------------------------------------------------------------------------------------
# S2H


def table5_rows() -> tuple[dict, ...]:
    """The rows of the paper's Table 5 as s2h defines them (terms on/off, the paper's top-1)."""
    try:
        from s2h.structured.step import TABLE5
    except ImportError:  # before the package layout of the redesign
        from s2h.trainer import TABLE5
    return TABLE5


def s2h_train(job: Job, study: Study, data: fc.FashionData) -> tuple[nn.Module, dict]:
    import s2h

    torch.manual_seed(job.seed)
    net = resnet(study.depth)
    model = s2h.convert(net, torch.zeros(2, 1, 28, 28), target_flops=job.target, inplace=True)
    model.train()
    kwargs = dict(study.s2h)
    mask_opt = kwargs.pop("mask_optimizer", None)
    if mask_opt is not None:  # (name, lr): the optimizer is built here, over this model's masks
        name, mask_lr = mask_opt
        cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[name]
        kwargs["mask_optimizer"] = cls(model.mask_parameters(), lr=mask_lr)
    if job.table5_row:
        row = next(r for r in table5_rows() if r["row"] == job.table5_row)
        kwargs.update(ablate=row["ablate"], enable=row["enable"])
    opt = fc.sgd(model.weight_parameters())
    pruner = s2h.S2HPruner(model, opt, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fc.cosine(job.epochs * fc.steps_per_epoch(data)))
    stats = {}
    for _, _, x, y in fc.training_batches(data, job.epochs, job.seed):
        stats = pruner.step(x, y)
        sched.step()
    soft_top1 = fc.accuracy(model, data.x_test, data.y_test)
    exported = model.export()
    keep = stats.get("keep")
    keep = list(keep.values()) if isinstance(keep, dict) else [int(k) for k in keep]
    return exported, {"soft_top1": soft_top1, "keep": keep, "settings": {k: str(v) for k, v in study.s2h.items()}}


# ------------------------------------------------------------------------------------------------
# one run


def run_job(args: tuple[Job, Study]) -> dict:
    job, study = args
    store = fc.ResultStore(study.work)
    done = store.result_or_claim(job.key)  # another study process may be running it: then its result
    if done is not None:
        return done
    t0, c0 = time.perf_counter(), time.process_time()
    data = fc.load_fashion(study.n_train, n_test=study.n_test)
    extra: dict = {}
    if job.method == "dense":
        torch.manual_seed(job.seed)
        net = fc.train_supervised(resnet(study.depth), data, job.epochs, job.seed)
    elif job.method == "uniform":
        torch.manual_seed(job.seed)
        w = uniform_widths(study.depth, job.target)
        net = fc.train_supervised(resnet(study.depth, w), data, job.epochs, job.seed)
        extra["widths"] = list(w)
    elif job.method.startswith("tp-"):
        pre_job = Job("dense", job.seed, epochs=job.pretrain)
        pre_row = store.get(pre_job.key)
        pre = torch.load(model_path(study, pre_job), weights_only=False)
        net = tp_prune(pre, job.method[3:], job.target, data, job.seed)
        net = fc.train_supervised(net, data, job.epochs, job.seed + 1000)
        extra["pretrain_wall_s"] = pre_row["wall_s"]
        if "cpu_s" in pre_row:
            extra["pretrain_cpu_s"] = pre_row["cpu_s"]
    elif job.method == "s2h":
        net, extra = s2h_train(job, study, data)
    elif job.method == "s2h-arch":
        src = torch.load(model_path(study, Job("s2h", job.seed, job.target, epochs=job.epochs)), weights_only=False)
        net = fc.train_supervised(reinit(src, job.seed), data, job.epochs, job.seed)
    else:
        raise ValueError(f"unknown method {job.method}")
    torch.save(net, model_path(study, job))
    dense_macs = fc.macs(resnet(study.depth))
    result = {"key": job.key, "method": job.method, "seed": job.seed, "target": job.target,
              "epochs": job.epochs, "pretrain": job.pretrain, "table5_row": job.table5_row,
              "top1": fc.accuracy(net, data.x_test, data.y_test), "macs": fc.macs(net),
              "flops_frac": fc.macs(net) / dense_macs, "params": fc.params(net),
              "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, **extra}
    store.put(job.key, result)
    return result


def model_path(study: Study, job: Job) -> Path:
    # Models are whole pickled modules written by this script into its own work folder (Torch-Pruning
    # changes every layer's shape), so they are read back with weights_only=False.
    return Path(study.work) / f"{job.key}.pt"


def plan(study: Study) -> list[list[Job]]:
    """Phases of jobs; a phase needs the models of the phases before it. The rows of the main
    table come first, Table 5 last, so a study cut short has its main table."""
    E, half = study.epochs, max(1, study.epochs // 2)
    first = [Job("dense", s, epochs=E) for s in study.seeds]
    first += [Job("dense", s, epochs=half) for s in study.seeds if half != E]
    first += [Job("s2h", s, t, epochs=E) for t in study.targets for s in study.seeds]
    first += [Job("uniform", s, t, epochs=E) for t in study.targets for s in study.seeds]
    second = [Job(f"tp-{imp}", s, t, pretrain=pre, epochs=ft) for pre, ft in ((half, E - half), (E, E))
              for imp in ("magnitude", "taylor") for t in study.targets for s in study.seeds]
    second += [Job("s2h-arch", s, t, epochs=E) for t in study.targets for s in study.seeds]
    third = [Job("s2h", study.seeds[0], study.targets[0], epochs=E, table5_row=r) for r in (1, 3, 4, 5)]
    return [first, second] + ([third] if study.table5 else [])


CURVE_METHODS = ("uniform", "tp-magnitude", "s2h")


def curve_plan(study: Study, budgets: list[int]) -> list[list[Job]]:
    """The budget curve: uniform width, Torch-Pruning (GroupMagnitude, dense E/2 + fine-tune E/2) and S2H at
    every budget E, both targets, every seed. Runs share the main study's work folder and keys, so the
    points at the main study's E are its own rows. The longest runs go first, to balance the workers."""
    first, second = [], []
    for E in sorted(budgets, reverse=True):
        half = max(1, E // 2)
        first += [Job("s2h", s, t, epochs=E) for t in study.targets for s in study.seeds]
        first += [Job("uniform", s, t, epochs=E) for t in study.targets for s in study.seeds]
        first += [Job("dense", s, epochs=half) for s in study.seeds]
        second += [Job("tp-magnitude", s, t, pretrain=half, epochs=E - half) for t in study.targets for s in study.seeds]
    return [list(dict.fromkeys(first)), second]


def run_phases(study: Study, phases: list[list[Job]], report_only: bool, only: int | None = None) -> list[dict]:
    """The results of the phases' jobs: run (in parallel; finished ones are read back), or with
    ``report_only`` only those already finished. ``only``: run just that phase."""
    results = []
    for i, phase in enumerate(phases):
        if report_only:
            results += fc.ResultStore(study.work).finished(j.key for j in phase)
        elif only is None or only == i:
            results += fc.run_parallel(run_job, [(j, study) for j in phase], study.workers)
    return results


def measure_latency(study: Study, results: list[dict], rounds: int = 25) -> None:
    """Latency of every exported model after training, 1 thread, in this process: the models are timed
    in interleaved rounds (one call each per round) and each gets its minimum, so a busy moment of the
    machine falls on all of them alike."""
    store = fc.ResultStore(study.work)
    todo = list(results)  # all of them, every time: latencies are only comparable within one pass
    nets = [torch.load(Path(study.work) / f"{r['key']}.pt", weights_only=False).eval() for r in todo]
    for batch, name, n in ((1, "latency_b1_ms", rounds), (64, "latency_b64_ms", max(5, rounds // 3))):
        times = fc.interleaved_latency_ms(nets, batch, n)
        for r, t in zip(todo, times):
            r[name] = t
    for r in todo:
        store.put(r["key"], r)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=Study.epochs, help="the budget E of every method (default 8)")
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (default 2)")
    p.add_argument("--n-train", type=int, default=Study.n_train,
                   help="fixed training subset (default 12000; 60000 = all)")
    p.add_argument("--depth", type=int, default=Study.depth, help="CIFAR ResNet depth (default 20)")
    p.add_argument("--targets", type=float, nargs="+", default=list(Study.targets))
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, 1 thread each (default 2)")
    p.add_argument("--work", default=str(Study.work), help="folder of finished runs (resumable)")
    p.add_argument("--results", default=str(RESULTS), help="where the .md and .png go")
    p.add_argument("--no-table5", action="store_true")
    p.add_argument("--phase", type=int, default=None,
                   help="run only this phase (0: dense, S2H, uniform; 1: Torch-Pruning, S2H architecture; "
                        "2: Table 5), e.g. in a second process beside a running study")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs finished so far (a study cut short)")
    p.add_argument("--smoke", action="store_true", help="tiny subset, 1 epoch, 1 seed: checks the pipeline")
    p.add_argument("--curve", type=int, nargs="+", default=None, metavar="E",
                   help="instead of the study: the budget curve at these budgets E (writes fashion_structured_curve.md)")
    a = p.parse_args(argv)
    study = Study(epochs=a.epochs, seeds=tuple(range(a.seeds)), n_train=a.n_train, targets=tuple(a.targets),
                  depth=a.depth, workers=a.workers, work=Path(a.work), table5=not a.no_table5)
    if a.smoke:
        study = replace(study, epochs=2, seeds=(0,), n_train=384, n_test=300, depth=8, targets=(0.3,),
                        table5=False, workers=1)
    if a.curve:
        if min(a.curve) < 2:
            p.error("--curve: every budget must be at least 2 epochs (Torch-Pruning trains E/2, then fine-tunes E/2)")
        return run_curve(study, a.curve, Path(a.results), a.report_only)
    t0 = time.perf_counter()
    phases = plan(study)
    results = run_phases(study, phases, a.report_only, only=a.phase)
    if a.phase is not None:
        return
    if study.latency:
        measure_latency(study, results)
    from fashion_report import write_structured_report

    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    done = {r["key"] for r in results}
    missing = [j.key for phase in phases for j in phase if j.key not in done]
    write_structured_report(study, results, out / ("fashion_structured_smoke" if a.smoke else "fashion_structured"),
                            wall_s=None if a.report_only else time.perf_counter() - t0, missing=missing,
                            findings=None if a.smoke else RESULTS / "fashion_structured_findings.md")
    print(f"wrote {out / 'fashion_structured'}.md/.png in {time.perf_counter() - t0:.0f} s")


def run_curve(study: Study, budgets: list[int], out: Path, report_only: bool) -> None:
    from fashion_report import write_curve_report

    t0 = time.perf_counter()
    results = run_phases(study, curve_plan(study, budgets), report_only)
    # dense at every budget where the work folder has it (the main study's E, Torch-Pruning's E/2)
    results += fc.ResultStore(study.work).finished(Job("dense", s, epochs=E).key for E in budgets for s in study.seeds)
    out.mkdir(parents=True, exist_ok=True)
    write_curve_report(study, budgets, results, out / "fashion_structured_curve",
                       wall_s=None if report_only else time.perf_counter() - t0)
    print(f"wrote {out / 'fashion_structured_curve'}.md/.png in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
