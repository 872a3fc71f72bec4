"""Segment Anything prompting: one image embedding per image (batched across images), reused for every point,
box and grid prompt; prompts go through the decoder in batches; multimask outputs are chosen by predicted IoU
before upsampling, and masks come back at the original resolution. The same interface for segment-anything's SAM
(``SamPrompter``) and for SAM 2.1, SAM-HQ and SAM 3 through transformers (``HFSamPrompter``).
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


class _Prompter:
    """Point, box, grid and box-with-points prompts on a shared image embedding, for every mask decoder: prompts are
    in original pixels, batched ``prompt_batch`` at a time; ``_decode`` is the decoder-specific part."""

    prompt_batch: int

    def _decode(self, emb, points, labels, boxes, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """points (N, P, 2) float32 original (x, y) or None; labels (N, P) int64 (1 positive, 0 negative) or None;
        boxes (N, 4) float32 original (x0, y0, x1, y1) or None -> (masks (N, H, W) bool, predicted IoUs (N,))."""
        raise NotImplementedError

    def predict_points(
        self,
        emb,
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
            j = slice(i, i + self.prompt_batch)
            masks, ious = self._decode(emb, coords[j], labels[j], None, multimask)
            results += [
                SamMask(m, float(s), source, tuple(points[i + k]))
                for k, (m, s) in enumerate(zip(masks, ious, strict=True))
            ]
        return results

    def predict_boxes(
        self, emb, boxes: list[list[float]], multimask: bool = False, source: str = "box"
    ) -> list[SamMask]:
        """One prompt per (x0, y0, x1, y1) box in original pixels."""
        if not boxes:
            return []
        arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        results: list[SamMask] = []
        for i in range(0, len(arr), self.prompt_batch):
            masks, ious = self._decode(emb, None, None, arr[i : i + self.prompt_batch], multimask)
            results += [
                SamMask(m, float(s), source, tuple(arr[i + k].tolist()))
                for k, (m, s) in enumerate(zip(masks, ious, strict=True))
            ]
        return results

    def predict_grid(self, emb, points_per_side: int, min_iou: float = 0.0) -> list[SamMask]:
        """SAM's automatic-mask idea on the shared embedding: a regular grid of single-point prompts."""
        h, w = emb.original_size
        n = max(1, points_per_side)
        offs = (np.arange(n) + 0.5) / n
        pts = [(float(x * w), float(y * h)) for y in offs for x in offs]
        return [
            m for m in self.predict_points(emb, pts, multimask=True, source="automatic") if m.iou >= min_iou
        ]

    def predict_box_and_points(
        self, emb, box: list[float], points: list[tuple[float, float]], source: str = "text_box"
    ) -> list[SamMask]:
        """One prompt made of a box and positive points together (Seg-Zero style)."""
        coords = np.asarray([points], dtype=np.float32).reshape(1, len(points), 2) if points else None
        labels = np.ones((1, len(points)), dtype=np.int64) if points else None
        masks, ious = self._decode(emb, coords, labels, np.asarray([box], dtype=np.float32), False)
        return [SamMask(masks[0], float(ious[0]), source, (tuple(box), tuple(points)))]


class SamPrompter(_Prompter):
    """segment-anything's SAM (ViT-B/L/H and the tiny preset)."""

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
    def _decode(self, emb: ImageEmbedding, points, labels, boxes, multimask: bool):
        kw = {}
        if points is not None:
            c = self.transform.apply_coords(points, emb.original_size)
            kw["points"] = (
                torch.as_tensor(c, dtype=torch.float32, device=self.device),
                torch.as_tensor(labels, device=self.device),
            )
        if boxes is not None:
            b = self.transform.apply_boxes(boxes, emb.original_size)
            kw["boxes"] = torch.as_tensor(b, dtype=torch.float32, device=self.device)
        sparse, dense = self.sam.prompt_encoder(points=kw.get("points"), boxes=kw.get("boxes"), masks=None)
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


@dataclass
class HFImageEmbedding:
    """A transformers mask decoder's embedding of one image: the keyword arguments its forward takes for it."""

    # image_embeddings (a tensor or a per-level list, batch 1) and, for SAM-HQ, intermediate_embeddings
    inputs: dict
    original_size: tuple[int, int]  # (H, W)
    input_size: tuple[int, int]  # (h, w) the processor resized the image to, before any padding


