"""Pre-training tasks: masking rules, losses and gradients, graph identity across data mixes, schedules, learning."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import join_gloo_group, modules_run, spawn_gloo_ranks
from opt_ds.bench.plain import task_trend, train_plain
from opt_ds.data.batch import to_device
from opt_ds.data.decode import DecodeConfig
from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader
from opt_ds.model.config import FRAMES_PER_AUDIO_TOKEN, VISION_STEMS, load_model_config
from opt_ds.model.fusion import MODALITY_ORDER
from opt_ds.model.opt import OPTModel
from opt_ds.model.vqvae import VQVAE
from opt_ds.tasks import (
    NEEDS_CONCEPTS,
    TASKS,
    ScheduleConfig,
    StageConfig,
    TaskContext,
    TaskScheduler,
    build_tasks,
    run_tasks,
    step_generator,
)
from opt_ds.tasks.base import bert_corrupt, choose_mask, text_candidates
from opt_ds.tasks.contrastive import PAIRS, Rewrites, contrastive_loss, info_nce
from opt_ds.tasks.matching import swap_sources
from opt_ds.tasks.token import audio_token_valid

EXPECTED_GRADS = {  # a parameter of each of these must get a non-zero gradient from the task
    "mlm": ["text", "vision", "audio", "fusion", "mlm_head"],
    "mvm": ["text", "vision", "audio", "fusion", "mvm_head"],
    "mam": ["text", "vision", "audio", "fusion", "mam_head"],
    "text_gen": ["vision", "audio", "fusion", "text_decoder"],
    "image_gen": ["text", "audio", "fusion", "image_decoder"],
    "matching": ["text", "vision", "audio", "fusion", "matching_head"],
    "contrastive": ["text", "vision", "audio", "contrastive_head"],
    "hard_matching": ["text", "vision", "audio", "fusion", "pair_matching_head"],
}
WITHOUT_CONCEPTS = sorted(set(TASKS) - NEEDS_CONCEPTS)  # the concept tasks: tests/test_concepts.py


@pytest.fixture(scope="module", params=["captions", "with_rewrites"])
def setup(synthetic_shards, request):
    """tiny, a VQ-VAE and one batch; the second time with UNIMO's caption rewrites batched (1 paraphrase and
    2 hard negatives per sample), which the contrastive task encodes in the same text-encoder call."""
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    rewrites = {"paraphrases_per_sample": 1, "hard_negatives_per_sample": 2} if request.param == "with_rewrites" else {}
    decode = DecodeConfig(max_audio_seconds=2.0, **rewrites)
    loader = make_loader(
        [SourceConfig("s", str(synthetic_shards))], decode, ReaderConfig(batch_size=6, num_workers=0, shuffle_buffer=0)
    )
    batch = to_device(next(iter(loader)), torch.device("cpu"), torch.float32, decode)
    return cfg, OPTModel(cfg), VQVAE(cfg.vq).eval(), batch


def ctx_for(vq, step=0, isolate=False):
    return TaskContext(step_generator(0, step, 0), vq, isolate)


def test_mask_ratio_at_least_one_and_whole_modality():
    ctx = ctx_for(None)
    candidates = torch.zeros(2000, 40, dtype=torch.bool)
    lengths = torch.randint(1, 41, (2000,), generator=torch.Generator().manual_seed(0))
    candidates[torch.arange(40)[None, :] < lengths[:, None]] = True
    mask = choose_mask(candidates, ctx, ratio=0.15, whole_prob=0.3)
    counts, n = mask.sum(1), candidates.sum(1)
    assert not (mask & ~candidates).any() and (counts >= 1).all()
    whole = counts == n
    partial = ~whole
    assert 0.25 < whole[n >= 10].float().mean() < 0.35  # modality-level masking, p=0.3
    assert torch.equal(counts[partial & (n >= 10)], (n[partial & (n >= 10)] * 0.15).round().long())


def test_bert_corruption_80_10_10():
    ctx = ctx_for(None)
    ids = torch.full((400, 50), 5000)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 25:] = False
    out = bert_corrupt(ids, mask, ctx)
    assert torch.equal(out[:, 25:], ids[:, 25:])
    masked = out[:, :25]
    frac_mask = (masked == 103).float().mean()
    frac_keep = (masked == 5000).float().mean()
    assert 0.77 < frac_mask < 0.83 and 0.08 < frac_keep < 0.12 and (masked >= 999).all() | (masked == 103).any()


def test_mlm_never_masks_special_or_padding(setup):
    cfg, model, vq, batch = setup
    cand = text_candidates(batch, ctx_for(vq))
    ids = batch["text_ids"]
    assert not cand[ids == 101].any() and not cand[ids == 102].any() and not cand[~batch["text_mask"]].any()
    assert (cand.sum(1) > 0).all()


def test_mam_prediction_never_sees_its_target_frames(setup):
    """A masked audio token's prediction has zero gradient w.r.t. the frames it must reconstruct, while the
    unmasked frames do reach it. The conv stem spans 7 frames: masking after it let an unmasked neighbour carry
    3 of the 4 target frames."""
    cfg, model, vq, batch = setup
    mask = choose_mask(audio_token_valid(batch, model), ctx_for(vq), ratio=0.15, whole_prob=0.0)
    audio = batch["audio"][:, : cfg.audio.max_frames].clone().requires_grad_(True)
    inputs = batch | {"audio": audio, "audio_mask": batch["audio_mask"][:, : cfg.audio.max_frames]}
    fused = model.fuse(model.unimodal(inputs, audio_token_mask=mask), inputs)
    model.mam_head(fused.part("audio")[:, 1:][mask]).sum().backward()
    targets = mask.repeat_interleave(FRAMES_PER_AUDIO_TOKEN, dim=1)[:, : audio.shape[1]]
    assert mask.any() and targets.any()
    assert audio.grad[targets].abs().max() == 0
    assert audio.grad[~targets & inputs["audio_mask"]].abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("stem", VISION_STEMS)
def test_mvm_prediction_never_sees_its_target_pixels(setup, stem):
    """A masked patch's prediction has zero gradient w.r.t. the patch's pixels, while unmasked pixels do reach
    it. The conv stem's receptive field (15 px) crosses 8 px patches: masking after it let the unmasked neighbours
    carry the masked patch's border."""
    cfg, _, vq, batch = setup
    torch.manual_seed(0)
    model = OPTModel(load_model_config("tiny", {"vision": {"stem": stem}}))
    grid = cfg.vision.grid
    mask = choose_mask(batch["has_image"][:, None].expand(-1, grid * grid), ctx_for(vq), ratio=0.15, whole_prob=0.0)
    image = batch["image"].clone().requires_grad_(True)
    inputs = batch | {"image": image}
    fused = model.fuse(model.unimodal(inputs, patch_mask=mask), inputs)
    model.mvm_head(fused.part("image")[:, 1:][mask]).sum().backward()
    pixels = mask.view(-1, 1, grid, grid).repeat_interleave(cfg.vision.patch_size, 2)
    pixels = pixels.repeat_interleave(cfg.vision.patch_size, 3).expand_as(image)
    assert mask.any()
    assert image.grad[pixels].abs().max() == 0
    assert image.grad[~pixels].abs().sum() > 0


