"""Settings of ``python -m s2h prune``: the paper's presets (Appendix A), :class:`PruneConfig`, the options."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..data import DATASETS
from ..structured.step_base import BALANCES, TERMS

__all__ = ["PRESETS", "PruneConfig", "add_arguments", "config_from_args"]

# ------------------------------------------------------------------------------------------------ presets

#: The paper's training settings (Appendix A). ``batch_size`` is global (ImageNet: 512 over 4 GPUs).
#: ViT/Swin (A1, A4): AdamW, lr 3e-3 / 1e-3, wd 0.05, 10 warm-up epochs, θ coefficients 1 and 1.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar100-resnet50": dict(data="cifar100", model="resnet50", epochs=500, batch_size=64, lr=0.05,
                              weight_decay=3e-4, scheduler="cosine"),
    "cifar100-mbv3": dict(data="cifar100", model="mobilenet_v3_large", epochs=500, batch_size=64, lr=0.05,
                          weight_decay=3e-4, scheduler="cosine"),
    "cifar100-wrn28-10": dict(data="cifar100", model="wrn28_10", epochs=200, batch_size=128, lr=0.1,
                              weight_decay=5e-4, scheduler="cosine"),
    "tiny-imagenet-resnet50": dict(data="tiny-imagenet", model="resnet50", epochs=500, batch_size=64, lr=0.1,
                                   weight_decay=3e-4, scheduler="step", milestones=(250, 375)),
    "tiny-imagenet-mbv3": dict(data="tiny-imagenet", model="mobilenet_v3_large", epochs=500, batch_size=64,
                               lr=0.1, weight_decay=3e-4, scheduler="step", milestones=(250, 375)),
    "tiny-imagenet-wrn28-10": dict(data="tiny-imagenet", model="wrn28_10", epochs=200, batch_size=128, lr=0.2,
                                   weight_decay=1e-4, scheduler="step", milestones=(100, 150)),
    "imagenet-resnet50": dict(data="imagefolder", model="resnet50", epochs=200, batch_size=512, lr=0.2,
                              weight_decay=1e-4, scheduler="cosine", image_size=224, num_workers=8),
    "cifar100-vit": dict(data="cifar100", model="vit_cifar", epochs=200, batch_size=128, optimizer="adamw", lr=3e-3,
                         weight_decay=0.05, scheduler="cosine", warmup_epochs=10, ce_coef=1.0, gap_coef=1.0),
    "cifar100-swin": dict(data="cifar100", model="swin_cifar", epochs=200, batch_size=128, optimizer="adamw", lr=1e-3,
                          weight_decay=0.05, scheduler="cosine", warmup_epochs=10, ce_coef=1.0, gap_coef=1.0),
    # not from the paper: the CIFAR ResNet-56 used by this package's benchmarks
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
    mask_optimizer: str = "adam"
    mask_lr: float = 0.02
    ce_coef: float = 0.5
    gap_coef: float = 5.0
    resource_coef: float = 5.0
    resource_target: str = "soft"
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the paper's settings (Appendix A); explicit options override them")
    p.add_argument("--out", required=True, help="output folder (log, checkpoint, pruned model, plots)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help="resnet20/32/44/56/110 (CIFAR), wrn28_10, small_cnn, vit_cifar, "
                                                 "swin_cifar, or a torchvision model name (default resnet56)")
    m.add_argument("--widths", type=int, nargs=3, default=None, help="stage widths of a CIFAR ResNet")
    m.add_argument("--target-flops", type=_fraction, default=0.15, help="FLOPs budget, fraction of dense")
    m.add_argument("--divisor", type=int, default=1, help="channels per mask bucket")
    m.add_argument("--hard-width", choices=("threshold", "expected"), default="threshold")
    m.add_argument("--mask-temperature", type=float, default=1.0, help="tau of the softmax over buckets")
    d = p.add_argument_group("data")
    d.add_argument("--data", choices=DATASETS, default=None, help="dataset (default digits)")
    d.add_argument("--data-dir", default=None, help="folder holding the dataset (default $S2H_DATA or ./data)")
    d.add_argument("--download", action="store_true", help="download cifar10/cifar100/tiny-imagenet if missing")
    d.add_argument("--image-size", type=int, default=None, help="square input size (digits: 32 by default)")
    d.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the dataset's)")
    d.add_argument("--no-augment", action="store_true", help="no random crop/flip")
    d.add_argument("--max-train-samples", type=int, default=None)
    d.add_argument("--max-test-samples", type=int, default=None)
    d.add_argument("--workers", dest="num_workers", type=int, default=None, help="DataLoader workers")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None)
    o.add_argument("--batch-size", type=int, default=None, help="global batch (split across torchrun processes)")
    o.add_argument("--optimizer", choices=("sgd", "adamw"), default=None)
    o.add_argument("--lr", type=float, default=None)
    o.add_argument("--momentum", type=float, default=None)
    o.add_argument("--weight-decay", type=float, default=None)
    o.add_argument("--scheduler", choices=("cosine", "step", "constant"), default=None)
    o.add_argument("--milestones", type=int, nargs="*", default=None, help="epochs of the step scheduler")
    o.add_argument("--lr-gamma", type=float, default=0.1)
    o.add_argument("--warmup-epochs", type=float, default=None)
    o.add_argument("--mask-optimizer", choices=("sgd", "adam"), default="adam")
    o.add_argument("--mask-lr", type=float, default=0.02)
    s = p.add_argument_group("S2H")
    s.add_argument("--ce-coef", type=float, default=None, help="beta (0.5 for CNNs, 1 for Transformers)")
    s.add_argument("--gap-coef", type=float, default=None, help="gamma (5 for CNNs, 1 for Transformers)")
    s.add_argument("--resource-coef", type=float, default=5.0)
    s.add_argument("--resource-target", choices=("soft", "hard"), default="soft",
                   help="R on the expected FLOPs (soft, the paper) or on the hard network's FLOPs with a "
                        "straight-through gradient (hard, the authors' demo)")
    s.add_argument("--temperature", type=float, default=1.0, help="T of the gap's softmaxes")
    s.add_argument("--balance", choices=BALANCES, default="paper")
    s.add_argument("--ablate", nargs="*", choices=TERMS, default=[], help="gradient terms to disable (Table 5)")
    s.add_argument("--enable", nargs="*", choices=["G_soft_theta"], default=[], help="G_soft_theta: Table 5 row 1")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    r.add_argument("--eval-every", type=int, default=1, help="evaluate on the test split every N epochs")
    r.add_argument("--recalibrate-bn", type=int, default=0,
                   help="re-estimate the hard network's BN statistics on N batches before export")
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
    for k in ("milestones", "ablate", "enable", "widths"):
        if kw.get(k) is not None:
            kw[k] = tuple(kw[k])
    if str(kw.get("model", PruneConfig.model)).lower().startswith(("vit_", "swin_")):  # Transformers (A4): 1 and 1
        kw.setdefault("ce_coef", 1.0)
        kw.setdefault("gap_coef", 1.0)
    return PruneConfig(**kw)
