"""``autoglm distill``: a small student CNN trained to match a large teacher on the user's frames.

The article's loss (section 3.3) on the classifier, ``α·CE + (1−α)·T²·KL``:
CE against the teacher's top-1 class (the user's footage has no labels), KL
between the softened class distributions at temperature ``T``; plus
embedding matching, ``1 − cos`` between the student's embedding, projected
to the teacher's width by a linear layer trained with it, and the teacher's.
The teacher is frozen and its outputs are computed once. Frames are the
user's own (a directory of JPEG/PNG files: what the student will see), a
fifth of them held out for the evaluation.

Writes ``<student>.distilled.pt`` (the student's state dict, classifier
included: a route loads it with ``model = "<student>"``, ``weights =
"imagenet"``, ``weights_path = ...``) and ``.json`` beside it (its version,
the teacher's, the evaluation before and after: embedding cosine, top-1
agreement, items/s of both). ``<student>.distill.ckpt`` holds the last
finished epoch, so ``--resume`` goes on from there.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from engine.contracts.versions import config_version, weights_version
from engine.tools.fidelity import frames_from


@dataclass(frozen=True, slots=True)
class Evaluation:
    cosine: float
    top1: float
    student_items_s: float
    teacher_items_s: float


@dataclass(frozen=True, slots=True)
class Distilled:
    path: Path
    version: str
    losses: list[float]
    before: Evaluation
    after: Evaluation


def _items_s(model: Any, x: Any) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        model(x[:4])  # warm-up
        best = float("inf")
        for _ in range(3):  # the best of three: a shared box's hiccups are not the model's
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return len(x) / max(best, 1e-9)


def distill(
    teacher: str,
    student: str,
    frames: Path,
    out: Path,
    *,
    epochs: int = 5,
    alpha: float = 0.5,
    temperature: float = 4.0,
    teacher_weights: Literal["random", "imagenet"] = "random",
    teacher_weights_path: str | None = None,
    input_size: int = 224,
    batch: int = 16,
    lr: float = 1e-3,
    resume: bool = False,
    seed: int = 0,
    progress: Any = print,
) -> Distilled:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from processors.image import _MEAN, _STD, build_backbone
    from processors.params import ImageParams

    out.mkdir(parents=True, exist_ok=True)
    pixels = frames_from(frames, input_size, 1 << 20)
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.from_numpy(_MEAN).view(1, 3, 1, 1)) / torch.from_numpy(_STD).view(1, 3, 1, 1)
    held = max(1, len(x) // 5)
    train_x, test_x = x[held:], x[:held]

    t_params = ImageParams(
        model=teacher, weights=teacher_weights, weights_path=teacher_weights_path, input_size=input_size
    )
    t_body, t_head, _ = build_backbone(t_params)
    s_params = ImageParams(model=student, input_size=input_size, seed=seed)
    s_body, s_head, _ = build_backbone(s_params)
    with torch.inference_mode():
        t_emb = t_body(x)
        t_logits = t_head(t_emb)
    t_emb, t_logits = t_emb.clone(), t_logits.clone()  # out of inference mode, for the loss
    with torch.no_grad():
        s_dim = s_body.eval()(x[:2]).shape[1]
    proj = nn.Linear(s_dim, t_emb.shape[1])
    params = [*s_body.parameters(), *s_head.parameters(), *proj.parameters()]
    opt = torch.optim.Adam(params, lr=lr)

    def evaluate() -> Evaluation:
        s_body.eval()
        s_head.eval()
        with torch.inference_mode():
            emb = s_body(test_x)
            cos = F.cosine_similarity(proj(emb), t_emb[:held], dim=1).mean().item()
            agree = (s_head(emb).argmax(1) == t_logits[:held].argmax(1)).float().mean().item()
        s_speed = _items_s(s_body, test_x)
        t_speed = _items_s(t_body, test_x)
        return Evaluation(float(cos), float(agree), s_speed, t_speed)

    ckpt = out / f"{student}.distill.ckpt"
    start, losses = 0, []
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        s_body.load_state_dict(state["body"])
        s_head.load_state_dict(state["head"])
        proj.load_state_dict(state["proj"])
        opt.load_state_dict(state["opt"])
        start, losses = int(state["epoch"]), list(state["losses"])
        before = Evaluation(**state["before"])
        progress(f"resuming after epoch {start}")
    else:
        before = evaluate()
    gen = torch.Generator().manual_seed(seed)
    ty, tt = t_logits[held:], t_emb[held:]
    for epoch in range(start, epochs):
        s_body.train()
        s_head.train()
        order = torch.randperm(len(train_x), generator=gen)
        total, n = 0.0, 0
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            if len(idx) < 2:  # BatchNorm needs two
                continue
            emb = s_body(train_x[idx])
            logits = s_head(emb)
            ce = F.cross_entropy(logits, ty[idx].argmax(1))
            kl = F.kl_div(
                F.log_softmax(logits / temperature, 1),
                F.softmax(ty[idx] / temperature, 1),
                reduction="batchmean",
            )
            match = 1 - F.cosine_similarity(proj(emb), tt[idx], dim=1).mean()
            loss = alpha * ce + (1 - alpha) * temperature**2 * kl + match
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        losses.append(total / max(n, 1))
        progress(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
        torch.save(
            {"epoch": epoch + 1, "losses": losses, "before": asdict(before), "body": s_body.state_dict(),
             "head": s_head.state_dict(), "proj": proj.state_dict(), "opt": opt.state_dict()},
            ckpt,
        )  # fmt: skip
    after = evaluate()
    model = build_backbone(s_params)[0]  # a fresh torchvision model to carry the trained weights
    head_attr = "fc" if hasattr(model, "fc") else "classifier"
    model.load_state_dict(s_body.state_dict())
    setattr(model, head_attr, s_head)
    path = out / f"{student}.distilled.pt"
    torch.save(model.state_dict(), path)
    version = weights_version([path])
    teacher_version = (
        weights_version([teacher_weights_path])
        if teacher_weights_path
        else config_version({"processor": "cnn", "params": t_params.model_dump(mode="json")})
    )
    meta = {
        "student": student,
        "version": version,
        "teacher": {"model": teacher, "weights": teacher_weights, "version": teacher_version},
        "loss": {"alpha": alpha, "temperature": temperature, "per_epoch": [round(v, 6) for v in losses]},
        "frames": {"train": len(train_x), "held_out": held, "input_size": input_size},
        "before": asdict(before),
        "after": asdict(after),
    }
    Path(f"{path}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Distilled(path, version, losses, before, after)
