"""Named benchmark scenarios: an optional shipped config file plus dotted overrides (`mutualkd.config`).

All scenarios train on the `synthetic` dataset shaped like CIFAR-100 (3x32x32 images, 100 classes,
50,000 training images, no validation hold-out), so heads, memory banks (N = 50,000 rows per peer) and
negative sampling see CIFAR-100's shapes without needing the CIFAR files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# CIFAR-100-shaped synthetic data; 50k rows so the MCL-OKD banks have CIFAR-100's size.
CIFAR100_LIKE = [
    "data.name=synthetic",
    "data.root=null",
    "data.download=false",
    "data.val_split=0",
    "data.synthetic.num_classes=100",
    "data.synthetic.train_size=50000",
    "data.synthetic.test_size=100",
    "data.synthetic.image_size=32",
    "data.synthetic.channels=3",
    "data.num_workers=0",
    "train.progress=false",
    "tracking=none",
]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    overrides: list[str]
    config: str | None = None  # a YAML file the overrides apply to (None: the schema defaults)
    batch_size: int = 64
    # per-scenario defaults; the command line's --steps/--warmup/--rounds override them
    steps: int = 20
    warmup: int = 3
    rounds: int = 7
    groups: tuple[str, ...] = field(default_factory=tuple)  # aliases that select this scenario

    def config_path(self) -> str | None:
        return str(CONFIGS / self.config) if self.config else None


# Fashion-MNIST-shaped synthetic data (1x28x28, 10 classes, 60,000 training images), for the shipped FM recipes.
FASHION_LIKE = [o for o in CIFAR100_LIKE if not o.startswith("data.synthetic.")] + [
    "data.synthetic.num_classes=10",
    "data.synthetic.train_size=60000",
    "data.synthetic.test_size=100",
    "data.synthetic.image_size=28",
    "data.synthetic.channels=1",
]


def _peers(arch: str, n: int) -> str:
    return "peers=[" + ", ".join(f"{{arch: {arch}}}" for _ in range(n)) + "]"


def _dml_p(p: int) -> Scenario:
    return Scenario(
        name=f"dml_p{p}",
        description=f"{p} independent cifar_resnet32, CE + DML (P scaling)",
        overrides=CIFAR100_LIKE + [_peers("cifar_resnet32", p), "objective.terms=[{name: ce}, {name: dml}]"],
        groups=("p_scaling",),
        steps=20 if p < 8 else 12,
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            name="mcl_okd_k256",
            description="MCL-OKD: 4-branch cifar_resnet32, shared stem, CE + DOT + bank NCE, K=256",
            config="cifar100_mcl_okd.yaml",
            overrides=CIFAR100_LIKE + ["objective.terms.2.K=256"],
            groups=("mcl_okd",),
        ),
        Scenario(
            name="mcl_okd_k16384",
            description="MCL-OKD: 4-branch cifar_resnet32, shared stem, CE + DOT + bank NCE, K=16384",
            config="cifar100_mcl_okd.yaml",
            overrides=CIFAR100_LIKE + ["objective.terms.2.K=16384"],
            groups=("mcl_okd",),
            steps=5,
            warmup=2,
            rounds=5,
        ),
        Scenario(
            name="dml_mcl_x4",
            description="4 independent cifar_resnet32, CE + DML + MCL (MLP heads, 2 per class)",
            config="cifar100_mcl_x2.yaml",
            overrides=CIFAR100_LIKE + [_peers("cifar_resnet32", 4),
                                       "objective.terms=[{name: ce}, {name: dml}, {name: mcl}]"],
        ),
        Scenario(
            name="timm_resnet18_dml_x2",
            description="2 timm resnet18 (32x32 input), CE + DML, AdamW (timm_swap.yaml)",
            config="timm_swap.yaml",
            overrides=CIFAR100_LIKE + [_peers("resnet18", 2)],
        ),
        _dml_p(2),
        _dml_p(4),
        _dml_p(8),
        Scenario(
            name="dml_alternating_x2",
            description="2 independent cifar_resnet32, CE + DML with alternating updates (Algorithm 1)",
            overrides=CIFAR100_LIKE + [_peers("cifar_resnet32", 2),
                                       "objective.terms=[{name: ce}, {name: dml, update_mode: alternating}]"],
            groups=("dml_alternating",),
        ),
        Scenario(
            name="fm_dml_sync",
            description="Fashion-MNIST DML recipe (2 cifar_resnet8, batch 128), synchronous updates",
            config="fashion_mnist_dml.yaml",
            overrides=FASHION_LIKE,
            batch_size=128,
            groups=("dml_alternating",),
        ),
        Scenario(
            name="fm_dml_alternating",
            description="Fashion-MNIST DML recipe (2 cifar_resnet8, batch 128), alternating updates",
            config="fashion_mnist_dml.yaml",
            overrides=FASHION_LIKE + ["objective.terms.1.update_mode=alternating"],
            batch_size=128,
            groups=("dml_alternating",),
        ),
        Scenario(
            name="teacher_kd_fitnet",
            description="cifar_resnet8x4 student of a cifar_resnet32x4 teacher (random weights): 0.1 CE + 0.9 KD + "
                        "100 FitNet hint (RepDistiller recipe)",
            config="cifar100_r32x4_r8x4_kd.yaml",
            overrides=CIFAR100_LIKE + ["teachers=[{arch: cifar_resnet32x4}]",
                                       "objective.terms=[{name: ce, weight: 0.1}, {name: kd, weight: 0.9}, "
                                       "{name: fitnet, tap: stage2}]"],
            groups=("teacher",),
        ),
        # a seconds-long scenario for tests and smoke runs
        Scenario(
            name="smoke",
            description="2 cifar_resnet8, CE + DML, tiny synthetic data",
            overrides=["data.name=synthetic", "data.val_split=0", "data.synthetic.num_classes=10",
                       "data.synthetic.train_size=64", "data.synthetic.test_size=8", "train.progress=false",
                       _peers("cifar_resnet8", 2)],
            batch_size=8,
            steps=2,
            warmup=1,
            rounds=1,
            groups=("test",),
        ),
    ]
}

DEFAULT = [n for n in SCENARIOS if n != "smoke"]


def select(names: list[str] | None) -> list[Scenario]:
    """Scenarios by name or group alias (`p_scaling`, `mcl_okd`, `all`), in registry order, no repeats."""
    if not names:
        return [SCENARIOS[n] for n in DEFAULT]
    chosen: list[str] = []
    for name in names:
        if name == "all":
            hits = DEFAULT
        else:
            hits = [s.name for s in SCENARIOS.values() if name == s.name or name in s.groups]
        if not hits:
            aliases = sorted({g for s in SCENARIOS.values() for g in s.groups} | {"all"})
            raise SystemExit(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)} "
                             f"or {', '.join(aliases)}")
        chosen += [h for h in hits if h not in chosen]
    return [SCENARIOS[n] for n in chosen]
