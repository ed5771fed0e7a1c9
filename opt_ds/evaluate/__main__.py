"""Evaluate an exported model without DeepSpeed: what its encoders align and what its decoders generate.

    python -m opt_ds.evaluate --weights model.safetensors --shards data/eval [--generate N] [--hard-negatives K]
                              [--json] [--out DIR]

Reports retrieval R@1/5/10 for every modality pair (a duplicate caption counts as correct, a tie with a wrong
candidate as a miss; chance under the same rule), zero-shot classification, 5-way matching per class and
matching against each batch's hardest negatives (matched and hard pairs, and their mean); for the first N
samples (--generate), captions from the image alone, the audio alone and both (BLEU-4, CIDEr, WER) and images
from text + audio (retrieval of their captions by the model's own encoders; on synthetic data, the colour and
shape named and the colour drawn). With --hard-negatives K and shards whose KEY.json lists
`hard_negatives`, also how often an image (an audio clip) scores its own caption above its first K.

Writes captions.txt, images.png (top: real, bottom: generated from text + audio) and grid.png (pictures beside
their captions) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opt_ds.data.shards import ShardSpecError
from opt_ds.evaluate.generation import Decoding
from opt_ds.evaluate.retrieval import RECALL_AT
from opt_ds.evaluate.suite import evaluate
from opt_ds.tasks.contrastive import PAIRS


def print_table(report: dict) -> None:
    scores = report["scores"]
    print(f"retrieval on {report['samples']} held-out samples ({report['weights']})")
    print("a duplicate caption counts as correct, a tie with a wrong candidate as a miss; chance under the same rule")
    print(
        f"{'query -> target':<18}"
        + "".join(f"{'R@' + str(k):>8}" for k in RECALL_AT)
        + f"{'chance R@1':>12}"
        + "".join(f"{'R@' + str(k):>8}" for k in RECALL_AT[1:])
    )
    for a, b in PAIRS:
        chance = "".join(
            f"{scores.get(f'eval/{a}_{b}/chance_R@{k}', float('nan')):>{w}.3f}" for k, w in zip(RECALL_AT, (12, 8, 8))
        )
        for query in (f"{a}->{b}", f"{b}->{a}"):
            if f"eval/{query}/R@1" in scores:
                cells = "".join(f"{scores[f'eval/{query}/R@{k}']:>8.3f}" for k in RECALL_AT)
                print(f"{query:<18}{cells}{chance}")
    for key, value in scores.items():
        if key.endswith("/hard_negative_acc"):
            print(f"{key.split('/')[1]}: own caption above all hard negatives for {value:.3f} of the samples")
    groups = (
        "zero_shot",
        "matching",
        "pair_matching",
        "captions_from_image",
        "captions_from_audio",
        "captions_from_image+audio",
        "images_from_text",
    )
    for group in groups:
        cells = [f"{k.split('/')[-1]} {v:.3f}" for k, v in scores.items() if k.split("/")[1] == group]
        if cells:
            print(f"{group}: " + ", ".join(cells))
    for line in report.get("captions", [])[:4]:
        print("  " + line)
    if "outputs" in report:
        print(f"captions and images written to {report['outputs']}; look at {report['grid']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opt_ds.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Decoding()
    parser.add_argument("--weights", required=True, help="an export of python -m opt_ds.export")
    parser.add_argument("--shards", required=True, help="held-out shards (directory, pattern or list file)")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--generate", type=int, default=64, help="samples to caption and to draw, and score")
    parser.add_argument("--grid", type=int, default=8, help="samples shown in grid.png")
    parser.add_argument("--beams", type=int, default=defaults.beams)
    parser.add_argument("--no-repeat-ngram", type=int, default=defaults.no_repeat_ngram)
    parser.add_argument("--image-temperature", type=float, default=defaults.image_temperature, help="0: greedy")
    parser.add_argument("--image-top-k", type=int, default=defaults.image_top_k)
    parser.add_argument("--image-top-p", type=float, default=defaults.image_top_p)
    parser.add_argument(
        "--image-guidance",
        type=float,
        default=defaults.image_guidance,
        help="classifier-free guidance scale for image codes (1: none)",
    )
    parser.add_argument(
        "--hard-negatives",
        type=int,
        default=0,
        help="also score each caption against up to K hard negatives from KEY.json",
    )
    parser.add_argument("--out", default=None, help="where the captions and pictures go (default: beside the weights)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out_dir = (
        Path(args.out) if args.out else Path(args.weights).with_suffix("").parent / (Path(args.weights).stem + "_eval")
    )
    decoding = Decoding(
        beams=args.beams,
        no_repeat_ngram=args.no_repeat_ngram,
        image_temperature=args.image_temperature,
        image_top_k=args.image_top_k,
        image_top_p=args.image_top_p,
        image_guidance=args.image_guidance,
    )
    try:
        report = evaluate(
            args.weights, args.shards, args.samples, out_dir, args.generate, decoding, args.hard_negatives, args.grid
        )
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
