"""SAM 2 models with identical random weights, Meta's and segany's, and the spec of SAM 2's
image prediction with segany's modules (shared by tests/test_sam2_image.py and
tests/test_sam2_predictor.py).

Meta's model is built from its ``sam2.1_hiera_t`` config as ``build_sam2`` builds it (no
checkpoint, on the CPU), given random weights (mask logits sharpened, see
:data:`LOGIT_SCALE`), and copied into segany's :class:`Sam2` through the official state
dict (the video memory's tensors included).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from reference import randomize_  # puts tests/standins (torchvision for sam2) on sys.path
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base

from segany.modeling.sam2 import SAM2_CONFIGS, Sam2, Sam2ImageEmbedding

TOLERANCE = 1e-4
NAME = "sam2.1_hiera_t"
# Not square, and wider than the model input, so that the squashing resize shrinks one
# side (antialiasing matters) and stretches the other.
IMAGE_SIZE = (600, 1200)
# Random weights give mask logits within +-1, whose single masks are all unstable (SAM 2
# then always falls back to a multimask output). Scaled up this much, some prompts' single
# masks are stable and some are not, the two sets of "two objects" included
# (test_sam2_image.py::test_single_mask_choice_goes_both_ways).
LOGIT_SCALE = 15.0

# Prompts in pixels of an IMAGE_SIZE image, one of each kind.
PROMPTS = {
    "click": {"point_coords": np.array([[700.0, 250.0]]), "point_labels": np.array([1])},
    "clicks": {
        "point_coords": np.array([[700.0, 250.0], [300.0, 420.0], [1100.0, 80.0]]),
        "point_labels": np.array([1, 0, 1]),
    },
    "box": {"box": np.array([350.0, 120.0, 980.0, 520.0])},
    "clicks and box": {
        "point_coords": np.array([[700.0, 250.0], [400.0, 200.0]]),
        "point_labels": np.array([1, 0]),
        "box": np.array([350.0, 120.0, 980.0, 520.0]),
    },
    "two objects": {  # B = 2 point sets against the one image
        "point_coords": np.array([[[300.0, 550.0]], [[600.0, 550.0]]]),
        "point_labels": np.array([[1], [1]]),
    },
}


def yaml_path(name: str) -> str:
    """Meta's config name for ``build_sam2`` (relative to the sam2 package)."""
    return f"configs/{name.split('_')[0]}/{name}.yaml"


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like image: smooth shapes and noise, so masks are neither empty nor full."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[:height, :width]
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(8):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(40, 250)
        image[(ys - cy) ** 2 + (xs - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)


def meta_sam2(image_size: int | None = None) -> SAM2Base:
    """Meta's :data:`NAME` model with random weights, its mask logits sharpened; at another
    input size than 1024 if ``image_size`` is given (for cheap tests of what runs it)."""
    torch.manual_seed(0)  # randomize_ keeps the initialisation's matrices (and adds noise)
    overrides = [] if image_size is None else [f"++model.image_size={image_size}"]
    meta = build_sam2(yaml_path(NAME), None, "cpu", hydra_overrides_extra=overrides)
    model = randomize_(meta, seed=0)
    with torch.no_grad():
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(LOGIT_SCALE)
            mlp.layers[-1].bias.mul_(LOGIT_SCALE)
    return model.eval()


def segany_sam2(meta_model: SAM2Base) -> Sam2:
    """segany's :data:`NAME` model with ``meta_model``'s weights (all of them: every
    tensor of Meta's state dict loads, strictly)."""
    config = dataclasses.replace(SAM2_CONFIGS[NAME], image_size=meta_model.image_size)
    ours = Sam2.from_config(config).eval()
    ours.load_official_state_dict(meta_model.state_dict())
    return ours


def embed_prompts(
    model: Sam2,
    original_size: tuple[int, int],
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask_input: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts in original-image pixels -> sparse (B, N, C) and dense (B, C, h, w) prompt
    embeddings, as SAM 2's image predictor makes them (arguments as :func:`segany_predict`)."""
    size = model.image_size
    height, width = original_size
    # The image was squashed to size x size, so each axis scales on its own.
    scale = torch.tensor([width, height], dtype=torch.float32)
    coords, labels = [], []
    if box is not None:
        # A box is its two corners as points labelled 2 and 3, before any clicks.
        corners = torch.as_tensor(box, dtype=torch.float32).reshape(-1, 2, 2)
        coords.append(corners / scale * size)
        labels.append(torch.tensor([[2, 3]], dtype=torch.int32).expand(len(corners), -1))
    if point_coords is not None:
        points = torch.as_tensor(point_coords, dtype=torch.float32)
        point_classes = torch.as_tensor(point_labels, dtype=torch.int32)
        if points.ndim == 2:
            points, point_classes = points[None], point_classes[None]
        coords.append(points / scale * size)
        labels.append(point_classes)
    prompt = (torch.cat(coords, dim=1), torch.cat(labels, dim=1)) if coords else None
    masks_in = None
    if mask_input is not None:
        masks_in = torch.as_tensor(mask_input, dtype=torch.float32)[None]
    with torch.no_grad():
        # boxes=None: the prompt encoder then appends a padding point, as SAM 2 trained.
        return model.prompt_encoder(points=prompt, boxes=None, masks=masks_in)


def segany_predict(
    model: Sam2,
    embedding: Sam2ImageEmbedding,
    original_size: tuple[int, int],
    point_coords: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    box: np.ndarray | None = None,
    mask_input: np.ndarray | None = None,
    multimask_output: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SAM 2's image prediction with segany's modules: the spec of segany's SAM 2 predictor.

    Prompts are in original-image pixels: ``point_coords`` (N, 2) or (B, N, 2) x, y with
    ``point_labels`` (N,) or (B, N); ``box`` (4,) XYXY; ``mask_input`` (1, 256, 256) low-res
    logits as returned before. Returns, as Meta's ``predict(return_logits=True)``: mask
    logits (M, H, W) at the original size, scores (M,) and low-res logits (M, 256, 256)
    ((B, ...) for B point sets). One mask (``multimask_output=False``) is the decoder's
    choice: its single-mask output if stable, else its best multimask output.
    """
    sparse, dense = embed_prompts(model, original_size, point_coords, point_labels, box, mask_input)
    with torch.no_grad():
        low_res, scores = model.mask_decoder(
            embedding.image_embed,
            model.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
            high_res_features=embedding.high_res_features,
        )
        # Straight to the original size (no padding to crop), from the unclamped logits.
        masks = F.interpolate(low_res, original_size, mode="bilinear", align_corners=False)
    low_res = low_res.clamp(-32.0, 32.0)
    return masks.squeeze(0).numpy(), scores.squeeze(0).numpy(), low_res.squeeze(0).numpy()


def assert_close(
    actual: np.ndarray, expected: np.ndarray, name: str, tolerance: float = TOLERANCE
) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    difference = float(np.abs(actual - expected).max())
    assert difference <= tolerance, f"{name}: max |difference| {difference:.2e}"
