"""Train the edge-vlm: a small ViT + projector (and a LoRA) that lets SmolLM2-135M see the synthetic scenes.

Two steps, on two machines:

    # here (llama.cpp installed): pack the text model and the prompt tokens for the training machine
    python -m scripts.vlm_text pack --out train_cache
    python -m scripts.train_vlm prepare --cache train_cache
    # on the GPU machine (torch, no llama.cpp, no OpenCV): train, then export mmproj.gguf and lora.gguf
    python -m scripts.train_vlm train --cache train_cache --out OUT --minutes 8 --seed 0

The training examples are exactly what the runtime decodes: the session's opening (system prompt, start
of the user turn), the frames' embeddings one after another, then the chat turns as Session.question_prompt
renders them, questions and answers of edge_runtime.scenes, several per clip (multi-turn, like the
benchmark). The loss is on the answer tokens and the end-of-turn token. An auxiliary loss on the encoder's
pooled output (is an object there, its kind, colour, digit) gives the ViT a direct signal from the first
step; it is not exported. Clips are short (1 to --max-frames frames, a curriculum from single frames up);
the benchmark evaluates on streams ten times longer, with seeds training never uses (training seeds are
>= 10^6, see TRAIN_SEED_BASE).

With --compressed-fraction, that share of the batches are streams answered as the runtime answers them under
a budget |M| of at most --compressed-max-frames frames: the frames go through the model in the runtime's
steps, and before each step that would pass |M|, an InfiniPot-V pass over the model's own keys and values
(infinipot_v_pass, the runtime's selection) shrinks the memory to |C| per (layer, KV head) and re-indexes its
positions; later frames and the chat attend to what is left (vlm_text's memory). Gradients flow through the
kept tokens into the encoder and the LoRA: the model learns to answer from a compressed memory. The model
never attends to more than |M| frames at once, so the clips stay short in what it sees together, while the
stream itself is long. (v2, trained on short clips alone, answered held-out 120-frame streams 91.8 % right
from the whole memory and 83.2 % through a memory of 1/8: step 0 of edge-vlm v6's train_log.json.)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime import scenes
from scripts.scene_tools import object_patches

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("train_vlm")

TRAIN_SEED_BASE = 1_000_000  # training streams use seeds from here on; benchmarks use small seeds
TOKENS_FILE = "tokens.json"


# -- prompt tokens (here) ---------------------------------------------------------------------------------

def prepare(cache: Path, n_streams: int = 4000) -> Path:
    """Token ids of every prompt piece the trainer composes, checked against Session.question_prompt."""
    from edge_runtime.builtin import resolve_model
    from edge_runtime.model import ModelConfig, VisionLanguageModel
    from edge_runtime.session import Session, SessionConfig

    model = VisionLanguageModel(ModelConfig(resolve_model("smollm2"), ROOT / "fixtures" / "smollm2-mmproj-random.gguf"))
    session = Session(model, SessionConfig(n_ctx=2048))
    questions: set[str] = set()
    answers: set[str] = set()
    rng = np.random.default_rng(0)
    for i in range(n_streams):  # every wording and answer the scenes produce, by sampling them
        stream = scenes.make_stream(TRAIN_SEED_BASE + i, int(rng.integers(1, 121)))
        for q in stream.questions():
            questions.add(q.text)
            answers.add(q.answer)
    end = "<|im_end|>"
    first = {q: model.tokenize(f"\n{q}{end}\n<|im_start|>assistant\n") for q in sorted(questions)}
    later = {q: model.tokenize(f"\n<|im_start|>user\n{q}{end}\n<|im_start|>assistant\n") for q in sorted(questions)}
    answer = {a: model.tokenize(f"{a}{end}") for a in sorted(answers)}
    # The pieces must join into exactly what the runtime decodes, history included.
    qs, ans = sorted(questions), sorted(answers)
    for k in range(200):
        turns = [(qs[(7 * k + j) % len(qs)], ans[(3 * k + j) % len(ans)]) for j in range(k % 4)]
        q = qs[(11 * k) % len(qs)]
        session.history = list(turns)
        want = model.tokenize(session.question_prompt(q))
        got: list[int] = []
        for j, (tq, ta) in enumerate(turns):
            got += (later if j else first)[tq] + answer[ta]
        got += (later if turns else first)[q]
        if got != want:
            raise SystemExit(f"prompt pieces do not join into the runtime's prompt for {turns} + {q!r}")
    out = {"prefix": model.tokenize(session.opening_text, add_special=True), "first": first, "later": later,
           "answer": answer}
    path = cache / TOKENS_FILE
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    log.info("%d questions, %d answers, prefix of %d tokens -> %s", len(first), len(answer), len(out["prefix"]), path)
    return path


# -- examples (there, in data-loader workers) -------------------------------------------------------------

@dataclass
class TrainConfig:
    seed: int = 0
    minutes: float = 8.0
    batch: int = 96
    max_frames: int = 12  # the benchmark's streams are 120 frames: ten times the longest clip
    single_frame_fraction: float = 0.15  # curriculum: the first steps see one frame, then 1..max_frames
    turns: int = 3  # questions per clip, answered one after another from one memory
    lr_vision: float = 1e-3  # the encoder starts from scratch
    lr_lora: float = 5e-4
    lora_rank: int = 8  # 0: frozen text model
    aux_weight: float = 0.3
    warmup_steps: int = 100
    workers: int = 12
    eval_every: int = 200
    steps: int = 0  # stop after this many steps (reproducible); 0: stop at --minutes
    total_steps: int = 0  # the cosine ends at this step, across resumed calls; 0: at the end of this call
    position_gap: int = 0  # a clip draws a gap scale up to this, then gaps between its frames: long-stream distances
    sparse_fraction: float = 0.0  # clips with 1-2 brief appearances, mostly empty frames, as long streams are
    digit_weight: float = 1.0  # the digit's auxiliary loss, times this: digits are rare and the hardest to read
    stream_frames: int = 0  # a clip stands for a stream up to this long: its empty frames weigh more in attention
    pruned_fraction: float = 0.0  # clips whose older background patches weigh less (tried; compressed works)
    compressed_fraction: float = 0.0  # batches of streams answered from a memory InfiniPot-V keeps in a budget
    compressed_batch: int = 8  # ... this many streams ...
    compressed_frames: int = 80  # ... of half this many frames to this many (a pass every 2-3 of them) ...
    compressed_max_frames: int = 12  # ... under |M| of 8 to this many frames: never more at once than a clip
    init: str = ""  # an exported model folder (mmproj.gguf, lora.gguf) to start from instead of from scratch
    eval_size: int = 64  # held-out clips per evaluation, at 1 and at max_frames frames
    long_eval_frames: int = 120  # held-out streams this long, full cache, contiguous positions: the benchmark's task
    long_eval_size: int = 32  # 16 streams moved 5-10 points from one eval to the next
    long_turns: int = 8  # questions per long stream, one after another: the benchmark asks all of a stream's


OBJECT_LABELS = {  # the auxiliary targets: index 0 means "no object in this frame"
    "kind": (None, *scenes.SHAPES),
    "colour": (None, *scenes.COLOURS),
    "digit": (None, *range(10)),
}


def frame_labels(stream: scenes.Stream, t: int) -> list[int]:
    event = stream.event_at(t)
    if event is None:
        return [0, 0, 0]
    obj = event.obj
    return [OBJECT_LABELS["kind"].index(obj.kind), OBJECT_LABELS["colour"].index(obj.colour),
            OBJECT_LABELS["digit"].index(obj.digit) if obj.digit is not None else 0]


SPARSE_EVENTS = (1, 2)  # a sparse clip: one or two appearances ...
SPARSE_DURATION = (1, 4)  # ... of a few frames each, so most of a 12-frame clip is background, as in long streams
# A compressed memory (InfiniPot-V at 1/8 of a stream) keeps the objects and the newest frames but little of the
# background: an older background patch then weighs w in [PRUNED_WEIGHT, 1] (log-uniform), not its stream share.
PRUNED_WEIGHT = 0.03
RECENT_WHOLE = 2  # the newest frames stay whole under compression (InfiniPot-V's recent frames)
# A compressed stream: the runtime's memory, |M| frames shrunk to |C| = KEEP_FRACTION |M| whole frames
# (SessionConfig.keep_fraction) by InfiniPot-V with r = RECENT_FRACTION x |M|'s frames (InfiniPotV.recent_fraction)
# and alpha COMPRESSED_ALPHA (InfiniPotV.alpha); tests pin them to the runtime's.
KEEP_FRACTION = 0.75
RECENT_FRACTION = 0.125
COMPRESSED_ALPHA = 0.5
COMPRESSED_MIN_FRAMES = 8  # the smallest |M| trained: |C| 6 frames, a pass every 2


def memory_geometry(budget_frames: int) -> tuple[int, int]:
    """The runtime's memory of |M| = budget_frames frames: frames it keeps at a pass (|C|), and r."""
    return int(KEEP_FRACTION * budget_frames), max(1, round(RECENT_FRACTION * budget_frames))


