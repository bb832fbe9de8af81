"""Typed parameters: one validated object parsed from params.yaml.

The numbers live in exactly one place, the packaged ``defaults/params.yaml`` (symlinked as the
repository's DVC-tracked ``params.yaml``). A workspace's own ``params.yaml`` is merged over it,
then the selected profile's overrides. The models below declare no defaults of their own, so a
value missing from the YAML is an error rather than a silent second default.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cg4ctr_tasks.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class StorageParams(_Strict):
    url: str | None
    max_image_bytes: int = Field(gt=0)
    max_image_pixels: int = Field(gt=0)


class WorldParams(_Strict):
    items: int = Field(ge=1, le=100_000)
    days: int = Field(ge=1, le=3650)
    start_date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    image_size: int = Field(ge=16, le=1024)
    categories: list[str] = Field(min_length=1)
    user_groups: list[str] = Field(min_length=1)
    devices: list[str] = Field(min_length=1)
    initial_creatives: int = Field(ge=1)
    impressions_per_day: int = Field(ge=1)
    epsilon: float = Field(ge=0.0, le=1.0)
    base_ctr: float = Field(gt=0.0, lt=1.0)
    category_hue_shift: float = Field(ge=0.0, le=0.5)
    category_brightness_shift: float = Field(ge=0.0, le=1.0)


class IngestParams(_Strict):
    max_reject_fraction: float = Field(ge=0.0, le=1.0)
    min_impressions: int = Field(ge=0)
    read_batch_bytes: int = Field(ge=1)
    stream_block_bytes: int = Field(ge=4096)
    validation_chunk_rows: int = Field(ge=1)


class SaliencyParams(_Strict):
    backend: Literal["classical", "isnet"]
    isnet_checkpoint: str | None
    isnet_input_size: int = Field(ge=32)
    classical_threshold: float = Field(gt=0.0)
    classical_border: int = Field(ge=1)
    classical_opening: int = Field(ge=0)
    classical_min_area: float = Field(ge=0.0, lt=1.0)
    shard_size: int = Field(ge=1)


class ClipTrainParams(_Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    learning_rate: float = Field(gt=0)
    bare_fraction: float = Field(ge=0.0, le=1.0)
    max_length: int = Field(ge=4)
    text_hidden: int = Field(ge=8)
    text_layers: int = Field(ge=1)
    vision_hidden: int = Field(ge=8)
    vision_layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    patch_size: int = Field(ge=2)
    projection_dim: int = Field(ge=4)
    heldout_images: int = Field(ge=1)


class CaptionParams(_Strict):
    clip_model: str
    top_tokens: int = Field(ge=1)
    kinds: list[Literal["colour", "light", "texture", "material", "scene", "style"]] = Field(
        min_length=1
    )
    phrase: str = Field(pattern=r"\{token\}")
    batch_size: int = Field(ge=1)
    shard_size: int = Field(ge=1)
    train: ClipTrainParams


class GeneratorTrainParams(_Strict):
    text_encoder: str
    samples: int = Field(ge=8)
    vae_steps: int = Field(ge=1)
    vae_crop: int = Field(ge=8)
    unet_steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    vae_learning_rate: float = Field(gt=0)
    learning_rate: float = Field(gt=0)
    kl_weight: float = Field(ge=0)
    uncond_fraction: float = Field(ge=0.0, lt=1.0)
    eval_steps: int = Field(ge=1)
    eval_samples: int = Field(ge=1)


class GenerateParams(_Strict):
    base_model: str
    candidates: int = Field(ge=1)
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0.0)
    scheduler: Literal["ddim", "ddpm", "euler", "dpm", "lcm"]
    batch_size: int = Field(ge=1)
    dtype: Literal["float32", "float16", "bfloat16"]
    compile: bool
    default_prompt: list[str] = Field(min_length=1)
    shard_size: int = Field(ge=1)
    train: GeneratorTrainParams


class LoraParams(_Strict):
    method: Literal["sft", "preference"]
    rank: int = Field(ge=1)
    alpha: float = Field(gt=0)
    learning_rate: float = Field(gt=0)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    dpo_beta: float = Field(gt=0)
    max_pairs_per_list: int = Field(ge=1)
    min_score_gap: float = Field(ge=0)


class RewardParams(_Strict):
    text_encoder: str
    image_encoder: str
    image_checkpoint: str | None
    finetune_encoders: bool
    lambda_r: float = Field(ge=0.0, le=1.0)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    hidden_size: int = Field(ge=8)
    val_fraction: float = Field(gt=0.0, lt=1.0)
    test_fraction: float = Field(gt=0.0, lt=1.0)
    min_impressions: int = Field(ge=0)
    smoothing: Literal["none", "beta"]
    bootstrap_samples: int = Field(ge=0)
    image_size: int | None = Field(ge=16)
    text_max_length: int = Field(ge=4)
    encode_batch_size: int = Field(ge=1)
    fusion_layers: int = Field(ge=1)
    fusion_heads: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    modalities: list[Literal["title", "caption", "image"]] = Field(min_length=1)
    user_group_token: bool
    list_temperature: float | None = Field(gt=0)
    ctr_link: Literal["identity", "sigmoid"]


class PromptParams(_Strict):
    lambda_p: float = Field(ge=0.0, le=1.0)
    learning_rate: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1)
    tokens_per_prompt: int = Field(ge=1)
    exploration: float = Field(ge=0.0, le=1.0)
    max_per_kind: dict[str, int]
    embed_dim: int = Field(ge=4)
    layers: int = Field(ge=1)
    heads: int = Field(ge=1)
    hidden: int = Field(ge=4)
    min_steps: int = Field(ge=0)
    oov_dropout: float = Field(ge=0.0, lt=1.0)
    round_tokens: Literal["caption", "prompt"]
    replay_logs: bool


class LabellerParams(_Strict):
    colour_tolerance: float = Field(gt=0.0, le=1.0)
    floor_step: float = Field(gt=0.0, le=1.0)
    floor_margin: int = Field(ge=0)
    floor_band: int = Field(ge=1)
    bleed_ring: int = Field(ge=1)
    bleed_fraction: float = Field(gt=0.0, le=1.0)
    min_contrast: float = Field(ge=0.0, le=1.0)
    hallucination_gap: int = Field(ge=1)
    hallucination_area: float = Field(gt=0.0)


class InspectorParams(_Strict):
    enabled: bool
    max_attempts: int = Field(ge=1, le=100)
    image_size: int = Field(ge=16, le=1024)
    hidden: int = Field(ge=4)
    patch_size: int = Field(ge=1)
    fusion_layers: int = Field(ge=1)
    fusion_heads: int = Field(ge=1)
    dropout: float = Field(ge=0.0, lt=1.0)
    learning_rate: float = Field(gt=0.0)
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    val_fraction: float = Field(ge=0.0, lt=1.0)
    class_weight_power: float = Field(ge=0.0, le=1.0)
    shard_size: int = Field(ge=1)
    labelled_per_item: int = Field(ge=1)
    labeller: LabellerParams

    @model_validator(mode="after")
    def _shapes(self) -> InspectorParams:
        if (
            self.image_size % self.patch_size
            or self.patch_size % 2
            or self.hidden % self.fusion_heads
        ):
            raise ValueError(
                "inspector: image_size must be a multiple of patch_size (even), hidden of "
                "fusion_heads"
            )
        return self


class SelectParams(_Strict):
    k: int = Field(ge=1)


class CycleParams(_Strict):
    train: bool
    reward_refresh_every: int = Field(ge=0)


class RoundSpec(_Strict):
    id: int = Field(ge=1, le=999)
    prev: str
    mode: Literal["lora", "prompt"]


class AirflowParams(_Strict):
    schedule: str | None
    start_date: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    retries: int = Field(ge=0)
    retry_delay_s: float = Field(ge=0)
    max_shards: int = Field(ge=1, le=1024)
    previous_run_poke_s: float = Field(gt=0)
    previous_run_timeout_s: float = Field(gt=0)


class VersioningParams(_Strict):
    enabled: bool
    remote: str | None
    lock_timeout_s: float = Field(ge=0)


class Params(_Strict):
    profile: str
    seed: int = Field(ge=0)
    vocab: str | None
    storage: StorageParams
    world: WorldParams
    ingest: IngestParams
    saliency: SaliencyParams
    caption: CaptionParams
    generate: GenerateParams
    lora: LoraParams
    reward: RewardParams
    prompt: PromptParams
    inspector: InspectorParams
    select: SelectParams
    cycle: CycleParams
    rounds: dict[str, RoundSpec]
    airflow: AirflowParams
    versioning: VersioningParams
    profiles: dict[str, dict[str, Any]]

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> Params:
        if self.reward.val_fraction + self.reward.test_fraction >= 0.9:
            raise ValueError("reward.val_fraction + reward.test_fraction must be < 0.9")
        for index, (name, spec) in enumerate(self.rounds.items(), start=1):
            expected = (f"round-{index:03d}", index, f"round-{index - 1:03d}")
            mode = "lora" if index % 2 else "prompt"
            if (name, spec.id, spec.prev) != expected or spec.mode != mode:
                raise ValueError(
                    f"rounds: entry {index} must be {expected[0]}: {{id: {index}, prev: "
                    f"{expected[2]}, mode: {mode}}} (odd rounds: LoRA, even: prompt model)"
                )
        return self


def default_params_text() -> str:
    return resources.files("cg4ctr_tasks").joinpath("defaults/params.yaml").read_text("utf-8")


_REPLACED = ("profiles", "rounds")  # a workspace lists these whole; merging would keep defaults


def _merge(base: dict[str, Any], override: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; unknown keys are reported by pydantic."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in _REPLACED:
            out[key] = _merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; DVC's parser (ruamel) refuses the file.
    Refusing here too means a params.yaml that `dvc repro` would reject never runs a round."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level")
    return data


def _format_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'")
        elif err["type"] == "missing":
            lines.append(f"{source}: missing key '{key}'")
        else:
            lines.append(f"{source}: key '{key}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)


def load_params(
    path: str | Path | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> Params:
    """Load the defaults, merge a workspace params file (if it exists), a profile, overrides."""
    merged = _read_yaml(default_params_text(), "defaults/params.yaml")
    source = "params.yaml"
    if path is not None and Path(path).is_file():
        source = str(path)
        merged = _merge(merged, _read_yaml(Path(path).read_text("utf-8"), source))
    if overrides:
        merged = _merge(merged, overrides)
    chosen = profile or merged.get("profile", "sim")
    if chosen != "sim":
        profiles = merged.get("profiles") or {}
        if chosen not in profiles:
            raise UserError(
                f"{source}: unknown profile '{chosen}' (known: sim, {', '.join(profiles)})"
            )
        merged = _merge(merged, profiles[chosen])
    merged["profile"] = chosen
    try:
        return Params.model_validate(merged)
    except ValidationError as exc:
        raise UserError(_format_error(exc, source)) from None
