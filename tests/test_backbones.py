from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from visiontune import BackboneError, create_backbone, data_config, load_state_dict_file


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("tf_efficientnet_lite0", weights="package").eval()


def test_package_weights_are_real_imagenet_weights(lite0):
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    names = [f.split("/")[-1] for f in data.filenames]
    cfg = data_config(lite0)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    top1 = {}
    for name, im in zip(names, data.images):
        x = torch.from_numpy(im.copy()).permute(2, 0, 1)[None].float() / 255
        x = F.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
        with torch.no_grad():
            top1[name] = int(lite0((x - mean) / std).argmax())
    assert top1 == {"china.jpg": 442, "flower.jpg": 985}


def test_package_weights_new_head_and_body_loaded(lite0):
    net = create_backbone("tf_efficientnet_lite0", weights="package", num_classes=7)
    assert net.get_classifier().out_features == 7
    torch.testing.assert_close(net.conv_stem.weight, lite0.conv_stem.weight)
    torch.testing.assert_close(net.blocks[6][0].conv_pwl.weight, lite0.blocks[6][0].conv_pwl.weight)


def test_unknown_model_name_is_named():
    with pytest.raises(BackboneError, match="tf_efficientnet_lite9"):
        create_backbone("tf_efficientnet_lite9")


def test_package_weights_only_for_known_models():
    with pytest.raises(BackboneError, match="resnet18"):
        create_backbone("resnet18", weights="package")


def test_missing_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("resnet18", weights=str(tmp_path / "nope.safetensors"))


def test_safetensors_file_roundtrip_and_head_mismatch(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("resnet18", num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    net = create_backbone("resnet18", weights=str(path), num_classes=3)  # head differs: re-initialised
    torch.testing.assert_close(net.conv1.weight, src.conv1.weight)
    assert net.fc.out_features == 3


def test_mismatching_state_dict_names_keys_and_shapes(tmp_path):
    sd = timm.create_model("resnet18").state_dict()
    sd["conv1.weight"] = torch.zeros(8, 3, 7, 7)
    sd.pop("layer1.0.bn1.bias")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(BackboneError) as err:
        create_backbone("resnet18", weights=str(path))
    msg = str(err.value)
    assert "resnet18" in msg and "layer1.0.bn1.bias" in msg and "extra.weight" in msg
    assert "conv1.weight: file (8, 3, 7, 7) vs model (64, 3, 7, 7)" in msg


def test_pickled_weights_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(BackboneError, match="weights_only"):
        load_state_dict_file(path)
    assert not marker.exists()