def make_example(seed: int, n_frames: int, n_turns: int, tokens: dict, tokens_per_frame: int,
                 position_gap: int = 0, sparse: bool = False, stream_frames: int = 0, pruned: bool = False,
                 compressed: int = 0) -> dict:
    """One clip and its chat: ids (-1 where a frame token goes), labels (-100 where no loss), positions, frames,
    key_weight (how many tokens each token counts as in attention).

    With position_gap, the clip draws a gap scale up to it, and each frame starts up to that many positions
    after the previous one ends: relative distances between a question and its evidence then span what a
    long stream has, while the clip stays short. sparse: few, brief appearances (SPARSE_EVENTS, SPARSE_DURATION).

    With stream_frames, the clip draws a stream length L in [n_frames, stream_frames] and each of its empty
    frames counts as (L - frames with an object) / (empty frames) frames in every attention: the softmax
    mass that background takes in a long stream, where a few appearances sit among ~100 empty frames.
    The frames themselves stay n_frames; only their weight in the softmax (vlm_text's key_weight) changes.

    pruned: instead, the clip stands for a compressed memory, where a pass kept the distinctive tokens (the
    objects' patches) and dropped most of the redundant background: background patches of the frames older
    than the RECENT_WHOLE newest weigh w < 1, as if only a share w of them were left. Tried against the "what is
    visible now?" misses under compression; it did not fix them (they come from the chat: README, recall).

    compressed=|M| in frames: the stream is answered from a memory of that many frames that InfiniPot-V passes
    keep within it, as the runtime does (the passes run at training time: stream_through_memory).
    """
    stream = (scenes.make_stream(seed, n_frames, n_events=SPARSE_EVENTS, duration=SPARSE_DURATION) if sparse
              else scenes.make_stream(seed, n_frames))
    rng = random.Random(seed)
    by_kind: dict[str, list[scenes.Question]] = defaultdict(list)
    for q in stream.questions():
        if q.text in tokens["first"] and q.answer in tokens["answer"]:
            by_kind[q.kind].append(q)
    chosen = []
    kinds = list(by_kind)
    for _ in range(min(n_turns, sum(len(v) for v in by_kind.values()))):
        kind = rng.choice(kinds)  # kinds balanced: "now" and "count" would otherwise swamp the rest
        chosen.append(by_kind[kind].pop(rng.randrange(len(by_kind[kind]))))
        if not by_kind[kind]:
            kinds.remove(kind)
    ids = list(tokens["prefix"]) + [-1] * (n_frames * tokens_per_frame)
    labels = [-100] * len(ids)
    positions = list(range(len(tokens["prefix"])))
    gap = rng.randrange(position_gap + 1) if position_gap else 0
    for _ in range(n_frames):
        start = positions[-1] + 1 + (rng.randrange(gap + 1) if gap else 0)
        positions += range(start, start + tokens_per_frame)
    for j, q in enumerate(chosen):
        head = (tokens["later"] if j else tokens["first"])[q.text]
        ans = tokens["answer"][q.answer]
        ids += head + ans
        labels += [-100] * len(head) + ans
    positions += range(positions[-1] + 1, positions[-1] + 1 + len(ids) - len(positions))
    key_weight = [1.0] * len(ids)
    empty = [t for t in range(n_frames) if stream.event_at(t) is None]
    first = len(tokens["prefix"])
    if pruned:  # every background token of the older frames, the objects' frames' too: InfiniPot-V keeps patches
        weight = math.exp(rng.uniform(math.log(PRUNED_WEIGHT), 0.0))
        grid = math.isqrt(tokens_per_frame)
        for t in range(n_frames - RECENT_WHOLE):
            shown = set(object_patches(stream, t, grid, grid).tolist())
            for q in range(tokens_per_frame):
                if q not in shown:
                    key_weight[first + t * tokens_per_frame + q] = weight
    elif stream_frames > n_frames and empty:
        weight = (rng.randint(n_frames, stream_frames) - (n_frames - len(empty))) / len(empty)
        for t in empty:
            key_weight[first + t * tokens_per_frame:first + (t + 1) * tokens_per_frame] = [weight] * tokens_per_frame
    if compressed and not 3 <= compressed < n_frames:  # the runtime's smallest budget is 3 frames
        raise ValueError(f"a memory of {compressed} frames for a stream of {n_frames}")
    return {"ids": ids, "labels": labels, "positions": positions, "key_weight": key_weight,
            "compress": compressed,
            "frames": stream.frames(0, n_frames)[..., ::-1].copy(),  # BGR -> RGB
            "frame_labels": [frame_labels(stream, t) for t in range(n_frames)],
            "kinds": [q.kind for q in chosen]}