@pytest.mark.parametrize("name", WITHOUT_CONCEPTS)
def test_task_loss_is_finite_and_reaches_its_parameters(setup, name):
    cfg, model, vq, batch = setup
    model.zero_grad(set_to_none=True)
    loss, metrics = TASKS[name]()(model, batch, ctx_for(vq))
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(isinstance(float(v), float) for v in metrics.values())
    loss.backward()
    reached = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert set(EXPECTED_GRADS[name]) <= reached, set(EXPECTED_GRADS[name]) - reached


@pytest.mark.parametrize("name", WITHOUT_CONCEPTS)
def test_every_data_mix_runs_the_same_modules(setup, name):
    """ZeRO-3 gathers parameters module by module: a rank with only text must run what a triplet rank runs."""
    cfg, model, vq, batch = setup
    text_only = dict(
        batch,
        has_image=torch.zeros_like(batch["has_image"]),
        has_audio=torch.zeros_like(batch["has_audio"]),
        audio_mask=torch.zeros_like(batch["audio_mask"]),
    )
    runs = []
    for b in (batch, text_only):

        def step():
            loss, _ = TASKS[name]()(model, b, ctx_for(vq))
            assert torch.isfinite(loss)
            loss.backward()

        runs.append(modules_run(model, step))
    assert runs[0] == runs[1]


