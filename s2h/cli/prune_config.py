"""Settings of ``python -m s2h prune``: the paper's presets (Appendix A), :class:`PruneConfig`, the options."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..data import DATASETS
from ..structured.step_base import BALANCES, DEFAULTS, PAPER_SETTINGS, TERMS

__all__ = ["PRESETS", "PruneConfig", "add_arguments", "config_from_args"]

# ------------------------------------------------------------------------------------------------ presets

#: The paper's training settings (Appendix A). ``batch_size`` is global (ImageNet: 512 over 4 GPUs).
#: These presets keep the paper's S2H settings too, which are not the package defaults: CNNs
#: β = 0.5, γ = 5 (A4) and the resource loss on the expected FLOPs ("soft"); ViT/Swin (A1, A4):
#: AdamW, lr 3e-3 / 1e-3, wd 0.05, 10 warm-up epochs, β = γ = 1, "soft".
_PAPER_CNN = dict(PAPER_SETTINGS)
_PAPER_VIT = dict(PAPER_SETTINGS, ce_coef=1.0, gap_coef=1.0)
PRESETS: dict[str, dict[str, Any]] = {
    "cifar100-resnet50": dict(data="cifar100", model="resnet50", epochs=500, batch_size=64, lr=0.05,
                              weight_decay=3e-4, scheduler="cosine", **_PAPER_CNN),
    "cifar100-mbv3": dict(data="cifar100", model="mobilenet_v3_large", epochs=500, batch_size=64, lr=0.05,
                          weight_decay=3e-4, scheduler="cosine", **_PAPER_CNN),
    "cifar100-wrn28-10": dict(data="cifar100", model="wrn28_10", epochs=200, batch_size=128, lr=0.1,
                              weight_decay=5e-4, scheduler="cosine", **_PAPER_CNN),
    "tiny-imagenet-resnet50": dict(data="tiny-imagenet", model="resnet50", epochs=500, batch_size=64, lr=0.1,
                                   weight_decay=3e-4, scheduler="step", milestones=(250, 375), **_PAPER_CNN),
    "tiny-imagenet-mbv3": dict(data="tiny-imagenet", model="mobilenet_v3_large", epochs=500, batch_size=64,
                               lr=0.1, weight_decay=3e-4, scheduler="step", milestones=(250, 375), **_PAPER_CNN),
    "tiny-imagenet-wrn28-10": dict(data="tiny-imagenet", model="wrn28_10", epochs=200, batch_size=128, lr=0.2,
                                   weight_decay=1e-4, scheduler="step", milestones=(100, 150), **_PAPER_CNN),
    "imagenet-resnet50": dict(data="imagefolder", model="resnet50", epochs=200, batch_size=512, lr=0.2,
                              weight_decay=1e-4, scheduler="cosine", image_size=224, num_workers=8, **_PAPER_CNN),
    "cifar100-vit": dict(data="cifar100", model="vit_cifar", epochs=200, batch_size=128, optimizer="adamw", lr=3e-3,
                         weight_decay=0.05, scheduler="cosine", warmup_epochs=10, **_PAPER_VIT),
    "cifar100-swin": dict(data="cifar100", model="swin_cifar", epochs=200, batch_size=128, optimizer="adamw", lr=1e-3,
                          weight_decay=0.05, scheduler="cosine", warmup_epochs=10, **_PAPER_VIT),
    # not from the paper: the CIFAR ResNet-56 used by this package's benchmarks (package defaults)
    "cifar100-resnet56": dict(data="cifar100", model="resnet56", epochs=300, batch_size=64, lr=0.05,
                              weight_decay=3e-4, scheduler="cosine"),
}



@dataclass
class PruneConfig:
    """Every setting of a prune run (``summary.json`` and the checkpoint record it)."""

    out: str = "runs/prune"
    model: str = "resnet56"
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    num_classes: int | None = None
    augment: bool = True
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    num_workers: int = 0
    target_flops: float = 0.15
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 3e-4
    scheduler: str = "cosine"
    milestones: Sequence[int] = ()
    lr_gamma: float = 0.1
    warmup_epochs: float = 0.0
    mask_optimizer: str = DEFAULTS["mask_optimizer"]
    mask_lr: float = DEFAULTS["mask_lr"]
    ce_coef: float = DEFAULTS["ce_coef"]
    gap_coef: float = DEFAULTS["gap_coef"]
    resource_coef: float = DEFAULTS["resource_coef"]
    resource_target: str = DEFAULTS["resource_target"]
    temperature: float = 1.0
    balance: str = "paper"
    ablate: Sequence[str] = ()
    enable: Sequence[str] = ()
    divisor: int = 1
    hard_width: str = "threshold"
    mask_temperature: float = 1.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    eval_every: int = 1
    recalibrate_bn: int = 0
    progress: bool = True
    deterministic: bool = False
    preset: str | None = None
    stop_after: int | None = None
    latency: bool = False
    quiet: bool = False
    widths: Sequence[int] | None = None  # CIFAR ResNet stage widths (default 16, 32, 64)
    ignore: Sequence[str] = ()  # module names left unpruned (convert's ignored_layers)
    strict: bool = False  # convert(strict=True): refuse a model with a group S2H cannot prune
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not (isinstance(self.target_flops, (int, float)) and 0.0 < float(self.target_flops) <= 1.0):
            raise ValueError(f"prune: --target-flops must be a fraction in (0, 1], got {self.target_flops}")
        if self.epochs < 0:
            raise ValueError(f"prune: --epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"prune: --batch-size must be positive, got {self.batch_size}")
        if self.scheduler not in ("cosine", "step", "constant"):
            raise ValueError(f"prune: --scheduler must be cosine, step or constant, got {self.scheduler!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"prune: --optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.mask_optimizer not in ("sgd", "adam"):
            raise ValueError(f"prune: --mask-optimizer must be sgd or adam, got {self.mask_optimizer!r}")
        if self.lr <= 0 or self.mask_lr < 0:
            raise ValueError("prune: --lr must be > 0 and --mask-lr >= 0")
        if self.eval_every < 1:
            raise ValueError(f"prune: --eval-every must be >= 1, got {self.eval_every}")


# ------------------------------------------------------------------------------------------------ CLI

def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {s}")
    return v


def _d(name: str) -> str:
    """`` (default: X)`` from :class:`PruneConfig`: the options default to None so that a preset can
    fill them, and the help shows the value a run without preset gets, once."""
    return f" (default: {getattr(PruneConfig, name)})"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the paper's settings (Appendix A, with its S2H coefficients); explicit options override them")
    p.add_argument("--out", required=True, help="output folder (log, checkpoint, pruned model, plots)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt; with a larger --epochs, extend a finished run")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="resnet20/32/44/56/110 (CIFAR), wrn28_10, small_cnn, vit_cifar, "
                                                 "swin_cifar, a torchvision model name, or timm:NAME" + _d("model"))
    m.add_argument("--widths", type=int, nargs=3, default=None, help="stage widths of a CIFAR ResNet (default: 16 32 64)")
    m.add_argument("--ignore", nargs="+", default=None, metavar="NAME",
                   help="modules whose output channels stay unpruned (convert's ignored_layers)")
    m.add_argument("--strict", action="store_true",
                   help="refuse a model with a layer S2H cannot prune (default: prune what it can, keep the rest)")
    m.add_argument("--target-flops", type=_fraction, default=None, help="FLOPs budget, fraction of dense" + _d("target_flops"))
    m.add_argument("--divisor", type=int, default=None, help="channels per mask bucket" + _d("divisor"))
    m.add_argument("--hard-width", choices=("threshold", "expected"), default=None,
                   help="keep buckets with w >= mean(w), or ceil(E)" + _d("hard_width"))
    m.add_argument("--mask-temperature", type=float, default=None, help="tau of the softmax over buckets" + _d("mask_temperature"))
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=DATASETS, default=None, help="dataset" + _d("data"))
    d.add_argument("--data-dir", default=None, help="folder holding the dataset (default: $S2H_DATA or ./data)")
    d.add_argument("--download", action="store_true", help="download cifar10/cifar100/tiny-imagenet if missing")
    d.add_argument("--image-size", type=int, default=None, help="square input size (default: the dataset's; digits 32)")
    d.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the dataset's)")
    d.add_argument("--no-augment", action="store_true", help="no random crop/flip")
    d.add_argument("--max-train-samples", type=int, default=None, help="a seeded subset of the training split")
    d.add_argument("--max-test-samples", type=int, default=None, help="a seeded subset of the test split")
    d.add_argument("--workers", dest="num_workers", type=int, default=None, help="DataLoader workers" + _d("num_workers"))
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None, help="training epochs" + _d("epochs"))
    o.add_argument("--batch-size", type=int, default=None,
                   help="global batch, split across torchrun processes" + _d("batch_size"))
    o.add_argument("--optimizer", choices=("sgd", "adamw"), default=None, help="optimizer of the weights" + _d("optimizer"))
    o.add_argument("--lr", type=float, default=None, help="peak learning rate of the weights" + _d("lr"))
    o.add_argument("--momentum", type=float, default=None, help="SGD momentum" + _d("momentum"))
    o.add_argument("--weight-decay", type=float, default=None, help="weight decay" + _d("weight_decay"))
    o.add_argument("--scheduler", choices=("cosine", "step", "constant"), default=None,
                   help="LR schedule per iteration" + _d("scheduler"))
    o.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs of the step scheduler")
    o.add_argument("--lr-gamma", type=float, default=None, help="step scheduler factor" + _d("lr_gamma"))
    o.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up" + _d("warmup_epochs"))
    o.add_argument("--mask-optimizer", choices=("sgd", "adam"), default=None,
                   help="optimizer of the mask logits" + _d("mask_optimizer"))
    o.add_argument("--mask-lr", type=float, default=None, help="its learning rate" + _d("mask_lr"))
    s = p.add_argument_group("S2H")
    s.add_argument("--ce-coef", type=float, default=None, help="beta; the paper: 0.5 for CNNs, 1 for ViT/Swin" + _d("ce_coef"))
    s.add_argument("--gap-coef", type=float, default=None, help="gamma; the paper: 5 for CNNs, 1 for ViT/Swin" + _d("gap_coef"))
    s.add_argument("--resource-coef", type=float, default=None, help="coefficient of the FLOPs loss" + _d("resource_coef"))
    s.add_argument("--resource-target", choices=("soft", "hard"), default=None,
                   help="R on the hard network's FLOPs with a straight-through gradient (hard, the authors' demo) or "
                        "on the expected FLOPs (soft, the paper)" + _d("resource_target"))
    s.add_argument("--temperature", type=float, default=None, help="T of the gap's softmaxes" + _d("temperature"))
    s.add_argument("--balance", choices=BALANCES, default=None, help="mask-gradient balancing" + _d("balance"))
    s.add_argument("--ablate", nargs="*", choices=TERMS, default=None, help="gradient terms to disable (Table 5)")
    s.add_argument("--enable", nargs="*", choices=["G_soft_theta"], default=None, help="G_soft_theta: Table 5 row 1")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=None, help="seed of the weights, data order and augmentation" + _d("seed"))
    r.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N" + _d("device"))
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    r.add_argument("--eval-every", type=int, default=None, help="evaluate on the test split every N epochs" + _d("eval_every"))
    r.add_argument("--recalibrate-bn", type=int, default=None,
                   help="re-estimate the hard network's BN statistics on N batches before export" + _d("recalibrate_bn"))
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms (GPU)")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop after N epochs in this invocation (time-limited jobs); continue with --resume")
    r.add_argument("--latency", action="store_true", help="measure exported vs dense CPU latency at the end")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """Explicit options > the preset's values > :class:`PruneConfig` defaults."""
    preset = PRESETS.get(args.preset or "", {})
    kw = {}
    for f in dataclasses.fields(PruneConfig):
        v = getattr(args, f.name, None)
        if v is None and f.name in preset:
            v = preset[f.name]
        if v is not None:
            kw[f.name] = v
    kw["augment"] = not getattr(args, "no_augment", False)
    kw["progress"] = not getattr(args, "no_progress", False)
    for k in ("milestones", "ablate", "enable", "widths", "ignore"):
        if kw.get(k) is not None:
            kw[k] = tuple(kw[k])
    kw["strict"] = bool(getattr(args, "strict", False))
    return PruneConfig(**kw)
