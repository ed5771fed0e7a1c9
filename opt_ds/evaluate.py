"""Evaluate an exported model without DeepSpeed: retrieval R@1/5/10 for every modality pair, and samples.

    python -m opt_ds.evaluate --weights model.safetensors --shards data/eval [--hard-negatives K] [--json] [--out DIR]

With --hard-negatives K and shards whose KEY.json lists `hard_negatives` (caption rewrites), it also reports
how often an image (an audio clip) scores its own caption above all of its first K hard negatives.

Writes captions.txt (generated vs reference) and images.png (top: originals, bottom: generated from
text + audio) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torchvision.utils import save_image

from opt_ds.data.shards import ShardSpecError
from opt_ds.data.tokenizer import load_tokenizer
from opt_ds.evaluation import RECALL_AT, eval_batches, generations, retrieval
from opt_ds.export import load_bundle
from opt_ds.tasks.contrastive import PAIRS


def evaluate(weights: str, shards: str, samples: int, out_dir: Path | None, generate: int, beams: int,
             hard_negatives: int = 0) -> dict:
    bundle, cfg = load_bundle(weights)
    if cfg.stage != "pretrain":
        raise ValueError(f"{weights} is a '{cfg.stage}' export; evaluation needs a pre-training export")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle.to(device)
    decode = replace(cfg.data.decode, paraphrases_per_sample=0, hard_negatives_per_sample=hard_negatives)
    batches = eval_batches(shards, decode, 32, samples)
    scores = retrieval(bundle.model, batches, device, torch.float32)
    report = {"weights": str(weights), "samples": sum(len(b["keys"]) for b in batches), "retrieval": scores}
    if out_dir is not None and generate > 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        lines, images = generations(bundle.model, batches[0], device, torch.float32, load_tokenizer(cfg.data.decode.tokenizer),
                                    bundle.image_tokenizer, generate, beams=beams)
        (out_dir / "captions.txt").write_text("\n".join(lines) + "\n")
        save_image(images, out_dir / "images.png", nrow=len(images) // 2)
        report["captions"] = lines
        report["outputs"] = str(out_dir)
    return report


def print_table(report: dict) -> None:
    scores = report["retrieval"]
    print(f"retrieval on {report['samples']} held-out samples ({report['weights']})")
    print("a duplicate caption counts as correct, a tie with a wrong candidate as a miss; chance under the same rule")
    print(f"{'query -> target':<18}" + "".join(f"{'R@' + str(k):>8}" for k in RECALL_AT)
          + f"{'chance R@1':>12}" + "".join(f"{'R@' + str(k):>8}" for k in RECALL_AT[1:]))
    for a, b in PAIRS:
        chance = "".join(f"{scores.get(f'eval/{a}_{b}/chance_R@{k}', float('nan')):>{w}.3f}"
                         for k, w in zip(RECALL_AT, (12, 8, 8)))
        for query in (f"{a}->{b}", f"{b}->{a}"):
            if f"eval/{query}/R@1" in scores:
                cells = "".join(f"{scores[f'eval/{query}/R@{k}']:>8.3f}" for k in RECALL_AT)
                print(f"{query:<18}{cells}{chance}")
    for key, value in scores.items():
        if key.endswith("/hard_negative_acc"):
            print(f"{key.split('/')[1]}: own caption above all hard negatives for {value:.3f} of the samples")
    for line in report.get("captions", [])[:4]:
        print("  " + line)
    if "outputs" in report:
        print(f"captions and images written to {report['outputs']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opt_ds.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="an export of python -m opt_ds.export")
    parser.add_argument("--shards", required=True, help="held-out shards (directory, pattern or list file)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--generate", type=int, default=8, help="samples to caption and to draw")
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--hard-negatives", type=int, default=0,
                        help="also score each caption against up to K hard negatives from KEY.json")
    parser.add_argument("--out", default=None, help="where captions.txt and images.png go (default: beside the weights)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out_dir = Path(args.out) if args.out else Path(args.weights).with_suffix("").parent / (Path(args.weights).stem + "_eval")
    try:
        report = evaluate(args.weights, args.shards, args.samples, out_dir, args.generate, args.beams, args.hard_negatives)
    except (FileNotFoundError, ValueError, ShardSpecError) as exc:
        print(f"opt_ds.evaluate: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