def test_one_encoder_pass_for_all_tasks_gives_each_task_its_own_loss_and_runs_every_module_once(setup):
    """The runner encodes all tasks of a step together: same losses as one task at a time, one call per module
    (the fusion's too, which ZeRO-3 needs of the layers it gathers whole; the contrastive head's twice: matching
    against hard negatives picks its pairs by the contrastive similarity, without gradient)."""
    cfg, model, vq, batch = setup
    tasks = build_tasks()
    plan = [(name, 1.0) for name in WITHOUT_CONCEPTS]
    alone = {}
    ctx = ctx_for(vq, step=3)
    for name, _ in plan:  # the same draws, in the same order, as the joint run below
        alone[name] = float(tasks[name](model, batch, ctx)[0].detach())
    joint: dict = {}
    order = modules_run(model, lambda: joint.update(run_tasks(model, batch, plan, ctx_for(vq, step=3), tasks)[1]))
    for name, loss in alone.items():
        assert joint[f"{name}/loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6), name
    called = [n for n in order if n]
    twice = {n for n in called if called.count(n) > 1}
    assert twice == {"contrastive_head", *(f"contrastive_head.proj.{m}" for m in MODALITY_ORDER)}, twice
    assert {"text", "vision", "audio", "fusion", "text_decoder", "image_decoder"} <= set(called)


def test_unpaired_batches_give_zero_loss_for_tasks_that_do_not_apply(setup):
    cfg, model, vq, batch = setup
    text_only = dict(
        batch, has_image=torch.zeros_like(batch["has_image"]), has_audio=torch.zeros_like(batch["has_audio"])
    )
    for name in ("mvm", "mam", "matching", "image_gen", "hard_matching"):
        loss, _ = TASKS[name]()(model, text_only, ctx_for(vq))
        assert loss.item() == 0.0, name
    for name in ("mlm", "text_gen"):  # text_gen: text-to-text generation from a corrupted copy
        loss, _ = TASKS[name]()(model, text_only, ctx_for(vq))
        assert loss.item() > 0, name


def test_text_only_samples_train_the_decoder_from_a_corrupted_copy_and_paired_ones_never_see_their_text(setup):
    """Unpaired text trains generation (UNIMO's text-to-text): a text-only sample's loss reaches the text
    encoder and the decoder; a paired sample's caption stays out of the encoder, so its loss does not depend on it."""
    cfg, model, vq, batch = setup
    text_only = dict(
        batch, has_image=torch.zeros_like(batch["has_image"]), has_audio=torch.zeros_like(batch["has_audio"])
    )
    model.zero_grad(set_to_none=True)
    loss, metrics = TASKS["text_gen"]()(model, text_only, ctx_for(vq))
    loss.backward()
    assert metrics["tokens"] == batch["text_mask"][:, 1:].sum()
    for part in ("text", "text_decoder"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, part).parameters()), part
    model.zero_grad(set_to_none=True)
    request, _ = TASKS["text_gen"]().prepare(model, batch, ctx_for(vq))
    assert not (request.keep["text"] & batch["has_image"]).any() and torch.equal(
        request.batch["text_ids"], batch["text_ids"]
    )


def test_image_gen_trains_a_tenth_of_its_samples_with_no_condition(setup):
    """Classifier-free guidance needs an unconditional decoder: image_gen leaves both partners out of the
    fusion for about `unconditional_share` of its samples and still trains on their codes."""
    from opt_ds.tasks.settings import GenerationConfig

    cfg, model, vq, batch = setup
    task, unconditional, rows = TASKS["image_gen"](), 0, 0
    for step in range(40):
        request, state = task.prepare(model, batch, ctx_for(vq, step))
        free = ~request.keep["text"] & ~request.keep["audio"] & state["trained"]
        unconditional += int(free.sum())
        rows += batch["has_image"].shape[0]
    assert abs(unconditional / rows - GenerationConfig().unconditional_share) < 0.05
    loss, metrics = task(model, batch, ctx_for(vq))
    assert loss.item() > 0 and metrics["tokens"] > 0


def test_isolated_stage_hides_the_other_modalities(setup):
    """Stage 1 (uni-modal): MLM must not see image or audio, so changing them changes nothing."""
    cfg, model, vq, batch = setup
    other = dict(batch, image=torch.randn_like(batch["image"]), audio=torch.randn_like(batch["audio"]))
    with torch.no_grad():
        a, _ = TASKS["mlm"]()(model, batch, ctx_for(vq, isolate=True))
        b, _ = TASKS["mlm"]()(model, other, ctx_for(vq, isolate=True))
        c, _ = TASKS["mlm"]()(model, other, ctx_for(vq, isolate=False))
    assert a.item() == pytest.approx(b.item(), abs=1e-5) and a.item() != pytest.approx(c.item(), abs=1e-5)


