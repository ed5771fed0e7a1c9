"""MVP's concepts in the model and its concept-level tasks: inputs, masks, gradients, graph identity, learning."""

from __future__ import annotations

import pytest
import torch

from helpers import modules_run, run_module
from opt_ds.bench.plain import task_trend, train_plain
from opt_ds.data.batch import to_device
from opt_ds.data.concepts import ConceptVocabulary
from opt_ds.data.decode import DecodeConfig
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.model.config import CONCEPT_MASK, CONCEPT_PAD, load_model_config
from opt_ds.model.opt import OPTModel
from opt_ds.tasks import TASKS, ScheduleConfig, StageConfig, TaskContext, TaskScheduler, step_generator
from opt_ds.tasks.pair_matching import hardest_negatives
from opt_ds.tasks.settings import MaskingConfig

REACHES = {  # a parameter of each must get a non-zero gradient from the task; uni-modal tasks never reach the fusion
    "mcr": ["text", "vision", "concept_embed", "concept_head", "tag_head"],
    "grounding": ["text", "vision", "concept_embed", "grounding_head"],
    "hard_matching": ["text", "vision", "audio", "concept_embed", "fusion", "pair_matching_head"],
    "contrastive": ["text", "vision", "audio", "concept_embed", "contrastive_head"],
}
UNIMODAL = {"mcr", "grounding", "contrastive"}


def concept_decode(vocabulary) -> DecodeConfig:
    return DecodeConfig(max_audio_seconds=2.0, concepts=str(vocabulary))


def concept_loader(shards, vocabulary, batch_size: int, **reader):
    reader = ReaderConfig(batch_size=batch_size, **reader)
    return make_loader([SourceConfig("s", str(shards))], concept_decode(vocabulary), reader)


def concept_model(vocabulary) -> OPTModel:
    return OPTModel(load_model_config("tiny", {"concept_vocab_size": ConceptVocabulary.load(vocabulary).size}))


@pytest.fixture(scope="module")
def setup(synthetic_shards, tmp_path_factory):
    """tiny with concept inputs, the synthetic shards' concept vocabulary, and one batch of six."""
    vocabulary = tmp_path_factory.mktemp("concepts") / "concepts.json"
    run_module("opt_ds.data.concepts", str(synthetic_shards), "--min-count", "3", "--out", str(vocabulary))
    torch.manual_seed(0)
    loader = concept_loader(synthetic_shards, vocabulary, 6, num_workers=0, shuffle_buffer=0)
    batch = to_device(next(iter(loader)), torch.device("cpu"), torch.float32, concept_decode(vocabulary))
    assert (batch["concept_ids"] != CONCEPT_PAD).any(1).all() and (batch["tag_ids"] != CONCEPT_PAD).any(1).all()
    return concept_model(vocabulary), batch


def ctx(step: int = 0) -> TaskContext:
    return TaskContext(step_generator(0, step, 0))


def without_concepts(batch: dict, rows: slice = slice(None)) -> dict:
    """The batch with these samples' concept and tag slots empty."""
    out = dict(batch)
    for key in ("concept_ids", "tag_ids"):
        out[key] = batch[key].clone()
        out[key][rows] = CONCEPT_PAD
    return out


def test_empty_concept_slots_change_nothing_and_filled_ones_change_the_encodings(setup):
    """Concept and tag slots sit beside the tokens and patches, masked out of attention when empty: a sample
    without concepts encodes exactly as with the concept inputs off; one with them, differently."""
    model, batch = setup
    with torch.no_grad():
        off = model.unimodal(batch)
        empty = model.unimodal(without_concepts(batch), concepts=True)
        filled = model.unimodal(batch, concepts=True)
    for name in ("text", "image"):
        torch.testing.assert_close(getattr(empty, name), getattr(off, name), rtol=1e-5, atol=1e-5, msg=name)
        assert not torch.allclose(getattr(filled, name), getattr(off, name), atol=1e-3), name
    assert filled.concepts.tokens.shape[:2] == batch["concept_ids"].shape and filled.tags.valid.equal(
        batch["tag_ids"] != CONCEPT_PAD
    )


def test_a_level_configured_away_leaves_the_other_working(setup):
    """tags_per_sample: 0 (say, no tagger): no tag slots; concepts still encode, recover and ground."""
    model, batch = setup
    no_tags = batch | {"tag_ids": batch["tag_ids"][:, :0]}
    for name in ("mcr", "grounding"):
        loss, metrics = TASKS[name]()(model, no_tags, ctx())
        assert torch.isfinite(loss) and loss.item() > 0, name
    assert metrics["concepts"] > 0 and model.unimodal(no_tags, concepts=True).tags.tokens.shape[1] == 0


def test_concept_recovery_masks_filled_slots_only_at_least_one_and_whole_levels(setup):
    model, batch = setup
    task = TASKS["mcr"]()
    request, masks = task.prepare(model, without_concepts(batch, slice(0, 2)), ctx())
    for key, mask in masks.items():
        filled = batch[key] != CONCEPT_PAD
        assert not mask[:2].any() and not (mask & ~filled).any() and (mask[2:].sum(1) >= 1).all(), key
        assert (request.batch[key][mask] == CONCEPT_MASK).all() and request.batch[key][~mask].ne(CONCEPT_MASK).all()
    assert request.concepts and not request.fuse  # the uni-modal level
    whole = TASKS["mcr"](MaskingConfig(mask_ratio=0.1, whole_modality_prob=1.0))
    _, masks = whole.prepare(model, batch, ctx())
    assert all(mask.equal(batch[key] != CONCEPT_PAD) for key, mask in masks.items())


