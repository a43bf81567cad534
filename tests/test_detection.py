"""Detection, segmentation, video and optical-flow models: specs, example inputs, the real-tensor
rehearsal, and pruning that leaves outputs unchanged in structure (and in value, for zeroed channels)."""

import pytest
import torch
from torch import nn

import secateurs
from conftest import needs, zero_channels
from secateurs import Channels, SecateursError
from secateurs.io.inputs import ExampleInputs, default_input, example_inputs
from secateurs.io.specs import load_model
from secateurs.utils import output_shapes


def _run(model: nn.Module, x):
    with torch.no_grad():
        return model(*x) if isinstance(x, tuple) else model(x)


def _no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


# ---- specs and example inputs ---------------------------------------------------------------------


def _task_builders():
    try:
        import torchvision.models as tvm
    except ImportError:
        return []
    tasks = {"detection": "images", "video": "float", "optical_flow": "pair", "segmentation": "float"}
    return [(name, kind) for task, kind in tasks.items() for name in tvm.list_models(module=getattr(tvm, task))]


@needs("torchvision")
@pytest.mark.parametrize("name,kind", _task_builders())
def test_every_torchvision_task_builder_builds_without_download_and_gets_its_kind_of_input(name, kind, monkeypatch):
    _no_download(monkeypatch)
    with torch.device("meta"):  # the builders' own code, without the cost of initialising weights
        model = load_model(f"torchvision:{name}")
    shape, got = default_input(model)
    assert got == kind
    assert len(shape) == (5 if name in _video() else 4) and shape[1] == 3
    if name in ("mvit_v1_b", "mvit_v2_s", "s3d"):
        assert shape[2:] == (16, 224, 224)  # their least clip
    if kind == "pair":
        assert min(shape[2:]) >= 128  # RAFT pools its correlation volume four times


def _video():
    import torchvision.models as tvm

    return set(tvm.list_models(module=tvm.video))


@needs("torchvision")
def test_a_detector_gets_a_list_of_images_and_runs_on_it(monkeypatch):
    _no_download(monkeypatch)
    model = load_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn").eval()
    x = example_inputs(model, "2,3,64,96")
    assert isinstance(x, ExampleInputs) and tuple(x.shape) == (2, 3, 64, 96)
    (images,) = x
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 64, 96)] * 2
    assert 0 <= float(images[0].min()) and float(images[0].max()) <= 1
    out = _run(model, x)
    assert len(out) == 2 and all(set(o) == {"boxes", "scores", "labels"} for o in out)


@needs("torchvision")
def test_an_optical_flow_model_gets_an_image_pair(monkeypatch):
    _no_download(monkeypatch)
    torch.manual_seed(0)
    model = load_model("torchvision:raft_small").eval()
    x = example_inputs(model)
    assert len(x) == 2 and tuple(x.shape) == (1, 3, 128, 128) and x[0].shape == x[1].shape
    with torch.no_grad():
        flows = model(*x, num_flow_updates=2)
    assert flows[-1].shape == (1, 2, 128, 128)


@needs("torchvision")
@pytest.mark.parametrize("name,shape,says", [
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "1,3,224", "batch of RGB images"),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "1,1,64,64", "batch of RGB images"),
    ("r3d_18", "1,3,112,112", "video clips"),
    ("raft_small", "1,3,128", "pair of RGB image batches"),
])
def test_a_wrong_kind_of_input_is_one_clear_error(name, shape, says):
    with torch.device("meta"):
        model = load_model(f"torchvision:{name}")
    with pytest.raises(SecateursError, match=says) as err:
        example_inputs(model, shape)
    assert "\n" not in str(err.value) and "--input-shape" in str(err.value)