def contrastive_inputs(batch: int = 8, rewrites: bool = False) -> tuple[dict, dict, torch.Tensor, Rewrites | None]:
    """Random unit embeddings; audio missing for the second sample of each half (equal pair counts per rank);
    with rewrites: 3 slots per sample (a paraphrase, 2 hard negatives), some of them absent."""
    gen = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, 16, generator=gen), dim=-1)  # noqa: E731
    emb = {m: unit(batch) for m in MODALITY_ORDER}
    has = {m: torch.ones(batch, dtype=torch.bool) for m in MODALITY_ORDER}
    has["audio"][[1, batch // 2 + 1]] = False
    extra = None
    if rewrites:
        present = torch.rand(batch, 3, generator=gen) < 0.7
        extra = Rewrites(unit(batch, 3), present, torch.tensor([[True, False, False]]).expand(batch, 3))
    return emb, has, torch.tensor(5.0), extra


def contrastive_rank(rank: int, port: int, out_dir: str, rewrites: bool = False) -> None:
    """One of two gloo ranks: the contrastive loss of its half of the batch, and the gradient of its embeddings."""
    join_gloo_group(rank, port)
    emb, has, scale, extra = contrastive_inputs(rewrites=rewrites)
    half = slice(rank * 4, rank * 4 + 4)
    mine = {m: e[half].clone().requires_grad_() for m, e in emb.items()}
    if extra is not None:
        extra = Rewrites(extra.emb[half].clone().requires_grad_(), extra.present[half], extra.positive[half])
    loss, metrics = contrastive_loss(mine, {m: h[half] for m, h in has.items()}, scale, extra)
    loss.backward()
    grads = {m: e.grad for m, e in mine.items()} | ({"rewrites": extra.emb.grad} if extra is not None else {})
    torch.save(
        {"loss": loss.detach(), "grads": grads, "acc": {k: v for k, v in metrics.items()}}, f"{out_dir}/rank{rank}.pt"
    )
    dist.destroy_process_group()


@pytest.mark.parametrize("rewrites", [False, True])
def test_contrastive_on_two_ranks_equals_the_whole_batch_on_one(tmp_path, rewrites):
    """Keys gathered from both ranks, gradients sent back to their rank: the data-parallel average of the two
    halves' losses and gradients is the loss and gradient of the whole batch in one process (with caption
    rewrites too: theirs are gathered like the captions)."""
    emb, has, scale, extra = contrastive_inputs(rewrites=rewrites)
    whole = {m: e.clone().requires_grad_() for m, e in emb.items()}
    if extra is not None:
        extra = Rewrites(extra.emb.clone().requires_grad_(), extra.present, extra.positive)
    loss, _ = contrastive_loss(whole, has, scale, extra)
    loss.backward()
    spawn_gloo_ranks(partial(contrastive_rank, rewrites=rewrites), tmp_path)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.allclose((parts[0]["loss"] + parts[1]["loss"]) / 2, loss, atol=1e-6)
    expected = {m: whole[m].grad for m in MODALITY_ORDER} | ({"rewrites": extra.emb.grad} if extra is not None else {})
    for name, grad in expected.items():  # each rank's gradient counts both ranks' losses; data parallelism halves it
        assert torch.allclose(torch.cat([p["grads"][name] for p in parts]) / 2, grad, atol=1e-6), name
        assert grad.abs().sum() > 0


def test_contrastive_loss_is_the_mean_over_the_pairs_the_batch_holds():
    """Image-text shards: the loss is the image-text pair's, not a third of it; with all three pairs, their mean."""
    emb, has, scale, _ = contrastive_inputs()
    loss, metrics = contrastive_loss(emb, has, scale)
    pairs = [metrics[f"{a}_{b}_loss"] for a, b in PAIRS]
    assert loss.item() == pytest.approx(sum(pairs).item() / 3, rel=1e-6)
    no_audio = has | {"audio": torch.zeros_like(has["audio"])}
    loss, metrics = contrastive_loss(emb, no_audio, scale)
    assert loss.item() == pytest.approx(metrics["text_image_loss"].item(), rel=1e-6) and loss.item() > 0.5


def test_rewrites_are_extra_positives_and_negatives_and_absent_ones_change_nothing():
    emb, has, scale, extra = contrastive_inputs(rewrites=True)
    plain, _ = contrastive_loss(emb, has, scale)
    absent, _ = contrastive_loss(emb, has, scale, Rewrites(extra.emb, torch.zeros_like(extra.present), extra.positive))
    assert absent.item() == pytest.approx(plain.item(), abs=1e-6)
    # image -> text for sample 0 by hand: the 8 captions, then sample 0's own rewrites (the present ones)
    image, own = emb["image"][0], extra.present[0]
    logits = torch.cat([emb["text"] @ image, extra.emb[0][own] @ image]) * scale
    positive = torch.cat([torch.arange(8) == 0, extra.positive[0][own]])
    by_hand = torch.logsumexp(logits, 0) - torch.logsumexp(logits[positive], 0)
    first = Rewrites(extra.emb[:1], extra.present[:1], extra.positive[:1])
    row, _ = info_nce(emb["image"][:1], emb["text"], has["text"], 0, torch.ones(1, dtype=torch.bool), scale, first)
    assert row.item() == pytest.approx(by_hand.item(), rel=1e-5)
    loss, metrics = contrastive_loss(emb, has, scale, extra)
    assert loss.item() != pytest.approx(plain.item(), abs=1e-3)
    assert 0 <= metrics["image_hard_negative_acc"] <= 1 and "audio_hard_negative_acc" in metrics


def test_text_embedding_is_the_mean_of_a_captions_real_tokens_and_a_rewrite_like_it_embeds_like_it(setup):
    """The contrastive text embedding pools the mean of the real tokens (BENCHMARKS.md, "the text pooling"), not
    [CLS]; a rewrite with the caption's words, padded longer and encoded in the same call, embeds identically."""
    from opt_ds.tasks.contrastive import contrastive_embeddings, contrastive_request
    from opt_ds.tasks.encoding import encode_requests

    _, model, _, batch = setup
    pad = 5
    batch = batch | {
        "rewrite_ids": F.pad(batch["text_ids"], (0, pad))[:, None],
        "rewrite_mask": F.pad(batch["text_mask"], (0, pad))[:, None],
        "has_rewrite": batch["has_text"][:, None],
        "rewrite_positive": torch.ones_like(batch["has_text"])[:, None],
    }
    with torch.no_grad():
        emb, _, rewrites = contrastive_embeddings(
            model, batch, encode_requests(model, [contrastive_request(batch)])[0][0]
        )
        tokens, valid = model.text(batch["text_ids"], batch["text_mask"]), batch["text_mask"][..., None].float()
        by_hand = F.normalize(model.contrastive_head.proj["text"]((tokens * valid).sum(1) / valid.sum(1)), dim=-1)
    rows = batch["has_text"]
    assert rows.any()
    assert torch.allclose(emb["text"][rows], by_hand[rows], atol=1e-5)
    assert torch.allclose(rewrites.emb[rows, 0], emb["text"][rows], atol=1e-5)


def test_matching_swaps():
    labels = torch.tensor([0, 1, 2, 3, 4])
    image_from, audio_from = swap_sources(labels)
    assert image_from.tolist() == [0, 2, 2, 4, 0] and audio_from.tolist() == [0, 1, 3, 4, 1]


def test_scheduler_draw_depends_only_on_seed_and_step_and_follows_stages():
    cfg = ScheduleConfig(
        mode="sample",
        seed=3,
        stages=[
            StageConfig("unimodal", {"mlm": 1.0, "mvm": 1.0, "mam": 1.0}, until_step=100, isolate=True),
            StageConfig("crossmodal", {"mlm": 1.0, "contrastive": 3.0}),
        ],
    )
    a, b = TaskScheduler(cfg, TASKS), TaskScheduler(cfg, TASKS)
    plans = [a.plan(s) for s in range(400)]
    assert plans == [b.plan(s) for s in range(400)]
    assert {p[0][0] for p in plans[:100]} == {"mlm", "mvm", "mam"} and a.stage(99)[1].isolate
    late = [p[0][0] for p in plans[100:]]
    assert set(late) == {"mlm", "contrastive"} and 0.68 < late.count("contrastive") / 300 < 0.82
    summed = TaskScheduler(ScheduleConfig(mode="sum", stages=cfg.stages), TASKS)
    assert summed.plan(150) == [("contrastive", 3.0), ("mlm", 1.0)]
    summed_late = ScheduleConfig(mode="sample", stages=[cfg.stages[0], replace(cfg.stages[1], mode="sum")])
    assert TaskScheduler(summed_late, TASKS).plan(150) == summed.plan(150)  # a stage's own mode


@pytest.mark.parametrize("stem", VISION_STEMS)
def test_encoders_run_as_at_inference_in_a_stage_that_trains_none_of_them(setup, stem):
    """A captioning stage (trains only the decoders): the backward pass reaches the decoders and nothing else, the
    conv stem's BatchNorm statistics stay as they were, and the model is back in training mode afterwards."""
    _, _, vq, batch = setup
    torch.manual_seed(0)
    model = OPTModel(load_model_config("tiny", {"vision": {"stem": stem}})).train()
    tasks = build_tasks()
    plan = [("text_gen", 1.0), ("image_gen", 1.0)]
    reached, buffers = {}, {}
    for frozen in (True, False):
        model.zero_grad(set_to_none=True)
        before = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
        ctx = TaskContext(step_generator(0, 0, 0), vq, encoders_frozen=frozen)
        loss, _ = run_tasks(model, batch, plan, ctx, tasks)
        loss.backward()
        reached[frozen] = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
        buffers[frozen] = all(torch.equal(b, before[n]) for n, b in model.named_buffers() if n in before)
        assert all(m.training for m in model.modules())
    assert {"text", "vision", "audio", "fusion", "text_decoder", "image_decoder"} <= reached[False]
    assert reached[True] == {"text_decoder", "image_decoder"}
    assert buffers[True] and buffers[False] == (stem == "patch")  # training mode updates the statistics


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="unknown task 'mlmm'"):
        TaskScheduler(ScheduleConfig(stages=[StageConfig("x", {"mlmm": 1.0})]), TASKS)
    with pytest.raises(ValueError, match="task 'contrastive' runs text, vision, audio, heads, none of which"):
        TaskScheduler(ScheduleConfig(stages=[StageConfig("x", {"contrastive": 1.0}, trains=["text_decoder"])]), TASKS)
    with pytest.raises(ValueError, match="stage 'x': trains needs model components .* got \\['decoder'\\]"):
        StageConfig("x", {"text_gen": 1.0}, trains=["decoder"])
    with pytest.raises(ValueError, match="stage 'x': lr must be > 0"):
        StageConfig("x", {"text_gen": 1.0}, lr=0.0)
    with pytest.raises(ValueError, match="stage 'x': mode must be one of"):
        StageConfig("x", {"text_gen": 1.0}, mode="round_robin")
    with pytest.raises(ValueError, match="only the last stage"):
        ScheduleConfig(stages=[StageConfig("x", {"mlm": 1.0}), StageConfig("y", {"mlm": 1.0}, until_step=5)])
    with pytest.raises(ValueError, match="mode"):
        ScheduleConfig(mode="round_robin")


@pytest.mark.slow
def test_training_drives_every_loss_down_and_retrieval_above_chance(tmp_path):
    """300 plain-PyTorch steps on agreeing synthetic triplets, one of the eight tasks without concepts per step."""
    from helpers import run_module

    run_module(
        "opt_ds.data.build_shards",
        "synthetic",
        "--num",
        "1200",
        "--max-samples",
        "200",
        "--out",
        str(tmp_path),
        "--quiet",
    )
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    model, vq = OPTModel(cfg), VQVAE(cfg.vq).eval()
    decode = DecodeConfig(max_audio_seconds=2.0)
    loader = make_loader([SourceConfig("t", str(tmp_path))], decode, ReaderConfig(batch_size=16, num_workers=1))
    weights = {name: 1.0 for name in WITHOUT_CONCEPTS} | {"contrastive": 3.0}
    scheduler = TaskScheduler(ScheduleConfig(mode="sample", stages=[StageConfig("all", weights)]), TASKS)
    history = train_plain(model, loader, scheduler, steps=300, lr=3e-4, image_tokenizer=vq, decode=decode)
    for name in WITHOUT_CONCEPTS:
        first, last = task_trend(history, f"{name}/loss", window=8)
        assert last < first, f"{name}: loss {first:.3f} -> {last:.3f}"
    chance = 1 / 16
    for pair in ("text_image", "text_audio", "image_audio"):
        _, acc = task_trend(history, f"contrastive/{pair}_acc", window=15)
        assert acc > 2.5 * chance, f"{pair} in-batch retrieval {acc:.3f} vs chance {chance:.3f}"
