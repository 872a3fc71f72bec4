"""Segment Anything prompting: one image embedding per image (batched across images), reused for every point,
box and grid prompt; prompts go through the decoder in batches; multimask outputs are chosen by predicted IoU
before upsampling, and masks come back at the original resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass
class ImageEmbedding:
    features: torch.Tensor  # (1, C, h, w)
    original_size: tuple[int, int]  # (H, W)
    input_size: tuple[int, int]  # (h, w) after ResizeLongestSide, before padding


@dataclass
class SamMask:
    mask: np.ndarray  # (H, W) bool
    iou: float  # SAM's predicted IoU
    source: str  # what prompted it: point | box | grid
    prompt: tuple  # the prompt, in original pixels


class SamPrompter:
    def __init__(self, sam, prompt_batch: int = 64):
        self.sam = sam
        self.transform = ResizeLongestSide(sam.image_encoder.img_size)
        self.prompt_batch = prompt_batch

    @property
    def device(self) -> torch.device:
        return self.sam.device

    @torch.no_grad()
    def embed(self, images: list[np.ndarray], batch_size: int = 4) -> list[ImageEmbedding]:
        """(H, W, 3) uint8 RGB images -> embeddings; the encoder runs on ``batch_size`` images at a time."""
        out: list[ImageEmbedding] = []
        for i in range(0, len(images), max(1, batch_size)):
            chunk = images[i : i + batch_size]
            tensors, sizes = [], []
            for im in chunk:
                resized = self.transform.apply_image(im)
                t = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()
                sizes.append(tuple(t.shape[-2:]))
                tensors.append(self.sam.preprocess(t[None].float()))  # normalise + pad to img_size
            dtype = next(self.sam.image_encoder.parameters()).dtype
            feats = self.sam.image_encoder(torch.cat(tensors).to(dtype))
            for j, im in enumerate(chunk):
                out.append(ImageEmbedding(feats[j : j + 1], tuple(im.shape[:2]), sizes[j]))
        return out

    @torch.no_grad()
    def _decode(self, emb: ImageEmbedding, points=None, labels=None, boxes=None, multimask: bool = True):
        sparse, dense = self.sam.prompt_encoder(
            points=(points, labels) if points is not None else None, boxes=boxes, masks=None
        )
        low, iou = self.sam.mask_decoder(
            image_embeddings=emb.features.to(sparse.dtype),
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        best = iou.argmax(dim=1)  # choose among the multimask outputs before upsampling
        idx = torch.arange(low.shape[0], device=low.device)
        low, iou = low[idx, best][:, None], iou[idx, best]
        masks = (
            self.sam.postprocess_masks(low.float(), emb.input_size, emb.original_size)
            > self.sam.mask_threshold
        )
        return masks[:, 0].cpu().numpy(), iou.float().cpu().numpy()

    def predict_points(
        self,
        emb: ImageEmbedding,
        points: list[tuple[float, float]],
        negatives: list[tuple[float, float]] = (),
        multimask: bool = True,
        source: str = "point",
    ) -> list[SamMask]:
        """One prompt per positive point (each with all ``negatives``)."""
        if not points:
            return []
        neg = list(negatives)
        coords = np.array([[p, *neg] for p in points], dtype=np.float32).reshape(len(points), 1 + len(neg), 2)
        labels = np.array([[1] + [0] * len(neg)] * len(points), dtype=np.int64)
        results: list[SamMask] = []
        for i in range(0, len(points), self.prompt_batch):
            c = self.transform.apply_coords(coords[i : i + self.prompt_batch], emb.original_size)
            masks, ious = self._decode(
                emb,
                points=torch.as_tensor(c, dtype=torch.float32, device=self.device),
                labels=torch.as_tensor(labels[i : i + self.prompt_batch], device=self.device),
                multimask=multimask,
            )
            results += [
                SamMask(m, float(s), source, tuple(points[i + j]))
                for j, (m, s) in enumerate(zip(masks, ious, strict=True))
            ]
        return results

    def predict_boxes(
        self, emb: ImageEmbedding, boxes: list[list[float]], multimask: bool = False, source: str = "box"
    ) -> list[SamMask]:
        """One prompt per (x0, y0, x1, y1) box in original pixels."""
        if not boxes:
            return []
        arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        results: list[SamMask] = []
        for i in range(0, len(arr), self.prompt_batch):
            b = self.transform.apply_boxes(arr[i : i + self.prompt_batch], emb.original_size)
            masks, ious = self._decode(
                emb, boxes=torch.as_tensor(b, dtype=torch.float32, device=self.device), multimask=multimask
            )
            results += [
                SamMask(m, float(s), source, tuple(arr[i + j].tolist()))
                for j, (m, s) in enumerate(zip(masks, ious, strict=True))
            ]
        return results

    def predict_grid(self, emb: ImageEmbedding, points_per_side: int, min_iou: float = 0.0) -> list[SamMask]:
        """SAM's automatic-mask idea on the shared embedding: a regular grid of single-point prompts."""
        h, w = emb.original_size
        n = max(1, points_per_side)
        offs = (np.arange(n) + 0.5) / n
        pts = [(float(x * w), float(y * h)) for y in offs for x in offs]
        return [
            m for m in self.predict_points(emb, pts, multimask=True, source="automatic") if m.iou >= min_iou
        ]

    def predict_box_and_points(
        self,
        emb: ImageEmbedding,
        box: list[float],
        points: list[tuple[float, float]],
        source: str = "text_box",
    ) -> list[SamMask]:
        """One prompt made of a box and positive points together (Seg-Zero style)."""
        b = self.transform.apply_boxes(np.asarray([box], dtype=np.float32), emb.original_size)
        kwargs = {"boxes": torch.as_tensor(b, dtype=torch.float32, device=self.device)}
        if points:
            c = self.transform.apply_coords(np.asarray([points], dtype=np.float32), emb.original_size)
            kwargs["points"] = torch.as_tensor(c, dtype=torch.float32, device=self.device)
            kwargs["labels"] = torch.ones((1, len(points)), dtype=torch.int64, device=self.device)
        masks, ious = self._decode(emb, multimask=False, **kwargs)
        return [SamMask(masks[0], float(ious[0]), source, (tuple(box), tuple(points)))]
