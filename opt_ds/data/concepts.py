"""MVP's phrase-level concepts, mined from a shard set's captions: `python -m opt_ds.data.concepts SHARDS`.

MVP (arXiv 2201.12596) gives each caption a second level beside its tokens: the scene-graph phrases it holds,
keeping those that occur in at least 50 sentences of the corpus. With no parser to download, a concept here is
a word n-gram (1 to --max-words words) that neither begins nor ends with a function word ("red circle", "dog on
the grass", "three"), kept when at least --min-count captions hold it; an n-gram inside a kept longer one is
kept too (it is a concept of its own: "circle" in "red circle").

The pictures' object `tags` in KEY.json (an object tagger's labels) are counted the same way. Both go to
concepts.json beside the shards (--out to put it elsewhere): the vocabulary `data.decode.concepts` names, which
turns a sample's concepts and tags into the ids of the model's concept embedding (`ConceptVocabulary`). With
--annotate DIR the shards are copied to DIR with `concepts` in each sample's KEY.json set to the vocabulary's
phrases its caption holds, longest first and not overlapping. A caption or KEY.json that cannot be read is
counted, never fatal.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Iterator

from tqdm import tqdm

from opt_ds.data.formats import caption_bytes, key_json, text_list
from opt_ds.data.shards import ShardSpecError, expand_shards
from opt_ds.data.tars import UnreadMember, tar_samples
from opt_ds.data.writer import ShardSink
from opt_ds.model.config import CONCEPT_RESERVED_IDS

FUNCTION_WORDS = frozenset(
    """a an the this that these those there here is are was were be been being has have had do does did of in on
    at to for from by with without into onto over under above below near next beside behind between and or but
    not no nor as it its it's they them their he him his she her we us our you your i me my some any each every
    all both few many much more most other such very can could will would shall should may might must just also
    than then so too only own same while who whom which what when where why how""".split()
)
WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
MAX_MEMBER_BYTES = 64 * 1024 * 1024


def words(caption: str) -> list[str]:
    return WORD.findall(caption.lower())


def phrases(tokens: list[str], max_words: int) -> set[str]:
    """The caption's candidate concepts: n-grams with content words at both ends."""
    found = set()
    for n in range(1, max_words + 1):
        for i in range(len(tokens) - n + 1):
            if tokens[i] not in FUNCTION_WORDS and tokens[i + n - 1] not in FUNCTION_WORDS:
                found.add(" ".join(tokens[i : i + n]))
    return found


def mine(captions: Iterable[str], min_count: int, max_words: int) -> tuple[Counter[str], int]:
    """-> (concept -> the number of captions that hold it, for those held by at least `min_count`; captions read).
    Captions are streamed: memory grows with the distinct phrases, not the corpus."""
    counts: Counter[str] = Counter()
    read = 0
    for caption in captions:
        counts.update(phrases(words(caption), max_words))
        read += 1
    return Counter({phrase: n for phrase, n in counts.items() if n >= min_count}), read


def concepts_in(caption: str, vocabulary: Collection[str], max_words: int) -> list[str]:
    """The vocabulary's phrases in the caption, longest first, none overlapping another (greedy, left to right
    within each length)."""
    tokens = words(caption)
    taken = [False] * len(tokens)
    found = []
    for n in range(max_words, 0, -1):
        for i in range(len(tokens) - n + 1):
            phrase = " ".join(tokens[i : i + n])
            if phrase in vocabulary and not any(taken[i : i + n]):
                taken[i : i + n] = [True] * n
                found.append(phrase)
    return found