@pytest.mark.parametrize("name", sorted(REACHES))
def test_concept_task_loss_reaches_its_modules_and_uni_modal_ones_skip_the_fusion(setup, name):
    model, batch = setup
    model.zero_grad(set_to_none=True)
    loss, metrics = TASKS[name]()(model, batch, ctx())
    assert torch.isfinite(loss) and loss.item() > 0 and all(v == v for v in map(float, metrics.values()))
    loss.backward()
    reached = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert set(REACHES[name]) <= reached, set(REACHES[name]) - reached
    assert ("fusion" in reached) == (name not in UNIMODAL)


@pytest.mark.parametrize("name", sorted(REACHES))
def test_samples_without_concepts_run_the_same_modules(setup, name):
    """ZeRO-3 gathers parameters module by module: a rank whose samples have no concepts (or only text) must run
    what a rank with concepts runs, and get a finite loss."""
    model, batch = setup
    text_only = dict(
        without_concepts(batch),
        has_image=torch.zeros_like(batch["has_image"]),
        has_audio=torch.zeros_like(batch["has_audio"]),
        audio_mask=torch.zeros_like(batch["audio_mask"]),
    )
    runs = []
    for b in (batch, without_concepts(batch, slice(0, 3)), without_concepts(batch), text_only):

        def step():
            loss, _ = TASKS[name]()(model, b, ctx())
            assert torch.isfinite(loss)
            loss.backward()

        runs.append(modules_run(model, step))
    assert all(run == runs[0] for run in runs[1:])


def test_hardest_negatives_are_the_most_similar_allowed_and_equal_captions_are_never_negatives(setup):
    similarity = torch.tensor([[0.9, 0.8, 0.1], [0.7, 0.95, 0.3], [0.2, 0.6, 0.5]])
    allowed = ~torch.eye(3, dtype=torch.bool)
    allowed[2, 1] = allowed[1, 2] = False
    partner, has_partner, caption, has_caption = hardest_negatives(similarity, allowed)
    assert partner.tolist() == [1, 0, 0] and caption.tolist() == [1, 0, 0] and has_partner.all() and has_caption.all()
    model, batch = setup
    same = batch | {
        "text_ids": batch["text_ids"][:1].expand_as(batch["text_ids"]),
        "text_mask": batch["text_mask"][:1].expand_as(batch["text_mask"]),
    }
    _, metrics = TASKS["hard_matching"]()(model, same, ctx())  # one caption for all: only the matched pairs count
    assert metrics["hard"] == 0 and metrics["matched"] == 2 * batch["text_ids"].shape[0]  # image and audio pairs


def test_a_concept_other_pictures_show_is_no_negative_for_grounding(setup):
    """Every sample holding the same concept (and no other): no picture is a negative, nothing is scored."""
    model, batch = setup
    shared = batch["concept_ids"][0, 0]
    alike = batch | {"concept_ids": torch.full_like(batch["concept_ids"], CONCEPT_PAD)}
    alike["concept_ids"][:, 0] = shared
    loss, metrics = TASKS["grounding"]()(model, alike, ctx())
    assert metrics["concepts"] == 0 and loss.item() == 0
    _, metrics = TASKS["grounding"]()(model, batch, ctx())
    assert 0 < metrics["concepts"] <= (batch["concept_ids"] != CONCEPT_PAD).sum()


@pytest.mark.slow
def test_concept_tasks_learn_on_synthetic_triplets(tmp_path):
    """Plain-PyTorch steps on the synthetic set with its mined vocabulary: the concept tasks' losses fall, and
    recovery of a masked tag from the picture beats chance (1 in the vocabulary)."""
    run_module(
        "opt_ds.data.build_shards",
        "synthetic",
        "--num",
        "600",
        "--max-samples",
        "200",
        "--out",
        str(tmp_path),
        "--quiet",
    )
    run_module("opt_ds.data.concepts", str(tmp_path), "--min-count", "10")
    torch.manual_seed(0)
    model = concept_model(tmp_path / "concepts.json")
    loader = concept_loader(tmp_path, tmp_path / "concepts.json", 16, num_workers=1)
    weights = {name: 1.0 for name in REACHES}
    scheduler = TaskScheduler(ScheduleConfig(mode="sample", stages=[StageConfig("all", weights)]), TASKS)
    history = train_plain(
        model, loader, scheduler, steps=160, lr=3e-4, decode=concept_decode(tmp_path / "concepts.json")
    )
    for name in REACHES:
        first, last = task_trend(history, f"{name}/loss", window=8)
        assert last < first, f"{name}: loss {first:.3f} -> {last:.3f}"
    _, tag_acc = task_trend(history, "mcr/tags_acc", window=8)
    assert tag_acc > 5 / model.cfg.concept_vocab_size, tag_acc