# -- training (there) -------------------------------------------------------------------------------------

def infinipot_v_pass(keys: torch.Tensor, values: torch.Tensor, held: torch.Tensor, first: int,
                     tokens_per_frame: int, recent: int, keep: int) -> torch.Tensor:
    """One InfiniPot-V pass, as the runtime's (edge_runtime.policies.InfiniPotV, tests/reference_infinipot_v.py).

    keys (before RoPE) and values [B, L, H, T, D] of every token so far; held [B, L, H, N]: the tokens each
    (layer, KV head) holds, ascending: the prompt's `first`, then its video tokens, the newest `recent` frames
    whole at the end. Those stay; floor(alpha keep) video tokens, the recent ones included, go to the highest
    TaR (least like the same patch in the recent frames), the rest of `keep` to the highest value norm.
    Returns the new held [B, L, H, first + keep], ascending.
    """
    import torch
    from torch.nn import functional as F

    P, r = tokens_per_frame, recent
    video = held[..., first:]  # [B, L, H, Nv]
    n = video.shape[-1]
    D = keys.shape[-1]
    k = F.normalize(keys.gather(3, video[..., None].expand(*video.shape, D)).float(), dim=-1)
    v = values.gather(3, video[..., None].expand(*video.shape, D)).float()
    newest = k[..., n - r * P:, :].unflatten(3, (r, P))  # [B, L, H, r, P, D]: the recent frames, by patch
    patch = ((video - first) % P)[..., None, :, None].expand(*video.shape[:3], r, n, D)
    cos = (k[:, :, :, None] * newest.gather(4, patch)).sum(-1).mean(3)  # [B, L, H, Nv]: mean over r
    score = v.norm(dim=-1)
    score[..., n - r * P:] = float("inf")
    n_tar = math.floor(COMPRESSED_ALPHA * keep) - r * P
    if n_tar < 0:  # the runtime refuses this budget (InfiniPotV.check)
        raise ValueError(f"alpha |C| = {COMPRESSED_ALPHA} x {keep} cannot hold {r} recent frames")
    if n_tar:
        score.scatter_(3, (-cos[..., :n - r * P]).topk(n_tar, dim=3).indices, float("inf"))
    chosen = score.topk(keep, dim=3).indices.sort(dim=3).values
    return torch.cat([held[..., :first], video.gather(3, chosen)], -1)


