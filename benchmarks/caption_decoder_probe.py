"""What does the caption decoder read, and what could it read? On a demo export and synthetic held-out shards:

- teacher-forced, the share of the caption's colour, shape and count words the text decoder predicts right, with
  nothing, the picture, the sound or both in its memory (chance 1/8, 1/4, 1/4);
- linear probes (fitted on training samples, scored on the held-out ones) of the shape, count and colour from the
  picture's and the sound's tokens: what the encoders hold for the decoder to read;
- with --fit-decoder N, the text decoder alone trained N steps to caption the training samples from the picture
  (the rest of the model frozen), then the teacher-forced shares again and its captions from the picture scored
  as `python -m opt_ds.evaluate` scores them: how much of what the memory holds a decoder learns to read when the
  picture is all it is given.

    python benchmarks/caption_decoder_probe.py --weights demo_run/opt_tiny.safetensors \
        [--train demo_data/train --eval demo_data/eval --probe-samples 800 --fit-decoder 200 --fit-lr 9e-4]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
import torch.nn.functional as F

from opt_ds.data.batch import to_device
from opt_ds.data.synthetic import COLOURS, COUNTS, SHAPES, named_attributes
from opt_ds.data.tokenizer import load_tokenizer
from opt_ds.evaluate.generation import Decoding, caption_evaluation
from opt_ds.evaluate.retrieval import eval_batches
from opt_ds.export.bundle import load_bundle
from opt_ds.model.encoders import mean_pool
from opt_ds.model.fusion import MODALITY_ORDER

VOCABULARY = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS}
SOURCES = {"nothing": (), "the picture": ("image",), "the sound": ("audio",), "both": ("image", "audio")}


def keep_only(batch: dict, source: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {m: torch.full_like(batch["has_text"], m in source) for m in MODALITY_ORDER}


@torch.no_grad()
def words_read(
    model, batches: list[dict], tokenizer, sources: dict[str, tuple[str, ...]] = SOURCES
) -> dict[str, dict[str, float]]:
    """Per source, the share of each attribute's words (every inflection the captions use) predicted right."""
    word_ids = {
        attribute: torch.tensor(
            [tokenizer.convert_tokens_to_ids(w) for v in words for w in (v, v + "s", v + "es") if w in tokenizer.vocab]
        )
        for attribute, words in VOCABULARY.items()
    }
    out = {}
    for name, source in sources.items():
        right = {a: [0, 0] for a in VOCABULARY}
        for batch in batches:
            fused = model.fuse(model.unimodal(batch), batch, keep=keep_only(batch, source))
            ids = batch["text_ids"]
            predicted = model.text_decoder(ids[:, :-1], fused.tokens, fused.valid).argmax(-1)
            for attribute, wanted in word_ids.items():
                at = torch.isin(ids[:, 1:], wanted)
                right[attribute][0] += int((predicted[at] == ids[:, 1:][at]).sum())
                right[attribute][1] += int(at.sum())
        out[name] = {a: hits / max(total, 1) for a, (hits, total) in right.items()}
    return out