class HFSamPrompter(_Prompter):
    """SAM 2.1, SAM-HQ and SAM 3 (tracker) through transformers, with the processor of the checkpoint."""

    def __init__(self, model, processor, kind, prompt_batch: int = 64):
        self.model, self.processor, self.kind = model, processor, kind
        self.prompt_batch = prompt_batch

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, images: list[np.ndarray], batch_size: int = 4) -> list[HFImageEmbedding]:
        out: list[HFImageEmbedding] = []
        dtype = next(self.model.parameters()).dtype
        for i in range(0, len(images), max(1, batch_size)):
            chunk = images[i : i + batch_size]
            enc = self.processor(images=chunk, return_tensors="pt")
            pixels = enc["pixel_values"].to(self.device, dtype)
            feats = self.model.get_image_embeddings(pixels)
            inter = None
            if isinstance(feats, tuple):  # SAM-HQ: (image embeddings, the ViT's intermediate embeddings)
                feats, inter = feats
            sizes = enc.get("reshaped_input_sizes")
            for j, im in enumerate(chunk):
                emb = [f[j : j + 1] for f in feats] if isinstance(feats, list | tuple) else feats[j : j + 1]
                kw = {"image_embeddings": emb}
                if inter is not None:
                    kw["intermediate_embeddings"] = [x[j : j + 1] for x in inter]
                size = tuple(int(v) for v in sizes[j]) if sizes is not None else tuple(pixels.shape[-2:])
                out.append(HFImageEmbedding(kw, tuple(im.shape[:2]), size))
        return out

    @torch.no_grad()
    def _decode(self, emb: HFImageEmbedding, points, labels, boxes, multimask: bool):
        (h, w), (ih, iw) = emb.original_size, emb.input_size
        # The processor's own resize, applied to the prompts; the model takes (1, N, P, 2) points, (1, N, P) labels
        # and (1, N, 4) boxes.
        scale = np.array([iw / w, ih / h], dtype=np.float32)
        kw = dict(emb.inputs)
        if points is not None:
            kw["input_points"] = torch.as_tensor(points * scale, device=self.device)[None]
            kw["input_labels"] = torch.as_tensor(labels, device=self.device)[None]
        if boxes is not None:
            kw["input_boxes"] = torch.as_tensor(boxes * np.tile(scale, 2), device=self.device)[None]
        out = self.model(**kw, multimask_output=multimask)
        low, iou = out.pred_masks[0], out.iou_scores[0]  # (N, M, h', w'), (N, M)
        best = iou.argmax(dim=1)  # choose among the multimask outputs before upsampling
        idx = torch.arange(low.shape[0], device=low.device)
        low, iou = low[idx, best][:, None], iou[idx, best]
        args = [[emb.original_size]]
        if self.kind.resize == "longest":  # padded input: the processor crops the padding away first
            args.append([emb.input_size])
        (masks,) = self.processor.post_process_masks(low[None].float().cpu(), *args)
        return masks[:, 0].numpy().astype(bool), iou.float().cpu().numpy()


def load_prompter(
    spec: str, device: str, dtype: torch.dtype, cache_dir: str | None = None, allow_hub: bool = False
):
    """The prompter for a mask decoder spec: its kind is read from the folder (a transformers ``config.json`` of SAM
    2.1, SAM-HQ or SAM 3; else segment-anything's ``sam_config.json`` or ``sam_vit_*.pth``)."""
    from ..models.loading import load_sam, resolve_model
    from ..models.mask_decoders import load_hf_mask_decoder, mask_decoder_kind

    path = resolve_model(spec, cache_dir, allow_hub)
    kind = mask_decoder_kind(path)
    if kind is None:
        sam = load_sam(str(path), device)  # already resolved (downloaded, if it had to be) above
        return SamPrompter(sam.to(dtype) if device != "cpu" else sam)
    model, processor = load_hf_mask_decoder(path, kind, device, dtype)
    return HFSamPrompter(model, processor, kind)


class ConceptSegmenter:
    """SAM 3 on text (SAM 3 Agent's first step): every instance of a noun phrase. Each image is encoded once
    (``embed``); each phrase then runs SAM 3's detector on that encoding."""

    def __init__(self, model, processor, threshold: float = 0.3):
        self.model, self.processor, self.threshold = model, processor, threshold

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, image: np.ndarray):
        """(H, W, 3) uint8 RGB -> SAM 3's vision features of the image (batch 1)."""
        enc = self.processor(images=[image], return_tensors="pt")
        pixels = enc["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
        return self.model.get_vision_features(pixels)

    @torch.no_grad()
    def segment(self, vision, size: tuple[int, int], phrases: list[str]) -> list[SamMask]:
        """Instances of each phrase scoring at least ``threshold``, as (H, W) masks (``size`` = (H, W))."""
        out: list[SamMask] = []
        for phrase in phrases:
            text = self.processor(text=[phrase], return_tensors="pt")
            result = self.model(
                vision_embeds=vision,
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )
            (found,) = self.processor.post_process_instance_segmentation(
                result, threshold=self.threshold, mask_threshold=0.5, target_sizes=[size]
            )
            for mask, score in zip(found["masks"], found["scores"], strict=True):
                out.append(SamMask(mask.cpu().numpy().astype(bool), float(score), "concept", (phrase,)))
        return out


def load_concept_segmenter(
    spec: str,
    device: str,
    dtype: torch.dtype,
    threshold: float,
    cache_dir: str | None = None,
    allow_hub: bool = False,
) -> ConceptSegmenter:
    """SAM 3's detector from a ``sam3`` (detector) or ``sam3_video`` (facebook/sam3) folder, with its processor."""
    from ..models.loading import resolve_model
    from ..models.mask_decoders import load_hf_concept_model

    path = resolve_model(spec, cache_dir, allow_hub)
    try:
        model, processor = load_hf_concept_model(path, device, dtype)
    except ValueError as e:
        raise ValueError(f"models.concept {spec!r}: {e}") from e
    return ConceptSegmenter(model, processor, threshold)