def stream_through_memory(text, x: torch.Tensor, first: int, tokens_per_frame: int, n_frames: int,
                          budget_frames: int) -> tuple[torch.Tensor, int]:
    """The runtime's capped session in one differentiable forward: x [B, T] = prompt (first tokens), n_frames
    frames, then the chat; the memory holds at most budget_frames frames.

    As in Session.insert_frame, a frame that would pass |M| first triggers a pass (infinipot_v_pass) that
    shrinks every (layer, KV head) to |C|; the kept tokens take the positions right after the prompt, in order
    (the runtime's default, positions "reindex"), and what comes next continues from there. Returns the hidden
    states of the last step (the frames since the last pass, and the chat) and where that step starts in x.
    """
    import torch

    P = tokens_per_frame
    keep_frames, r = memory_geometry(budget_frames)
    step = budget_frames - keep_frames
    if r > step:
        raise ValueError(f"|M| = {budget_frames} frames: {r} recent frames but a pass every {step}")
    starts = [first + f * P for f in range(budget_frames, n_frames, step)]  # a pass before each of these
    edges = [0, *starts, x.shape[1]]
    B = x.shape[0]
    keys: list[torch.Tensor] = []  # per layer, every token so far: [B, H, T, D] (before RoPE), values alike
    values: list[torch.Tensor] = []
    held = None
    next_pos = 0
    for s, e in zip(edges[:-1], edges[1:], strict=True):
        memory = None
        if held is not None:
            with torch.no_grad():
                held = infinipot_v_pass(torch.stack(keys, 1), torch.stack(values, 1), held, first, P, r,
                                        keep_frames * P)
            positions = torch.arange(held.shape[-1], device=x.device)  # re-indexed: right after the prompt
            memory = []
            for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
                idx = held[:, layer, :, :, None].expand(-1, -1, -1, k.shape[-1])
                memory.append((text.rotate(k.gather(2, idx), positions), v.gather(2, idx)))
            next_pos = held.shape[-1]
        record: list = []
        h = text(x[:, s:e], torch.arange(next_pos, next_pos + e - s, device=x.device)[None], record=record,
                 memory=memory)
        if keys:
            keys = [torch.cat([a, k], 2) for a, (k, _) in zip(keys, record, strict=True)]
            values = [torch.cat([a, v], 2) for a, (_, v) in zip(values, record, strict=True)]
        else:
            keys, values = [k for k, _ in record], [v for _, v in record]
        new = torch.arange(s, e, device=x.device).expand(B, len(record), record[0][0].shape[1], e - s)
        held = new if held is None else torch.cat([held, new], -1)
        next_pos += e - s
    return h, edges[-2]