@needs("torchvision")
def test_cli_exits_2_on_a_wrong_input_kind(tmp_path, capsys):
    from secateurs.cli import main

    code = main(["prune", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", "--method", "channel",
                 "--ratio", "0.5", "--input-shape", "1,3,224", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "batch of RGB images" in capsys.readouterr().err


# ---- the rehearsal on real tensors ----------------------------------------------------------------


class _DataDependent(nn.Module):
    """A forward the meta device cannot run (``nonzero``), with one width a Python check pins."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        if h.shape[1] != 8:  # invisible to any trace: only running the pruned model finds it
            raise RuntimeError("conv1 must give 8 channels")
        h = torch.relu(self.conv3(torch.relu(self.conv2(h))))
        out = self.head(h)
        keep = (out.amax(dim=(1, 2, 3)) > -1e9).nonzero()[:, 0]  # sizes that depend on values
        return out[keep]


def test_the_rehearsal_checks_on_real_tensors_when_meta_cannot_run_the_unpruned_model(caplog):
    torch.manual_seed(0)
    model = _DataDependent().eval()
    x = torch.randn(2, 3, 12, 12)
    before = _run(model, x).shape
    with caplog.at_level("WARNING", logger="secateurs.surgery.rehearsal"):
        report = secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert report.outcome["rehearsal"] == "real"
    warned = [r for r in caplog.records if "cannot run" in r.getMessage()]
    assert len(warned) == 1 and "real tensors" in warned[0].getMessage()
    # only the group that breaks the forward is kept whole; the innocent ones are pruned
    assert model.conv1.out_channels == 8
    assert model.conv2.out_channels == 8 and model.conv3.out_channels == 8
    whole = [reason for name, reason in report.skipped.items() if "conv1" in name]
    assert whole and "conv1 must give 8 channels" in whole[0]
    assert _run(model, x).shape == before


def test_a_model_the_meta_check_runs_says_meta(cnn, digits_input):
    report = secateurs.prune_(cnn, Channels(ratio=0.5), example_inputs=digits_input)
    assert report.outcome["rehearsal"] == "meta"


# ---- pruning detectors and segmenters: the equivalence oracle --------------------------------------


def _small_faster_rcnn() -> nn.Module:
    """Faster R-CNN (MobileNetV3 320 FPN, random weights): small images and few proposals keep it fast,
    score threshold 0 keeps boxes to compare."""
    import torchvision

    return torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                        weights_backbone=None, min_size=128, max_size=128,
                                        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                                        box_score_thresh=0.0, box_detections_per_img=10)


def _oracle(model: nn.Module, x, fraction: float = 0.5):
    model.eval()
    zero_channels(model, x, fraction)
    before = _run(model, x)
    params = sum(p.numel() for p in model.parameters())
    report = secateurs.prune_(model, Channels(ratio=fraction, importance="l1", reduction="max"), example_inputs=x)
    after = _run(model, x)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * params
    assert output_shapes(after) == output_shapes(before)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    return report


@needs("torchvision")
def test_deeplabv3_zeroed_channels_removed_gives_the_same_masks():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("deeplabv3_mobilenet_v3_large", weights=None, weights_backbone=None)
    x = torch.randn(1, 3, 64, 64)
    report = _oracle(model, x)
    assert _run(model, x)["out"].shape == (1, 21, 64, 64)
    assert report.outcome["rehearsal"] == "meta"


def _rcnn_parts(model: nn.Module, images: list, boxes: torch.Tensor) -> dict:
    """What of a Faster R-CNN is continuous in its weights and keeps its width: the RPN head's outputs
    and the box head's class logits and box deltas on fixed boxes. The final detections go through
    top-k and NMS, where random weights give near-tied scores whose order float rounding can flip
    (seen with one thread), so they are compared in structure only."""
    with torch.no_grad():
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        objectness, deltas = model.rpn.head(list(features.values()))
        pooled = model.roi_heads.box_roi_pool(features, [boxes], batch.image_sizes)
        logits, box_deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
    return {"objectness": objectness, "rpn_deltas": deltas,
            "logits": logits, "box_deltas": box_deltas}


@needs("torchvision")
def test_faster_rcnn_zeroed_channels_removed_gives_the_same_detections():
    torch.manual_seed(0)
    model = _small_faster_rcnn().eval()
    x = ExampleInputs(([torch.rand(3, 96, 128)],))
    boxes = torch.tensor([[0.0, 0.0, 64.0, 64.0], [10.0, 20.0, 120.0, 90.0], [50.0, 5.0, 80.0, 40.0]])
    zero_channels(model, x, 0.5)
    before, before_out = _rcnn_parts(model, x[0], boxes), _run(model, x)
    params = sum(p.numel() for p in model.parameters())
    report = secateurs.prune_(model, Channels(ratio=0.5, importance="l1", reduction="max"), example_inputs=x)
    assert sum(p.numel() for p in model.parameters()) < 0.6 * params
    torch.testing.assert_close(_rcnn_parts(model, x[0], boxes), before, rtol=1e-4, atol=1e-4)
    out = _run(model, x)
    assert output_shapes(out) == output_shapes(before_out)
    assert len(out) == 1 and out[0]["boxes"].shape == (10, 4) and out[0]["scores"].shape == (10,)
    assert report.outcome["rehearsal"] == "real"  # NMS sizes depend on values: meta cannot run it
    pruned = [layer for layer in report.layers if layer.zeros]
    assert any("fpn" in layer.name for layer in pruned)  # FPN widths follow RoIAlign into the box head
    assert any("box_head" in layer.name for layer in pruned)
    assert not [k for k in report.skipped if "roi_align" in k or "nms" in k]


@needs("torchvision")
def test_ssdlite_prunes_and_keeps_its_detections_structure():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None,
                                         score_thresh=0.0, detections_per_img=10, topk_candidates=20).eval()
    x = ExampleInputs(([torch.rand(3, 96, 96)],))
    before = output_shapes(_run(model, x))
    params = sum(p.numel() for p in model.parameters())
    secateurs.prune_(model, Channels(ratio=0.5), example_inputs=x)
    assert sum(p.numel() for p in model.parameters()) < 0.5 * params
    assert output_shapes(_run(model, x)) == before


# ---- ultralytics ----------------------------------------------------------------------------------


def _ultralytics():
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        pytest.skip("ultralytics is not installed (pip install 'secateurs[detect]')")


def test_a_yolo_yaml_that_does_not_exist_is_one_clear_error():
    _ultralytics()
    with pytest.raises(SecateursError, match="no model yaml 'yolov99z.yaml'") as err:
        load_model("ultralytics:yolov99z.yaml")
    assert "\n" not in str(err.value)
    with pytest.raises(SecateursError, match="not a model yaml"):
        load_model("ultralytics:yolov8n.pt")


def test_yolov8n_builds_from_its_yaml_and_zeroed_channels_removed_give_the_same_predictions():
    _ultralytics()
    torch.manual_seed(0)
    model = load_model("ultralytics:yolov8n.yaml")
    assert type(model).__name__ == "DetectionModel"
    x = torch.rand(1, 3, 96, 96)
    report = _oracle(model, x)
    assert _run(model, x)[0].shape == (1, 84, 189)  # 4 box coordinates + 80 classes, per anchor
    assert model.model[-1].reg_max == 16 and model.model[-1].dfl.conv.weight.shape == (1, 16, 1, 1)
    assert report.outcome["rehearsal"] == "real"


# ---- MACs targets on models the meta device cannot run ----------------------------------------------


@needs("torchvision")
def test_faster_rcnn_reaches_a_macs_target_counted_on_real_tensors():
    from secateurs.surgery.rehearsal import model_macs

    torch.manual_seed(0)
    model = _small_faster_rcnn().eval()
    x = ExampleInputs(([torch.rand(3, 96, 128)],))
    dense = model_macs(model, x)  # meta cannot run it (NMS): counted on the model itself
    assert dense > 0
    report = secateurs.prune_(model, Channels(target_macs=0.5), example_inputs=x)
    assert report.outcome["rehearsal"] == "real" and report.outcome["target_met"]
    assert 0.4 < report.outcome["achieved_macs"] <= 0.5
    assert model_macs(model, x) / dense == pytest.approx(report.outcome["achieved_macs"], abs=0.03)
    out = _run(model, x)
    assert len(out) == 1 and set(out[0]) == {"boxes", "scores", "labels"}
    assert out[0]["boxes"].shape == (10, 4) and out[0]["scores"].shape == (10,)


@needs("torchvision")
def test_layer_pruning_removes_blocks_of_a_detector_checked_on_real_tensors():
    from secateurs import Layers
    from secateurs.surgery.rehearsal import model_macs

    torch.manual_seed(0)
    model = _small_faster_rcnn().eval()
    x = ExampleInputs(([torch.rand(3, 96, 128)],))
    dense = model_macs(model, x)
    params = sum(p.numel() for p in model.parameters())
    # most of this small detector's MACs are in its FPN and heads: the backbone's blocks alone cannot
    # reach 0.8, and the run removes what it can, counted on real tensors as the checks are
    report = secateurs.prune_(model, Layers(target_macs=0.8), example_inputs=x)
    assert report.outcome["rehearsal"] == "real"  # NMS: the meta device cannot run it
    assert report.plan["drop"] and sum(p.numel() for p in model.parameters()) < params
    assert report.outcome["achieved_macs"] < 1.0
    assert model_macs(model, x) / dense == pytest.approx(report.outcome["achieved_macs"], abs=0.03)
    out = _run(model, x)
    assert len(out) == 1 and out[0]["boxes"].shape == (10, 4)


class _KeepsAll(nn.Module):
    """A 'detector' that keeps as many boxes as it may on any input: the count still depends on values."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, images):
        out = []
        for image in images:
            boxes = self.head(torch.relu(self.conv(image[None])))[0].flatten(1).T  # (H*W, 4)
            keep = (boxes.abs().sum(1) >= 0).nonzero()[:, 0][:5]  # the meta device cannot size this
            out.append({"boxes": boxes[keep], "scores": boxes[keep, 0]})
        return out


def test_the_real_check_lets_per_image_detection_counts_vary_even_when_both_probes_keep_the_most():
    from secateurs.surgery.rehearsal import _make_real_check

    torch.manual_seed(0)
    model = _KeepsAll().eval()
    x = ExampleInputs(([torch.rand(3, 8, 8)],))
    check = _make_real_check(model, x)
    assert check.reference == [{"boxes": (5, 4), "scores": (5,)}]
    assert check.variable == [{"boxes": (True, False), "scores": (True,)}]
    assert check.fits([{"boxes": (2, 4), "scores": (2,)}])  # fewer boxes: fine
    assert not check.fits([{"boxes": (2, 3), "scores": (2,)}])  # box coordinates: never
    assert not check.fits([{"boxes": (2, 4)}])
