"""The simulated world's own small CLIP (`cg4ctr sim train-clip`), the captioner's theta_c.

No CLIP checkpoint can be downloaded here, so the project trains a small one on what the
world's public renderer draws: backgrounds from ``random_tokens`` (bare, or with a product
pasted by ``compose``) paired with their token descriptions. Its text tower is also the text
encoder of the sim diffusion model. The output is an ordinary ``CLIPModel.save_pretrained``
folder with a word-level tokenizer and a ``CLIPProcessor``, so the captioner and the generator
load it through the same ``from_pretrained`` code as a hub checkpoint.

Texts are random subsets of an image's tokens (the captioner asks about one token at a time,
the generator about whole prompts), and the contrastive loss counts every image that carries
all of a text's tokens as a positive for that text (a multi-positive InfoNCE).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from cg4ctr_tasks import storage
from cg4ctr_tasks.params import Params
from cg4ctr_tasks.prompts.vocab import Vocab, load_vocab
from cg4ctr_tasks.sim.render import compose, draw_product, random_tokens, render_background

if TYPE_CHECKING:
    import torch
    from transformers import CLIPModel, CLIPProcessor

ASSET_NAME = "sim-clip"
PAD, UNK, BOS, EOS = "<|pad|>", "<|unk|>", "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)  # ids 0..3; EOS != 2 so CLIP pools at the first EOS


@dataclass(frozen=True)
class RenderedBatch:
    images: np.ndarray  # N x H x W x 3 uint8
    tokens: list[list[str]]


@dataclass(frozen=True)
class ClipTrainSummary:
    out_dir: str
    seed: int
    steps: int
    images_seen: int
    parameters: int
    final_loss: float
    train_seconds: float
    train_cpu_seconds: float
    heldout_images: int
    colour_accuracy: float
    texture_accuracy: float
    light_accuracy: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def render_batch(
    vocab: Vocab, size: int, count: int, bare_fraction: float, rng: np.random.Generator
) -> RenderedBatch:
    """Renders as the world draws creatives: tokens -> background, a product on most of them."""
    images, tokens = [], []
    for _ in range(count):
        chosen = random_tokens(vocab, rng)
        background = render_background(chosen, vocab, size, rng)
        if rng.random() >= bare_fraction:
            product = draw_product(int(rng.integers(6)), size, rng)
            background = compose(product, background)
        images.append(background)
        tokens.append(chosen)
    return RenderedBatch(np.stack(images), tokens)


def build_tokenizer(vocab: Vocab, max_length: int) -> Any:
    """A word-level fast tokenizer over the closed vocabulary: BOS tokens EOS, padded with PAD."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *vocab.tokens))}
    core = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    core.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, ids[BOS]), (EOS, ids[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
    )


def build_clip(params: Params, vocab: Vocab) -> tuple[CLIPModel, CLIPProcessor]:
    """A fresh small CLIP sized by ``caption.train`` and its processor (tokenizer + images)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    cfg = params.caption.train
    size = params.world.image_size
    config = CLIPConfig(
        text_config={
            "vocab_size": len(SPECIAL_TOKENS) + len(vocab),
            "hidden_size": cfg.text_hidden,
            "intermediate_size": 4 * cfg.text_hidden,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.heads,
            "max_position_embeddings": cfg.max_length,
            "pad_token_id": SPECIAL_TOKENS.index(PAD),
            "bos_token_id": SPECIAL_TOKENS.index(BOS),
            "eos_token_id": SPECIAL_TOKENS.index(EOS),
        },
        vision_config={
            "image_size": size,
            "patch_size": cfg.patch_size,
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": 4 * cfg.vision_hidden,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.heads,
        },
        projection_dim=cfg.projection_dim,
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    processor = CLIPProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(vocab, cfg.max_length)
    )
    return CLIPModel(config), processor


def _subset_texts(tokens: list[list[str]], rng: np.random.Generator) -> list[list[str]]:
    """For each image, a random non-empty subset of its tokens, in the renderer's order."""
    texts = []
    for chosen in tokens:
        keep = int(rng.integers(1, len(chosen) + 1))
        picked = sorted(rng.choice(len(chosen), size=keep, replace=False))
        texts.append([chosen[i] for i in picked])
    return texts


def multi_positive_loss(
    logits: torch.Tensor, image_tokens: list[list[str]], texts: list[list[str]]
) -> torch.Tensor:
    """Symmetric InfoNCE where image i and text j match when text j's tokens are all in image i.

    ``logits[i, j]`` is the scaled similarity of image i and text j; targets are the positives
    of each row (column) with equal weight, so a one-token text is not punished for matching
    every image that shows its token.
    """
    import torch

    positive = torch.tensor(
        [[set(text) <= set(img) for text in texts] for img in image_tokens], dtype=torch.float32
    )
    image_loss = -(positive * logits.log_softmax(dim=1)).sum(1) / positive.sum(1)
    text_loss = -(positive * logits.log_softmax(dim=0)).sum(0) / positive.sum(0)
    return (image_loss.mean() + text_loss.mean()) / 2


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_clip(
    params: Params,
    out_dir: str | Path,
    seed: int,
    command: str,
    steps: int | None = None,
    show_progress: bool = True,
) -> ClipTrainSummary:
    """Train the world's CLIP from ``seed`` and save it (with manifest.json) to ``out_dir``.

    The folder is written beside ``out_dir`` and renamed into place whole, so a reader that
    sees manifest.json sees a complete checkpoint.
    """
    import torch

    from cg4ctr_tasks.caption import token_accuracy

    cfg = params.caption.train
    total_steps = steps if steps is not None else cfg.steps
    vocab = load_vocab(params.vocab)
    size = params.world.image_size
    train_seq, heldout_seq = np.random.SeedSequence([seed, 0xC11F]).spawn(2)
    rng = np.random.default_rng(train_seq)
    torch.manual_seed(seed)

    model, processor = build_clip(params, vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.05)
    warmup = max(1, total_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + np.cos(np.pi * min(step, total_steps) / total_steps))
        ),
    )
    model.train()
    started, cpu_started = time.perf_counter(), time.process_time()
    loss_value = float("nan")
    progress = tqdm(range(total_steps), desc="train sim CLIP", disable=not show_progress)
    for _ in progress:
        batch = render_batch(vocab, size, cfg.batch_size, cfg.bare_fraction, rng)
        texts = _subset_texts(batch.tokens, rng)
        inputs = processor(
            text=[" ".join(t) for t in texts],
            images=list(batch.images),
            return_tensors="pt",
            padding="max_length",
            truncation=True,
        )
        out = model(**inputs)
        loss = multi_positive_loss(out.logits_per_image, batch.tokens, texts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        progress.set_postfix(loss=f"{loss_value:.3f}")
    train_seconds = time.perf_counter() - started
    train_cpu_seconds = time.process_time() - cpu_started

    model.eval()
    heldout = render_batch(
        vocab, size, cfg.heldout_images, cfg.bare_fraction, np.random.default_rng(heldout_seq)
    )
    accuracy = token_accuracy(model, processor, vocab, heldout, params.caption)

    out_dir = Path(out_dir)
    with storage.atomic_local_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        summary = ClipTrainSummary(
            out_dir=str(out_dir),
            seed=seed,
            steps=total_steps,
            images_seen=total_steps * cfg.batch_size,
            parameters=sum(p.numel() for p in model.parameters()),
            final_loss=round(loss_value, 4),
            train_seconds=round(train_seconds, 1),
            train_cpu_seconds=round(train_cpu_seconds, 1),
            heldout_images=cfg.heldout_images,
            colour_accuracy=accuracy["colour"],
            texture_accuracy=accuracy["texture"],
            light_accuracy=accuracy["light"],
        )
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "asset": ASSET_NAME,
            "command": command,
            "wall_seconds": summary.train_seconds,
            "torch_threads": torch.get_num_threads(),
            "files": files,
            "summary": summary.as_dict(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
    return summary