@dataclass(frozen=True)
class ConceptVocabulary:
    """concepts.json as embedding ids: after the reserved ids (padding, the masked concept) the caption concepts,
    then the tags that are not also a caption concept ("red" the phrase and "red" the tag share one id, so the
    two levels of the two modalities meet in one embedding)."""

    ids: dict[str, int]
    max_words: int

    @property
    def size(self) -> int:
        """Rows the model's concept embedding needs (model.concept_vocab_size at least this)."""
        return len(self.ids) + CONCEPT_RESERVED_IDS

    @classmethod
    def load(cls, path: str | Path) -> "ConceptVocabulary":
        """Raises ValueError naming the file when it is not a concepts.json of this module."""
        try:
            data = json.loads(Path(path).read_text())
            names = [*data["concepts"], *(t for t in data.get("tags", {}) if t not in data["concepts"])]
            max_words = int(data["max_words"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a concept vocabulary of opt_ds.data.concepts ({exc})") from None
        return cls({name: i + CONCEPT_RESERVED_IDS for i, name in enumerate(names)}, max_words)

    def encode(self, names: list[str], limit: int) -> list[int]:
        """The ids of the first `limit` names the vocabulary holds (the others are dropped: too rare to learn)."""
        return [self.ids[n] for n in (" ".join(words(n)) for n in names) if n in self.ids][:limit]


def read_samples(shards: list[str], problems: Counter[str]) -> Iterator[dict]:
    def counted(exc: Exception) -> bool:
        problems["tar_error"] += 1
        return True

    yield from tar_samples(shards, MAX_MEMBER_BYTES, counted)


def caption_of(sample: dict, problems: Counter[str]) -> str | None:
    try:
        caption = caption_bytes(sample)
    except (UnicodeDecodeError, ValueError):
        problems["bad_caption"] += 1
        return None
    if caption is None or not caption.strip():
        problems["no_caption"] += 1
        return None
    return caption


def tags_of(sample: dict, problems: Counter[str]) -> set[str]:
    """The picture's object tags in KEY.json, normalised as caption words are; a bad field is counted."""
    try:
        return {" ".join(words(t)) for t in text_list(sample, "tags") or []} - {""}
    except ValueError:
        problems["bad_tags"] += 1
        return set()


def by_count(counts: Counter[str]) -> dict[str, int]:
    """Most frequent first, ties in alphabetical order: the same file (and ids) for the same shards."""
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def annotate(shards: list[str], vocabulary: set[str], max_words: int, out: Path, problems: Counter[str]) -> str:
    """Copy the shards to `out`, each sample's KEY.json with its `concepts`; -> the writer's summary. An unreadable
    KEY.json is counted into `problems` (unreadable shards and captions were counted when mining)."""
    sink = ShardSink(out)
    counted_already: Counter[str] = Counter()
    for sample in tqdm(read_samples(shards, counted_already), desc="annotate", unit="sample", disable=None):
        caption = caption_of(sample, counted_already)
        try:
            meta = key_json(sample)
        except ValueError:
            problems["bad_json"] += 1
            meta = None
        if not isinstance(meta, dict):
            meta = {}
        if caption is not None:
            meta["concepts"] = concepts_in(caption, vocabulary, max_words)
        members = {k: v for k, v in sample.items() if not k.startswith("__") and not isinstance(v, UnreadMember)}
        sink.write({**members, "__key__": sample["__key__"], "json": json.dumps(meta).encode()})
    return sink.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opt_ds.data.concepts", description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", help="brace pattern, directory or list file (several allowed)")
    parser.add_argument("--min-count", type=int, default=50, help="captions a concept must occur in (MVP: 50)")
    parser.add_argument("--max-words", type=int, default=3, help="longest concept, in words")
    parser.add_argument("--out", type=Path, default=None, help="vocabulary file (default: concepts.json beside)")
    parser.add_argument("--annotate", type=Path, default=None, help="copy the shards here with `concepts` added")
    args = parser.parse_args(argv)
    if args.min_count < 1 or args.max_words < 1:
        print("opt_ds.data.concepts: --min-count and --max-words must be >= 1", file=sys.stderr)
        return 2
    try:
        shards = expand_shards(args.shards)
    except ShardSpecError as exc:
        print(f"opt_ds.data.concepts: {exc}", file=sys.stderr)
        return 2
    problems: Counter[str] = Counter()
    tag_counts: Counter[str] = Counter()

    def captions() -> Iterator[str]:
        for sample in tqdm(read_samples(shards, problems), desc="captions", unit="sample", disable=None):
            tag_counts.update(tags_of(sample, problems))
            caption = caption_of(sample, problems)
            if caption is not None:
                yield caption

    vocabulary, read = mine(captions(), args.min_count, args.max_words)
    tags = Counter({tag: n for tag, n in tag_counts.items() if n >= args.min_count})
    out = args.out or Path(shards[0]).parent / "concepts.json"
    header = {"captions": read, "min_count": args.min_count, "max_words": args.max_words}
    out.write_text(json.dumps(header | {"concepts": by_count(vocabulary), "tags": by_count(tags)}, indent=1) + "\n")
    size = ConceptVocabulary.load(out).size
    summary = (
        f"{len(vocabulary)} concepts from {read} captions and {len(tags)} tags to {out} (concept_vocab_size >= {size})"
    )
    if args.annotate is not None:
        summary += "; " + annotate(shards, set(vocabulary), args.max_words, args.annotate, problems)
    print(f"{summary}; unreadable: {', '.join(f'{k}: {v}' for k, v in sorted(problems.items())) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