def start_from(folder: Path, vision, text) -> None:
    """Load an exported model (mmproj.gguf, and lora.gguf if the text model has a LoRA) into the modules."""
    import gguf
    import torch

    from scripts.vlm_vision import load_mmproj

    vision.load_state_dict(load_mmproj(folder / "mmproj.gguf").state_dict())
    adapters = [m for m in text.modules() if getattr(m, "lora_a", None) is not None]
    if adapters:
        stored = {t.name: np.array(t.data) for t in gguf.GGUFReader(folder / "lora.gguf").tensors}
        for m in adapters:
            for part in ("lora_a", "lora_b"):
                value = torch.from_numpy(stored[f"{m.name}.{part}"].astype(np.float32))
                getattr(m, part).data.copy_(value.reshape(getattr(m, part).shape))
    log.info("started from %s (%d LoRA pairs)", folder, len(adapters))


def train(cache: Path, out: Path, cfg: TrainConfig, resume: Path | None) -> None:
    import torch
    from torch.nn import functional as F

    from scripts.vlm_text import LoraConfig, build_text_model, load_weights
    from scripts.vlm_vision import VisionConfig, VisionEncoder

    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    tokens = json.loads((cache / TOKENS_FILE).read_text())
    vcfg = VisionConfig()
    tpf = (vcfg.image_size // vcfg.patch_size) ** 2
    hparams, weights = load_weights(cache, device)
    lora = LoraConfig(rank=cfg.lora_rank, alpha=float(cfg.lora_rank)) if cfg.lora_rank else None
    text = build_text_model(hparams, weights, lora, dtype)
    del weights
    vision = VisionEncoder(vcfg).to(device)
    # The aux heads read what the language model will read: the frame's embeddings, mean- and max-pooled.
    width = 2 * vcfg.out_width
    aux = torch.nn.ModuleDict({k: torch.nn.Linear(width, len(v)) for k, v in OBJECT_LABELS.items()}).to(device)
    groups = [{"params": list(vision.parameters()) + list(aux.parameters()), "lr": cfg.lr_vision}]
    if lora:
        groups.append({"params": text.lora_parameters(), "lr": cfg.lr_lora})
    opt = torch.optim.AdamW(groups, weight_decay=0.01, betas=(0.9, 0.98))
    if cfg.init and not (resume and resume.exists()):
        start_from(Path(cfg.init), vision, text)
    step0 = 0
    if resume and resume.exists():
        ck = torch.load(resume, map_location=device)
        vision.load_state_dict(ck["vision"])
        aux.load_state_dict(ck["aux"])
        if lora:
            for p, v in zip(text.lora_parameters(), ck["lora"], strict=True):
                p.data.copy_(v)
        opt.load_state_dict(ck["opt"])
        step0 = ck["step"]
        log.info("resumed from %s at step %d", resume, step0)

    def batches(worker_seed: int):
        rng = np.random.default_rng(worker_seed)
        k = 0
        while True:
            if rng.random() < cfg.compressed_fraction:  # streams answered from a memory the passes keep in |M|
                n = int(rng.integers(cfg.compressed_frames // 2, cfg.compressed_frames + 1))
                budget = int(rng.integers(COMPRESSED_MIN_FRAMES, cfg.compressed_max_frames + 1))
                items = [make_example(TRAIN_SEED_BASE + worker_seed * 10_000_000 + k + i, n, cfg.long_turns, tokens,
                                      tpf, compressed=budget) for i in range(cfg.compressed_batch)]
            else:
                items = []
                for i in range(cfg.batch):
                    single = rng.random() < cfg.single_frame_fraction
                    n = 1 if single else int(rng.integers(1, cfg.max_frames + 1))
                    items.append(make_example(TRAIN_SEED_BASE + worker_seed * 10_000_000 + k + i, n, cfg.turns,
                                              tokens, tpf, cfg.position_gap,
                                              sparse=rng.random() < cfg.sparse_fraction,
                                              stream_frames=cfg.stream_frames,
                                              pruned=rng.random() < cfg.pruned_fraction))
            k += len(items)
            yield collate(items)

    class Examples(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            wid = info.id if info else 0
            return batches(cfg.seed * 1000 + step0 + wid)

    def collate(items: list[dict]) -> dict:
        T = max(len(x["ids"]) for x in items)
        ids = torch.full((len(items), T), 0, dtype=torch.long)
        img = torch.zeros((len(items), T), dtype=torch.bool)
        labels = torch.full((len(items), T), -100, dtype=torch.long)
        positions = torch.zeros((len(items), T), dtype=torch.long)
        key_weight = torch.ones((len(items), T))
        for i, x in enumerate(items):
            t = torch.tensor(x["ids"])
            ids[i, :len(t)] = t.clamp(min=0)
            img[i, :len(t)] = t < 0
            labels[i, :len(t)] = torch.tensor(x["labels"])
            positions[i, :len(t)] = torch.tensor(x["positions"])
            key_weight[i, :len(t)] = torch.tensor(x["key_weight"])
            positions[i, len(t):] = positions[i, len(t) - 1] + 1 + torch.arange(T - len(t))  # padding, no loss
        compress = {(x["compress"], len(x["frames"])) for x in items}
        if items[0]["compress"] and len(compress) > 1:
            raise ValueError("a compressed batch is streams of one length under one budget")
        return {"ids": ids, "img": img, "labels": labels, "positions": positions,
                "key_weight": key_weight if bool((key_weight != 1).any()) else None,
                "compress": next(iter(compress)) if items[0]["compress"] else None,
                "frames": torch.from_numpy(np.concatenate([x["frames"] for x in items])),
                "frame_labels": torch.tensor([fl for x in items for fl in x["frame_labels"]]),
                "kinds": [x["kinds"] for x in items]}

    loader = torch.utils.data.DataLoader(Examples(), batch_size=None, num_workers=cfg.workers, prefetch_factor=4,
                                         persistent_workers=True)  # the workers make whole batches
    heldout = {name: collate([make_example(10 * TRAIN_SEED_BASE + i * 97 + j, n, cfg.turns, tokens, tpf)
                              for j in range(cfg.eval_size)])
               for i, (name, n) in enumerate((("1 frame", 1), (f"{cfg.max_frames} frames", cfg.max_frames)))}
    if cfg.stream_frames:  # the training-time stand-in for long streams, beside the real ones below
        heldout[f"{cfg.max_frames} frames as {cfg.stream_frames}"] = collate(
            [make_example(10 * TRAIN_SEED_BASE + 30_000 + j, cfg.max_frames, cfg.turns, tokens, tpf, sparse=True,
                          stream_frames=cfg.stream_frames) for j in range(cfg.eval_size)])
    if cfg.pruned_fraction:
        heldout[f"{cfg.max_frames} frames, background pruned"] = collate(
            [make_example(10 * TRAIN_SEED_BASE + 40_000 + j, cfg.max_frames, cfg.turns, tokens, tpf, sparse=True,
                          pruned=True) for j in range(cfg.eval_size)])
    if cfg.long_eval_size:  # in batches of 4 (~4,400 tokens each): the whole memory, and |M| = 1/8 as in the runtime
        for name, budget in (("", 0), (", 1/8", round(cfg.long_eval_frames / 8))):
            for j in range(0, cfg.long_eval_size, 4):
                heldout[f"{cfg.long_eval_frames} frames{name}#{j}"] = collate([make_example(
                    10 * TRAIN_SEED_BASE + 50_000 + j + i, cfg.long_eval_frames, cfg.long_turns, tokens, tpf,
                    compressed=budget) for i in range(4)])

    def forward(b: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        frames = b["frames"].to(device, non_blocking=True)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            emb = vision(frames)  # [n_frames, tpf, n_embd]
            pooled = torch.cat([emb.mean(1), emb.amax(1)], -1)
            x = text.embed(b["ids"].to(device))
            x = x.masked_scatter(b["img"].to(device)[..., None], emb.to(x.dtype))
            positions = b["positions"].to(device)
            key_weight = None if b["key_weight"] is None else b["key_weight"].to(device, non_blocking=True)
            labels = b["labels"].to(device)
            if b["compress"] is None:
                h = text(x, positions, key_weight)
            else:  # the frames through a capped memory, as the runtime streams them
                budget, n_frames = b["compress"]
                h, split = stream_through_memory(text, x, len(tokens["prefix"]), tpf, n_frames, budget)
                labels = labels[:, split:]
            sel = labels[:, 1:] != -100
            logits = text.logits(h[:, :-1][sel]).float()
            target = labels[:, 1:][sel]
            loss = F.cross_entropy(logits, target)
            fl = b["frame_labels"].to(device)
            aux_loss = sum(F.cross_entropy(aux[k](pooled.float()), fl[:, i]) * (cfg.digit_weight if k == "digit" else 1)
                           for i, k in enumerate(OBJECT_LABELS))
        return loss, aux_loss, logits.argmax(-1) == target, sel

    def evaluate() -> dict[str, float]:
        vision.eval()
        res: dict[str, list[bool]] = defaultdict(list)
        with torch.no_grad():
            for key, b in heldout.items():
                name = key.split("#")[0]
                _, _, right, sel = forward(b)
                # one answer = the tokens of one turn's label run; all must be right
                right = right.cpu().tolist()
                sel_cpu = sel.cpu()
                k = 0
                for row, kinds in enumerate(b["kinds"]):
                    pos = sel_cpu[row].nonzero().flatten().tolist()
                    runs: list[list[int]] = []
                    for p in pos:
                        if runs and p == runs[-1][-1] + 1:
                            runs[-1].append(p)
                        else:
                            runs.append([p])
                    for kind, run in zip(kinds, runs, strict=True):
                        ok = all(right[k + i] for i in range(len(run)))
                        k += len(run)
                        res[f"{name}/{kind}"].append(ok)
                        res[name].append(ok)
        vision.train()
        return {k: round(sum(v) / len(v), 3) for k, v in sorted(res.items())}

    log.info("training: %s; %d tokens a frame; LoRA %s", asdict(cfg), tpf, "off" if not lora else f"rank {lora.rank}")
    t0 = time.time()
    deadline = t0 + cfg.minutes * 60
    step = step0
    history = []
    total_steps_guess = cfg.total_steps or (step0 + cfg.steps if cfg.steps else None)
    if cfg.init and step0 == 0:  # where the starting model stands, on the same held-out clips
        history.append({"step": 0, "s": 0, **evaluate()})
        log.info("eval %s", json.dumps(history[-1]))
    for b in loader:
        lr_scale = min(1.0, (step + 1) / cfg.warmup_steps)
        if total_steps_guess:  # cosine over the time budget, once the step rate is known
            lr_scale *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps_guess)))
        for g, base in zip(opt.param_groups, (cfg.lr_vision, cfg.lr_lora), strict=False):
            g["lr"] = base * lr_scale
        loss, aux_loss, _, _ = forward(b)
        opt.zero_grad(set_to_none=True)
        (loss + cfg.aux_weight * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        step += 1
        # The cosine needs the number of steps the time budget holds. The first steps are slow (workers
        # start, kernels compile; a guess from them came out 40 % short), so time steps 50 to 150.
        if step - step0 == 50:
            t50 = time.time()
        if step - step0 == 150 and not (cfg.steps or cfg.total_steps):
            rate = 100 / (time.time() - t50)
            total_steps_guess = step + int(rate * (deadline - time.time()))
            log.info("%.2f steps/s: about %d steps in the budget", rate, total_steps_guess - step0)
        if step % 25 == 0:
            log.info("step %d loss %.3f aux %.3f (%.0f s)", step, loss.item(), aux_loss.item(), time.time() - t0)
        done = time.time() > deadline or step - step0 == cfg.steps or step == cfg.total_steps
        if step % cfg.eval_every == 0 or done:
            acc = evaluate()
            history.append({"step": step, "s": round(time.time() - t0), "loss": round(loss.item(), 4), **acc})
            log.info("eval %s", json.dumps(history[-1]))
        if done:
            break
    out.mkdir(parents=True, exist_ok=True)
    # Weights come back as state dicts (each file under the 16 MiB a device call returns); `export`
    # writes the GGUFs here, where gguf and llama.cpp are.
    torch.save(vision.float().cpu().state_dict(), out / "vision.pt")
    if lora:
        torch.save({n: p.detach().float().cpu() for n, p in text.named_parameters() if "lora_" in n}, out / "lora.pt")
    torch.save({"vision": vision.state_dict(), "aux": aux.state_dict(), "step": step,
                "lora": [p.detach() for p in text.lora_parameters()], "opt": opt.state_dict()},
               "/tmp/edge_vlm_ckpt.pt")  # stays on the warm machine for a resumed call
    (out / "train_log.json").write_text(json.dumps({"config": asdict(cfg), "vision": asdict(vcfg),
                                                    "steps": step, "history": history}, indent=1))
    log.info("wrote %s", sorted(p.name for p in out.iterdir()))


def export(trained: Path, cache: Path, out: Path) -> list[Path]:
    """vision.pt (+ lora.pt) from a training run -> mmproj.gguf (+ lora.gguf) that llama.cpp loads."""
    import torch

    from scripts.vlm_text import LoraConfig, build_text_model, export_lora, load_weights
    from scripts.vlm_vision import VisionConfig, VisionEncoder, export_mmproj

    run = json.loads((trained / "train_log.json").read_text())
    vcfg = VisionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in run["vision"].items()})
    vision = VisionEncoder(vcfg)
    vision.load_state_dict(torch.load(trained / "vision.pt", map_location="cpu"))
    out.mkdir(parents=True, exist_ok=True)
    written = [export_mmproj(vision, vcfg, out / "mmproj.gguf")]
    if (trained / "lora.pt").exists():
        rank = run["config"]["lora_rank"]
        lora = LoraConfig(rank=rank, alpha=float(rank))
        hparams, weights = load_weights(cache, "cpu")
        text = build_text_model(hparams, weights, lora, torch.float32)
        missing = text.load_state_dict(torch.load(trained / "lora.pt", map_location="cpu"), strict=False)
        if missing.unexpected_keys or any("lora_" in k for k in missing.missing_keys):
            raise SystemExit(f"lora.pt does not fit the text model: {missing}")
        written.append(export_lora(text, lora, out / "lora.gguf"))
    return written


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="token ids of the prompt pieces (needs llama.cpp)")
    pr.add_argument("--cache", type=Path, default=ROOT / "train_cache")
    tr = sub.add_parser("train", help="train and export (needs torch; a GPU for the real run)")
    tr.add_argument("--cache", type=Path, default=ROOT / "train_cache")
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--resume", type=Path, default=None, help="checkpoint of an earlier call on this machine")
    for f, v in asdict(TrainConfig()).items():
        tr.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    ex = sub.add_parser("export", help="GGUFs from a training run's state dicts (needs gguf)")
    ex.add_argument("trained", type=Path, help="the folder train wrote (vision.pt, lora.pt, train_log.json)")
    ex.add_argument("--cache", type=Path, default=ROOT / "train_cache")
    ex.add_argument("--out", type=Path, default=ROOT / "models" / "edge-vlm")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.cache)
        return
    if args.cmd == "export":
        for path in export(args.trained, args.cache, args.out):
            log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
        return
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    train(args.cache, args.out, cfg, args.resume)


if __name__ == "__main__":
    main()
