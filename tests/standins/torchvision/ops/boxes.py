"""Reference greedy NMS with torchvision's semantics, written plainly (tests only)."""

import torch


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _iou(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    x0 = torch.maximum(box[0], others[:, 0])
    y0 = torch.maximum(box[1], others[:, 1])
    x1 = torch.minimum(box[2], others[:, 2])
    y1 = torch.minimum(box[3], others[:, 3])
    inter = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    union = box_area(box[None])[0] + box_area(others) - inter
    return inter / union


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Indices kept, by decreasing score; boxes of different idxs never suppress each other."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    keep: list[int] = []
    for i in order:
        same = [j for j in keep if int(idxs[j]) == int(idxs[i])]
        if same and bool((_iou(boxes[i].double(), boxes[same].double()) > iou_threshold).any()):
            continue
        keep.append(i)
    return torch.tensor(keep, dtype=torch.int64)
