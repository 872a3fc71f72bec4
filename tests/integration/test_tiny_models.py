"""Tiny models: built offline and deterministically, loaded through the same code as real checkpoints
(presets, local folders, s3:// prefixes), usable by transformers, segment_anything and vLLM."""

import hashlib
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from rea2seg_ray.models.loading import ModelNotFound, load_sam, load_vlm, resolve_model
from rea2seg_ray.models.tiny import build_tiny_models

from ..conftest import upload_tree


def _digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.mark.slow
def test_build_is_deterministic_and_offline(tmp_path):
    a = build_tiny_models(tmp_path / "a", seed=0)
    b = build_tiny_models(tmp_path / "b", seed=0)
    for name in a:
        assert _digest(a[name]) == _digest(b[name]), name
    # Rebuilding over a complete model keeps it (no work), force rebuilds to the same bytes.
    again = build_tiny_models(tmp_path / "a", seed=0, force=True)
    assert _digest(again["tiny-sam"]) == _digest(a["tiny-sam"])


def test_vlm_loads_through_real_loader_and_gives_attentions(model_cache):
    model, processor = load_vlm("tiny-qwen2-vl")
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float32
    tok = processor.tokenizer
    assert (
        len(tok.encode("Yes", add_special_tokens=False)) == 1
        and len(tok.encode("No", add_special_tokens=False)) == 1
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    msgs = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Segment the red circle."}]}
    ]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    t, h, w = inputs["image_grid_thw"][0].tolist()
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == t * h * w // 4  # 2x2 spatial merge
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    seq = inputs["input_ids"].shape[1]
    assert len(out.attentions) == 2 and out.attentions[0].shape == (1, 2, seq, seq)
    assert torch.isfinite(out.logits).all()


def test_sam_loads_and_predicts_at_image_size(model_cache, tmp_path):
    from segment_anything import SamPredictor

    sam = load_sam("tiny-sam")
    predictor = SamPredictor(sam)
    predictor.set_image(np.random.default_rng(0).integers(0, 255, (97, 161, 3), dtype=np.uint8))
    masks, scores, _ = predictor.predict(point_coords=np.array([[50.0, 40.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 97, 161) and scores.shape == (3,)
    # A .pth state dict (weights_only loading) beside sam_config.json loads the same weights.
    folder = tmp_path / "sam-pth"
    folder.mkdir()
    (folder / "sam_config.json").write_text(
        (model_cache / "tiny" / "tiny-sam" / "sam_config.json").read_text()
    )
    torch.save(sam.state_dict(), folder / "model.pth")
    sam2 = load_sam(str(folder))
    for (k, v), (_, v2) in zip(sam.state_dict().items(), sam2.state_dict().items(), strict=True):
        assert torch.equal(v, v2), k
    # A checkpoint whose type cannot be told is a clear error.
    bare = tmp_path / "weights.pth"
    torch.save(sam.state_dict(), bare)
    with pytest.raises(ModelNotFound, match="cannot tell the SAM model type"):
        load_sam(str(bare))


def test_unknown_model_spec_is_clear():
    with pytest.raises(ModelNotFound, match=r"not a preset .*\(hub ids need models\.allow_hub=true\)"):
        resolve_model("someorg/some-model")


def test_models_load_from_s3_prefix_once(model_cache, s3_bucket, tmp_path):
    src = model_cache / "tiny"
    upload_tree(src / "tiny-qwen2-vl", s3_bucket, "models/tiny-qwen2-vl")
    upload_tree(src / "tiny-sam", s3_bucket, "models/sam")
    cache = str(tmp_path / "node-cache")
    path = resolve_model(f"s3://{s3_bucket}/models/tiny-qwen2-vl", cache_dir=cache)
    assert (path / "model.safetensors").exists() and (path / ".complete").exists()
    model, _ = load_vlm(f"s3://{s3_bucket}/models/tiny-qwen2-vl", cache_dir=cache)
    assert model.config.model_type == "qwen2_vl"
    sam = load_sam(f"s3://{s3_bucket}/models/sam", cache_dir=cache)
    assert sam.image_encoder.img_size == 512
    # Cached per node: once the bucket is gone, the same spec still resolves (no second download).
    import boto3

    s3 = boto3.resource("s3").Bucket(s3_bucket)
    s3.objects.all().delete()
    assert resolve_model(f"s3://{s3_bucket}/models/tiny-qwen2-vl", cache_dir=cache) == path


@pytest.mark.slow
def test_tiny_vlm_serves_in_vllm_cpu(model_cache):
    """The scorer path (issue C) serves the same folder with vLLM on the CPU: in-process, eager, block size 32."""
    path = resolve_model("tiny-qwen2-vl-scorer")
    code = textwrap.dedent(f"""
        import numpy as np
        from PIL import Image
        from vllm import LLM, SamplingParams
        llm = LLM(model={str(path)!r}, enforce_eager=True, kv_cache_memory_bytes=256 << 20, block_size=32,
                  max_model_len=1024, limit_mm_per_prompt={{"image": 1, "video": 0}}, dtype="float32")
        tok = llm.get_tokenizer()
        yes, no = tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No")
        prompt = ("<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Is this the cup?<|im_end|>\\n"
                  "<|im_start|>assistant\\n")
        img = Image.fromarray(np.full((112, 112, 3), 127, np.uint8))
        out = llm.generate([{{"prompt": prompt, "multi_modal_data": {{"image": img}}}}],
                           SamplingParams(max_tokens=1, temperature=0, allowed_token_ids=[yes, no]))
        print("TOKEN", out[0].outputs[0].token_ids[0] in (yes, no))
    """)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "TOKEN True" in r.stdout, r.stderr[-3000:]
