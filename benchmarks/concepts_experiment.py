"""What MVP's concepts and hard negatives add to alignment: the same contrastive run with and without them.

Real `opt_ds.train` runs (2 ranks, ZeRO-3 bf16) with `python -m opt_ds.bench learning`'s shards, sizes and
optimiser (synthetic image+text, `tiny`, 600 steps of global batch 32), each scored by `opt_ds.evaluate` on the
same held-out samples: retrieval R@1 both ways and matching against each held-out batch's hardest negatives.
The concept vocabulary is mined from the training captions (and tags) with --min-count; the synthetic
pictures' tags are the builder's (a perfect tagger), so a variant without them shows what the caption's
concepts alone add.

    python benchmarks/concepts_experiment.py [--variants a,b] [--seeds 0] [--steps 600] [--min-count 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from opt_ds.bench.learning import OPTIM, run_opt_ds, synthetic_image_text
from opt_ds.config.experiment import REPO_ROOT
from opt_ds.data.concepts import ConceptVocabulary


def schedule(*tasks: str) -> dict:
    return {"mode": "sum", "stages": [{"name": "all", "tasks": dict.fromkeys(tasks, 1.0)}]}


MVP_TASKS = ("contrastive", "hard_matching", "mcr", "grounding")
VARIANTS = {  # name -> (what it adds, schedule, concept inputs, tags)
    "contrastive": ("contrastive task alone", schedule("contrastive"), False, False),
    "hard_matching": ("+ hard_matching", schedule("contrastive", "hard_matching"), False, False),
    "concept_inputs": ("+ concept and tag inputs", schedule("contrastive"), True, True),
    "mvp": ("+ concept and tag inputs, hard_matching, mcr, grounding", schedule(*MVP_TASKS), True, True),
    "mvp_no_tags": ("+ concept inputs (no tags), hard_matching, mcr, grounding", schedule(*MVP_TASKS), True, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--min-count", type=int, default=20, help="of the concept miner (2000 training captions)")
    parser.add_argument("--work", type=Path, default=REPO_ROOT / ".cache" / "bench_concepts")
    args = parser.parse_args()
    work = args.work.resolve()
    train, eval_shards = synthetic_image_text(work, args.samples)
    vocabulary = work / "concepts.json"
    subprocess.run(
        [sys.executable, "-m", "opt_ds.data.concepts", str(train), "--min-count", str(args.min_count)]
        + ["--out", str(vocabulary)],
        check=True,
    )
    size = ConceptVocabulary.load(vocabulary).size
    rows = []
    for name in args.variants.split(","):
        _, tasks, concepts, tags = VARIANTS[name]
        overrides = []
        if concepts:
            overrides += [f"data.decode.concepts={vocabulary}", f"model_overrides.concept_vocab_size={size}"]
            overrides += [] if tags else ["data.decode.tags_per_sample=0"]
        for seed in map(int, args.seeds.split(",")):
            scores = run_opt_ds(
                work,
                name,
                train,
                eval_shards,
                tasks,
                args.steps,
                args.batch,
                OPTIM,
                args.samples,
                None,
                seed,
                overrides,
            )
            rows.append({"variant": name, "seed": seed} | scores)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.steps} steps, global batch {args.batch}, {args.samples} held-out samples, vocabulary {size} ids")
    print("| variant | seed | text->image R@1 | image->text R@1 | hard-negative matching: mean / matched / hard | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {VARIANTS[r['variant']][0]} | {r['seed']} | {r['text->image/R@1']:.3f} | {r['image->text/R@1']:.3f} | "
            f"{r['pair_matching/acc']:.3f} / {r['pair_matching/matched_acc']:.3f} / {r['pair_matching/hard_acc']:.3f} "
            f"| {r['train_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
