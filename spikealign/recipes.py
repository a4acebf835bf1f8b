"""Training recipes: published settings as data, applied by ``training.run --recipe NAME``.

A recipe is one entry of :data:`RECIPES`: ``common`` values for every run, then per-arch values,
then per-(arch, rule) values (key ``"arch/rule"``), each overriding the one before. The keys are
:class:`spikealign.trainer.TrainConfig` fields; flags given explicitly override a recipe's values,
and ``config.json`` records the resolved values. ``lr_milestones`` are the epochs after which the
learning rate is multiplied by ``lr_gamma``.

xiao2019 (METHOD 8; Xiao, Chen, Liao, Poggio 2019, willwx/sign-symmetry): ImageNet, global batch
256, SGD momentum 0.9, lr x0.1 every 10 epochs, 50 epochs, the authors' feedback scales
(``feedback.xiao2019_feedback``), last layer on backprop. ResNet-18: lr 0.1 and weight decay 1e-4
for backprop, lr 0.053 for the other rules; BN-AlexNet: lr 0.01, weight decay 5e-4, every rule.

biotorch (Sanfiz & Akrout 2021, the BioTorch ImageNet table of METHOD 8): ResNet-18, 75 epochs,
lr x0.1 after epochs 20, 40 and 60. METHOD 8 does not give its lr, batch and weight decay; the
values here are those of torchvision's ImageNet reference (batch 256, lr 0.1, momentum 0.9,
weight decay 1e-4), marked ``assumed`` in the listing.
"""

from __future__ import annotations

from spikealign.errors import UserError

__all__ = ["RECIPES", "describe_recipes", "recipe_values"]

RECIPES: dict[str, dict] = {
    "xiao2019": {
        "about": "Xiao et al. 2019 sign symmetry / feedback alignment on ImageNet (METHOD 8)",
        "common": {
            "epochs": 50,
            "batch_size": 256,
            "momentum": 0.9,
            "lr_milestones": [10, 20, 30, 40],
            "lr_gamma": 0.1,
            "feedback_scales": "xiao2019",
            "last_layer": "bp",
        },
        "resnet18": {"lr": 0.053, "weight_decay": 1e-4},
        "resnet18/bp": {"lr": 0.1},
        "alexnet_bn": {"lr": 0.01, "weight_decay": 5e-4},
    },
    "biotorch": {
        "about": "BioTorch ImageNet ResNet-18 benchmark, 75 epochs (METHOD 8 table)",
        "common": {"epochs": 75, "lr_milestones": [20, 40, 60], "lr_gamma": 0.1},
        "resnet18": {"batch_size": 256, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4},
        "assumed": ["batch_size", "lr", "momentum", "weight_decay"],
    },
}


def _arch_keys(recipe: dict) -> list[str]:
    return [key for key in recipe if key not in ("about", "common", "assumed")]


def recipe_values(name: str, arch: str, rule: str) -> dict:
    """The TrainConfig values recipe ``name`` gives a run of ``rule`` on ``arch``."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    archs = [key for key in _arch_keys(recipe) if "/" not in key]
    if arch not in archs:
        raise UserError(
            f"recipe {name} has no values for arch {arch}; use it with --arch "
            f"{' or '.join(archs)}, or give the optimisation flags yourself"
        )
    values = dict(recipe["common"])
    values.update(recipe[arch])
    values.update(recipe.get(f"{arch}/{rule}", {}))
    return values


def describe_recipes() -> str:
    """The recipes as a readable listing (``training.run --list-recipes``)."""
    lines = []
    for name, recipe in RECIPES.items():
        assumed = set(recipe.get("assumed", ()))
        lines.append(f"{name}: {recipe['about']}")
        for key in ["common", *_arch_keys(recipe)]:
            settings = ", ".join(
                f"{field}={value}{' (assumed)' if field in assumed else ''}"
                for field, value in recipe[key].items()
            )
            lines.append(f"  {'all' if key == 'common' else key}: {settings}")
    return "\n".join(lines)
