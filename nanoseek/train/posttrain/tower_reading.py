"""The vision tower's reading stage: a fresh SigLIP tower learns to transcribe the task's pictures before vision SFT.

DeepSeek-VL starts from a SigLIP encoder pretrained on image-text pairs, and DeepSeek-OCR
trains its encoder on OCR data before the language model reads its tokens. `tiny-vl`'s
tower starts from random weights (no pretrained tower is available offline), and SFT's
signal, through the aligner and the language model, is too weak to teach it to see: a
tower trained inside SFT stays at chance on the task's pictures (docs/post-training.md).
This stage is the tower's pretraining, cut down to what the task needs. The tower's last
hidden states (one row per patch) go through a *reading head* that names each character of
the picture's transcription: slot i holds the i-th character of "47 + 38" or the end mark.
Cross-entropy over the slots, fresh pictures every step from the task's training split (the
test split is never drawn), AdamW (64 pictures a step at 2e-3: measured ahead of 32 at 1e-3
in the same minutes on one core) with a linear warm-up and a cosine decay over the stage's
steps or minutes, whichever ends first.
Afterwards the head is dropped and the tower goes on to SFT, frozen there unless
`--train-vision`: the language model learns to read the tower's rows, not a moving target.

The head has two readers, trained together (their cross-entropies summed): one reads all
rows flattened, the other reads the j-th character off the tower's j-th row alone, with one
map shared by every row. The first teaches the glyphs; the second makes the tower lay its
reading out in order, one character a row and in one code for all rows, which is the form
the language model reads best (measured in docs/post-training.md): the aligner maps every
row alike, so a code of its own per row would leave it a different map to learn per row.
The stage reports how well each reads pictures it never trained on (drawn from the training
split with a seed of their own): per character and whole transcriptions.

Drawing 64 pictures with PIL takes more than half as long as a step of the tower, so a
forked DataLoader worker draws the next batches while the tower trains on the cores left to
it: the same batches, about 1.4x the steps in the same minutes on 2 cores.
"""

from __future__ import annotations

import itertools
import multiprocessing
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from nanoseek.train.schedule import lr_at

CHARS = "0123456789+-* "  # what the transcriptions hold; index len(CHARS) is the end mark
WARMUP_STEPS = 100
MIN_LR_RATIO = 0.05
CHECK_PICTURES = 256  # held-out pictures the stage reports on


class TowerReadingError(ValueError):
    """The reading stage cannot run on this data or tower."""


class ReadingHead(nn.Module):
    """Two linear readers of the tower's rows [N, P, D], each giving logits [N, slots, len(CHARS)+1].
    `flat` reads all rows flattened, so a glyph anywhere can name any slot: the tower learns
    the glyphs fastest this way. `row` reads slot j off row j alone, with one map for every
    row, so the tower learns to write the j-th character into its j-th row, in reading order
    and in one code for all rows: the form the aligner, which maps every row alike, passes
    on to the language model as it passes text."""

    def __init__(self, patches: int, width: int, slots: int):
        super().__init__()
        if slots > patches:
            raise TowerReadingError(f"{slots} characters to read but the tower has {patches} rows")
        self.slots, self.chars = slots, len(CHARS) + 1
        self.flat = nn.Linear(patches * width, slots * self.chars)
        self.row = nn.Linear(width, self.chars)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.flat(hidden.flatten(1)).view(len(hidden), self.slots, self.chars)
        return flat, self.row(hidden[:, :self.slots])


def char_targets(texts: list[str], slots: int) -> torch.Tensor:
    """[N, slots] character indices, each text followed by end marks."""
    out = torch.full((len(texts), slots), len(CHARS), dtype=torch.long)
    for i, text in enumerate(texts):
        if len(text) > slots or any(c not in CHARS for c in text):
            raise TowerReadingError(f"transcription {text!r} does not fit {slots} slots of {CHARS!r}")
        out[i, :len(text)] = torch.tensor([CHARS.index(c) for c in text], dtype=torch.long)
    return out


def reading_task(task):
    """The task, if its pictures carry their transcription (`pictures(split, n, seed)`)."""
    if not callable(getattr(task, "pictures", None)):
        raise TowerReadingError(f"task {getattr(task, 'name', task)!r} has no transcribed pictures; the "
                                "tower's reading stage needs one (rendered_arithmetic)")
    return task


def slots_for(task) -> int:
    """The longest transcription: two operands of `digits` digits around " op "."""
    return 2 * task.digits + 3


def batch_of(task, processor, split_seed: int, n: int, slots: int, device=None):
    """(pixel_values [n,3,S,S], targets [n, slots]) of n fresh training-split pictures, on
    `device`. Training steps draw with seeds >= 0, the held-out check with negative ones."""
    from nanoseek.model.vl.vl_image import preprocess
    pairs = task.pictures("train", n, split_seed)
    images, texts = [p[0] for p in pairs], [p[1] for p in pairs]
    pixels = preprocess(images, processor, max_images=n)
    return pixels.to(device), char_targets(texts, slots).to(device)


class StageBatches(IterableDataset):
    """The stage's training batches in order, batch k drawn with seed * 1_000_003 + k: the
    same pixels and targets whether drawn in this process or in a DataLoader worker."""

    def __init__(self, task, processor, seed: int, batch_size: int, slots: int):
        self.task, self.processor, self.seed = task, processor, seed
        self.batch_size, self.slots = batch_size, slots

    def __iter__(self):
        for step in itertools.count():
            yield batch_of(self.task, self.processor, self.seed * 1_000_003 + step, self.batch_size, self.slots)


