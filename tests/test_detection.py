"""Faster R-CNN on KW-ResNet50-FPN: a few training steps on synthetic boxes, then evaluation."""

import math

import pytest
import torch

import kernelwarehouse as kw

pytest.importorskip("torchvision")


def synthetic_batch(count: int = 2, size: int = 64):
    images, targets = [], []
    for i in range(count):
        image = torch.rand(3, size, size) * 0.1
        x0, y0 = 6 + 10 * i, 8 + 6 * i
        image[:, y0 : y0 + 28, x0 : x0 + 24] += 0.8  # a bright box to find
        images.append(image)
        targets.append(
            {
                "boxes": torch.tensor([[x0, y0, x0 + 24, y0 + 28]], dtype=torch.float32),
                "labels": torch.tensor([1 + i % 2]),
            }
        )
    return images, targets


def test_fasterrcnn_kw_resnet50_fpn_trains_and_evaluates():
    torch.manual_seed(0)
    model = kw.detection.fasterrcnn_kw_resnet50_fpn(num_classes=3, budget=1, min_size=64, max_size=64)
    backbone = model.backbone.body
    assert len(kw.kw_layers(backbone)) == len(kw.kw_layers(kw.create_model("kw_resnet50")))
    images, targets = synthetic_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    warehouse = backbone.layer3[0].conv2.warehouse.weight
    before = warehouse.detach().clone()
    kw.set_temperature(model, 1.0)
    model.train()
    for _ in range(2):
        losses = model(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        loss = sum(losses.values())
        assert math.isfinite(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(warehouse, before)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for d in detections:
        assert set(d) == {"boxes", "labels", "scores"}
        assert d["boxes"].shape[1:] == (4,) and len(d["labels"]) == len(d["scores"]) == len(d["boxes"])
        assert ((d["boxes"] >= 0) & (d["boxes"] <= 64)).all()


def test_backbone_levels():
    backbone = kw.detection.kw_resnet50_fpn_backbone(budget="1/2", returned_layers=(2, 3, 4)).eval()
    levels = backbone(torch.randn(2, 3, 64, 64))
    assert list(levels) == ["1", "2", "3", "pool"]
    assert [tuple(v.shape[-2:]) for v in levels.values()] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert all(v.shape[1] == backbone.out_channels == 256 for v in levels.values())
    with pytest.raises(ValueError, match="returned_layers"):
        kw.detection.kw_resnet50_fpn_backbone(returned_layers=(0, 5))


def test_maskrcnn_kw_resnet50_fpn_evaluates():
    torch.manual_seed(0)
    model = kw.detection.maskrcnn_kw_resnet50_fpn(
        num_classes=2, budget="1/2", min_size=64, max_size=64
    ).eval()
    with torch.no_grad():
        (detections,) = model([torch.rand(3, 64, 64)])
    assert set(detections) == {"boxes", "labels", "scores", "masks"}
    assert detections["masks"].shape[1:] == (1, 64, 64)
    assert isinstance(model.backbone.body.layer4[0].conv2, kw.KWConv2d)
