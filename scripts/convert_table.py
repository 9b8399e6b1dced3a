"""Print the README's table of kw.convert on torchvision / timm models (random init, CPU, ~1 min)."""

import warnings

import timm
import torch
import torch.nn as nn
import torchvision

import kernelwarehouse as kw

MODELS = [
    "resnet18",
    "resnet50",
    "mobilenet_v3_large",
    "convnext_tiny",
    "efficientnet_b0",
    "deit_tiny_patch16_224",
]


def build(name: str) -> nn.Module:
    """A randomly initialised model whose BatchNorm statistics match random inputs (torchvision's
    MobileNet / EfficientNet otherwise shrink activations to ~1e-14 in eval mode at init)."""
    torch.manual_seed(0)
    if name.startswith("deit"):
        return timm.create_model(name).eval()
    model = getattr(torchvision.models, name)()
    for bn in model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


def sample(name: str) -> torch.Tensor:
    return torch.randn(2, 3, 224, 224) if name.startswith("deit") else torch.randn(2, 3, 64, 64)


def main() -> None:
    warnings.simplefilter("ignore")
    print(
        "| model | KW layers | warehouses | converted weights | params | KW 1x | ratio | warm-start error "
        "| KW 4x |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in MODELS:
        model = build(name)
        x = sample(name)
        with torch.no_grad():
            expected = model(x)
        conversion = kw.plan_conversion(model)
        four = kw.plan_conversion(model, budget=4)
        kw.convert(model, warm_start=True)
        with torch.no_grad():
            error = float((model.eval()(x) - expected).abs().max() / expected.abs().max())
        original = conversion.original_parameters
        print(
            f"| {name} | {len(conversion.plan.layers)} | {len(conversion.plan.warehouses)} | "
            f"{conversion.coverage:.1%} | {original / 1e6:.2f}M | {conversion.num_parameters / 1e6:.2f}M | "
            f"{conversion.parameter_ratio:.3f}x | {error:.1e} | {four.num_parameters / 1e6:.2f}M |"
        )


if __name__ == "__main__":
    main()