@torch.no_grad()
def features(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The picture's CLS from its tower and at its place in the decoder's memory (the picture alone); the sound's
    tokens' mean in the memory (the sound alone)."""
    parts: dict[str, list[torch.Tensor]] = {"picture CLS": [], "picture in memory": [], "sound in memory": []}
    for batch in batches:
        uni = model.unimodal(batch)
        parts["picture CLS"].append(uni.image[:, 0])
        picture = model.fuse(uni, batch, keep=keep_only(batch, ("image",)))
        parts["picture in memory"].append(picture.part("image")[:, 0])
        sound = model.fuse(uni, batch, keep=keep_only(batch, ("audio",)))
        span = sound.spans["audio"]
        parts["sound in memory"].append(mean_pool(sound.tokens[:, span], sound.valid[:, span]))
    return {k: torch.cat(v).float() for k, v in parts.items()}


def probe_accuracy(x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """A standardised, lightly L2-regularised multinomial logistic regression fitted by L-BFGS."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit, x_test = (x_fit - mean) / std, (x_test - mean) / std
    classes = int(y_fit.max()) + 1
    weight = torch.zeros(x_fit.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(x_fit @ weight + bias, y_fit) + 1e-3 * weight.pow(2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return float(((x_test @ weight + bias).argmax(1) == y_test).float().mean())


def fit_decoder(model, fitting: list[dict], held_out: list[dict], tokenizer, steps: int, lr: float) -> None:
    """Train the text decoder alone on captions from the picture's (frozen) memory; print what it reads every 100
    steps. AdamW at `lr` (the demo's decoder peak: 9e-4), batch 32, pad tokens ignored."""
    picture = ("image",)
    picture_only = {"the picture": picture}
    with torch.no_grad():
        memories = [model.fuse(model.unimodal(b), b, keep=keep_only(b, picture)) for b in fitting]
    decoder = model.text_decoder.train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=lr, weight_decay=0.05)
    order = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        i = int(torch.randint(len(fitting), (1,), generator=order))
        ids, memory = fitting[i]["text_ids"], memories[i]
        logits = decoder(ids[:, :-1], memory.tokens, memory.valid)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=tokenizer.pad_token_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            decoder.eval()
            shares = words_read(model, held_out, tokenizer, picture_only)["the picture"]
            decoder.train()
            print(f"  after {step:4d} steps  " + " / ".join(f"{shares[a]:.3f}" for a in VOCABULARY))
    decoder.eval()


def labels(batches: list[dict], attribute: str) -> torch.Tensor:
    names = [n for b in batches for n in b["labels"]]
    return torch.tensor([VOCABULARY[attribute].index(named_attributes(n)[attribute]) for n in names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--train", default="demo_data/train")
    parser.add_argument("--eval", default="demo_data/eval")
    parser.add_argument("--probe-samples", type=int, default=800)
    parser.add_argument("--fit-decoder", type=int, default=0, help="steps of decoder-only training (0: none)")
    parser.add_argument("--fit-lr", type=float, default=9e-4)
    args = parser.parse_args()
    bundle, cfg = load_bundle(args.weights)
    model = bundle.model.eval()
    decode = replace(cfg.data.decode, paraphrases_per_sample=0, hard_negatives_per_sample=0)

    def batches(shards: str, limit: int) -> list[dict]:
        return [to_device(b, torch.device("cpu"), torch.float32) for b in eval_batches(shards, decode, 32, limit)]

    held_out, fitting = batches(args.eval, 200), batches(args.train, args.probe_samples)
    tokenizer = load_tokenizer(decode.tokenizer)
    print("teacher-forced words predicted right (colour / shape / count):")
    for source, shares in words_read(model, held_out, tokenizer).items():
        print(f"  from {source:12s} " + " / ".join(f"{shares[a]:.3f}" for a in VOCABULARY))
    x_fit, x_test = features(model, fitting), features(model, held_out)
    print("linear probes on the held-out samples (shape / count / colour):")
    for name in x_fit:
        scores = [
            probe_accuracy(x_fit[name], labels(fitting, a), x_test[name], labels(held_out, a))
            for a in ("shape", "count", "colour")
        ]
        print(f"  {name:18s} " + " / ".join(f"{s:.3f}" for s in scores))
    if args.fit_decoder:
        print("teacher-forced from the picture, the text decoder alone trained on it (colour / shape / count):")
        fit_decoder(model, fitting, held_out, tokenizer, args.fit_decoder, args.fit_lr)
        scores, _ = caption_evaluation(
            lambda run: run(model),
            held_out,
            torch.device("cpu"),
            torch.float32,
            tokenizer,
            64,
            Decoding(),
            decode.max_text_tokens,
        )
        print("its captions from the picture, as python -m opt_ds.evaluate scores them (64 samples, beam 3):")
        print("  " + ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in scores.items() if "from_image/" in k))


if __name__ == "__main__":
    main()