def stage_batches(task, processor, seed: int, batch_size: int, slots: int, workers: int):
    """An endless iterator over the stage's batches. With workers >= 1, worker processes
    render and preprocess the next batches while the tower trains on this one: drawing 64
    pictures with PIL takes more than half as long as a step of `tiny-vl`'s tower on one
    core. The workers are forked: the task need not pickle."""
    return iter(DataLoader(StageBatches(task, processor, seed, batch_size, slots), batch_size=None,
                           num_workers=workers, prefetch_factor=4 if workers else None,
                           multiprocessing_context="fork" if workers else None))


@torch.no_grad()
def reading_scores(tower, head, pixels, targets, batch: int = 64) -> dict:
    """Share of characters and of whole transcriptions each reader gets right (flat: all
    rows; row: slot j off row j)."""
    was = tower.training
    tower.eval()
    flat, row = [], []
    for i in range(0, len(pixels), batch):
        f, r = head(tower(pixel_values=pixels[i:i + batch]).last_hidden_state)
        flat.append(f.argmax(-1) == targets[i:i + batch])
        row.append(r.argmax(-1) == targets[i:i + batch])
    tower.train(was)
    flat, row = torch.cat(flat), torch.cat(row)
    return {"char_accuracy": round(float(flat.float().mean()), 4), "exact": round(float(flat.all(1).float().mean()), 4),
            "row_char_accuracy": round(float(row.float().mean()), 4),
            "row_exact": round(float(row.all(1).float().mean()), 4)}


def lr_now(step: int, progress: float, lr: float, steps: int = 0) -> float:
    """train/schedule.py's warm-up and cosine to MIN_LR_RATIO * lr, run as the Trainer runs
    it under a time limit: the warm-up counts steps (WARMUP_STEPS), the decay follows
    `progress` (the larger of the steps' and the minutes' share done), here mapped onto
    `steps` (or a million when only minutes bound the stage)."""
    total = steps if steps > 0 else 1_000_000
    if step >= WARMUP_STEPS:
        step = max(step, round(progress * total))
    return lr_at(step, lr, total, WARMUP_STEPS, "cosine", MIN_LR_RATIO)


def teach_tower_to_read(tower, task, processor, steps: int = 0, minutes: float = 0.0, batch_size: int = 64,
                        lr: float = 2e-3, seed: int = 0, workers: int = 1, log=print,
                        log_every: float = 60.0) -> dict:
    """Train `tower` (transformers' SigLIP vision model, in place) with a reading head on
    `task`'s training pictures for `steps` steps and/or `minutes` (0: no limit of that kind;
    at least one is needed); `workers` processes draw the pictures (0: this one). Returns
    the stage's record (steps, seconds, held-out scores)."""
    task = reading_task(task)
    if steps <= 0 and minutes <= 0:
        raise TowerReadingError("the reading stage needs a length: steps > 0 or minutes > 0")
    if seed < 0:  # training pictures are drawn with seeds >= 0, the held-out check below 0
        raise TowerReadingError(f"seed {seed} must be >= 0")
    if workers < 0:
        raise TowerReadingError(f"workers={workers} must be >= 0")
    if "fork" not in multiprocessing.get_all_start_methods():
        workers = 0  # no forked workers on this platform: the pictures are drawn here
    cfg = tower.config
    patches, slots = (cfg.image_size // cfg.patch_size) ** 2, slots_for(task)
    torch.manual_seed(seed)
    device = next(tower.parameters()).device
    head = ReadingHead(patches, cfg.hidden_size, slots).to(device)
    check = batch_of(task, processor, -1 - seed, CHECK_PICTURES, slots, device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tower.train()
    before = reading_scores(tower, head, *check)
    batches = stage_batches(task, processor, seed, batch_size, slots, workers)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - workers))  # the workers' cores are theirs
    try:
        step, seconds = train_stage(tower, head, opt, params, batches, check, steps, minutes, lr, device, log,
                                    log_every)
    finally:
        torch.set_num_threads(threads)
        del batches  # stops the workers
    tower.eval()
    after = reading_scores(tower, head, *check)
    record = {"steps": step, "seconds": seconds, "batch_size": batch_size,
              "lr": lr, "held_out_pictures": CHECK_PICTURES, "before": before, "after": after}
    log(f"tower reading: {step} steps in {seconds:.0f} s; held-out pictures read whole "
        f"{before['exact']:.3f} -> {after['exact']:.3f} (all rows), {before['row_exact']:.3f} -> "
        f"{after['row_exact']:.3f} (row by row)")
    return record


def train_stage(tower, head, opt, params, batches, check, steps: int, minutes: float, lr: float, device, log,
                log_every: float) -> tuple[int, float]:
    """The stage's loop until `steps` or `minutes` run out; returns (steps, seconds)."""
    t0 = last_log = time.perf_counter()
    step, limit = 0, minutes * 60
    while True:
        elapsed = time.perf_counter() - t0
        progress = max(step / steps if steps > 0 else 0.0, elapsed / limit if limit > 0 else 0.0)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_now(step, progress, lr, steps)
        pixels, targets = (t.to(device) for t in next(batches))
        flat, row = head(tower(pixel_values=pixels).last_hidden_state)
        loss = (F.cross_entropy(flat.flatten(0, 1), targets.flatten())
                + F.cross_entropy(row.flatten(0, 1), targets.flatten()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if time.perf_counter() - last_log >= log_every:
            last_log = time.perf_counter()
            log(f"tower reading: step {step}, loss {loss.item():.3f}, held-out "
                + ", ".join(f"{k} {v}" for k, v in reading_scores(tower, head, *check).items())
                + f", {last_log - t0:.0f} s")
    return step, round(time.perf_counter() - t0, 1)
