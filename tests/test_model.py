"""The OPT model: configs, sizes against the built model, FLOPs against torch's counter, shapes, generation, VQ-VAE."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import run_module
from opt_ds.config.fields import ConfigError
from opt_ds.model.config import VISION_STEMS, load_model_config, model_config_names
from opt_ds.model.generate import filter_logits, generate_image_tokens, generate_text
from opt_ds.model.opt import OPTModel, parameter_counts
from opt_ds.model.size import forward_flops, lengths_for, parameter_count
from opt_ds.model.vqvae import VQVAE


def fake_batch(cfg, batch=3, text_len=12, frames=120, has=(True, True, True)) -> dict:
    g = torch.Generator().manual_seed(0)
    flags = {m: torch.tensor([has[i]] * batch) for i, m in enumerate(("text", "image", "audio"))}
    return {
        "text_ids": torch.randint(1000, 5000, (batch, text_len), generator=g),
        "text_mask": torch.ones(batch, text_len, dtype=torch.bool) & flags["text"][:, None],
        "image": torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g),
        "audio": torch.randn(batch, frames, cfg.audio.n_mels, generator=g),
        "audio_mask": torch.ones(batch, frames, dtype=torch.bool) & flags["audio"][:, None],
        **{f"has_{m}": f for m, f in flags.items()},
    }


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    return cfg, OPTModel(cfg).eval()


def test_named_configs_exist_and_scale_to_billions():
    names = model_config_names()
    assert {"tiny", "small", "base", "large", "xl"} <= set(names)
    totals = [parameter_count(load_model_config(n))["total"] for n in ("tiny", "small", "base", "large", "xl")]
    assert totals == sorted(totals) and totals[0] < 20e6 and totals[-1] > 5e9
    assert 4.5e9 < parameter_count(load_model_config("xl"))["fusion"] < 5.1e9  # OPT's 24 x 4096 encoder


@pytest.mark.parametrize(
    "name, overrides",
    [
        *((n, {}) for n in ("tiny", "small", "base", "large", "xl")),
        ("tiny", {"concept_vocab_size": 50}),
        *((n, {"vision": {"stem": "conv"}}) for n in ("tiny", "base")),
    ],
)
def test_analytic_parameters_match_the_built_model(name, overrides):
    cfg = load_model_config(name, overrides)
    with torch.device("meta"):
        model = OPTModel(cfg)
    assert parameter_counts(model) == parameter_count(cfg)


def test_analytic_flops_match_torch_flop_counter(tiny):
    cfg, model = tiny
    b, frames = 2, cfg.audio.max_frames
    batch = fake_batch(cfg, batch=b, text_len=cfg.text.max_len, frames=frames)
    expected = forward_flops(cfg, lengths_for(cfg, cfg.text.max_len, frames))
    counted = {}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # the math backend's matmuls are visible to the counter

        def count(part, fn):
            with FlopCounterMode(display=False) as fc:
                out = fn()
            counted[part] = fc.get_total_flops() / b
            return out

        uni = count("encoders", lambda: model.unimodal(batch))
        fused = count("fusion", lambda: model.fuse(uni, batch))
        count("text_decoder", lambda: model.text_decoder(batch["text_ids"], fused.tokens, fused.valid))
        count(
            "image_decoder",
            lambda: model.image_decoder(
                torch.zeros(b, cfg.vision.grid**2, dtype=torch.long), fused.tokens, fused.valid
            ),
        )
    expected["encoders"] = expected["text"] + expected["vision"] + expected["audio"]
    for part, flops in counted.items():
        assert flops == pytest.approx(expected[part], rel=0.02), part


@pytest.mark.parametrize("stem", VISION_STEMS)
def test_analytic_vision_flops_follow_the_stem(stem):
    cfg = load_model_config("tiny", {"vision": {"stem": stem}})
    vision = OPTModel(cfg).vision.eval()
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        assert vision(images).shape == (2, cfg.vision.grid**2 + 1, cfg.vision.hidden)
    assert fc.get_total_flops() / 2 == pytest.approx(forward_flops(cfg)["vision"], rel=0.01)


def test_analytic_flops_count_the_concept_and_tag_slots():
    """Concept slots lengthen the text tower's sequence, tag slots the vision tower's: the estimate follows the
    counter."""
    torch.manual_seed(0)
    cfg = load_model_config("tiny", {"concept_vocab_size": 50})
    model = OPTModel(cfg).eval()
    b, slots = 2, (5, 3)
    batch = fake_batch(cfg, batch=b, text_len=cfg.text.max_len, frames=cfg.audio.max_frames)
    batch |= {"concept_ids": torch.randint(2, 50, (b, slots[0])), "tag_ids": torch.randint(2, 50, (b, slots[1]))}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model.unimodal(batch, concepts=True)
    expected = forward_flops(cfg, lengths_for(cfg, cfg.text.max_len, cfg.audio.max_frames, slots))
    assert fc.get_total_flops() / b == pytest.approx(
        expected["text"] + expected["vision"] + expected["audio"], rel=0.02
    )


def test_step_flops_count_the_caption_rewrites_the_contrastive_task_encodes(tiny):
    """Rewrite slots add text-encoder rows: the FLOP estimate grows by what torch's counter sees them cost."""
    from opt_ds.tasks import TASKS, TaskContext, step_generator
    from opt_ds.train.metrics import step_flops

    cfg, model = tiny
    batch = fake_batch(cfg, batch=2, text_len=cfg.text.max_len, frames=cfg.audio.max_frames)
    slots = 3
    with_rewrites = batch | {
        "rewrite_ids": batch["text_ids"][:, None].repeat(1, slots, 1),
        "rewrite_mask": batch["text_mask"][:, None].repeat(1, slots, 1),
        "has_rewrite": torch.ones(2, slots, dtype=torch.bool),
        "rewrite_positive": torch.tensor([[True, False, False]] * 2),
    }
    task, plan = TASKS["contrastive"](), [("contrastive", 1.0)]
    counted = []
    for b in (batch, with_rewrites):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            task(model, b, TaskContext(step_generator(0, 0, 0)))
        counted.append(fc.get_total_flops())
    estimated = [step_flops(cfg, {"contrastive": task}, plan, b) / 3 for b in (batch, with_rewrites)]  # forward only
    assert estimated[1] - estimated[0] == pytest.approx(counted[1] - counted[0], rel=0.02)


def test_step_flops_count_the_rows_hard_matching_fuses(tiny):
    """Matching against hard negatives fuses three rows per sample and partner: a second partner adds what the
    counter sees three more fusion rows per sample cost."""
    from opt_ds.tasks import TASKS, TaskContext, step_generator
    from opt_ds.tasks.settings import PairMatchingConfig
    from opt_ds.train.metrics import step_flops

    cfg, model = tiny
    batch = fake_batch(cfg, batch=3, text_len=cfg.text.max_len, frames=cfg.audio.max_frames)
    counted, estimated = [], []
    for partners in (["image"], ["image", "audio"]):
        task = TASKS["hard_matching"](PairMatchingConfig(partners))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            task(model, batch, TaskContext(step_generator(0, 0, 0)))
        counted.append(fc.get_total_flops())
        estimated.append(step_flops(cfg, {"hard_matching": task}, [("hard_matching", 1.0)], batch) / 3)
    assert estimated[1] - estimated[0] == pytest.approx(counted[1] - counted[0], rel=0.02)


def test_model_cli_prints_json_without_allocating():
    report = json.loads(run_module("opt_ds.model", "--config", "xl", "--json").stdout)
    assert report["parameters"]["total"] == parameter_count(load_model_config("xl"))["total"]
    assert report["train_flops_per_sample"]["fusion"] == 3 * report["forward_flops_per_sample"]["fusion"]
    assert set(report["parameters"]) == {
        "text",
        "vision",
        "audio",
        "fusion",
        "text_decoder",
        "image_decoder",
        "heads",
        "total",
    }
    table = run_module("opt_ds.model", "--config", "tiny").stdout
    assert "fusion" in table and "GFLOP" in table


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'hiden'"):
        load_model_config("tiny", {"fusion": {"hiden": 3}})
    with pytest.raises(ConfigError, match="fusion.layers: expected int"):
        load_model_config("tiny", {"fusion": {"layers": "two"}})
    with pytest.raises(ConfigError, match="vq grid"):
        load_model_config("tiny", {"vq": {"downsample": 16}})
    with pytest.raises(ConfigError, match="vision.stem must be one of patch, conv"):
        load_model_config("tiny", {"vision": {"stem": "convolution"}})
    with pytest.raises(ConfigError, match="no vision.init_from"):
        load_model_config("tiny", {"vision": {"stem": "conv", "init_from": str(tmp_path / "vit.safetensors")}})
    with pytest.raises(FileNotFoundError, match="known: "):
        load_model_config("gigantic")


def test_encoder_shapes_and_absent_modalities(tiny):
    cfg, model = tiny
    batch = fake_batch(cfg, has=(True, False, True))
    batch["audio_mask"][1, 50:] = False
    with torch.no_grad():
        uni, fused = model.encode(batch)
    n = cfg.vision.grid**2
    assert uni.text.shape == (3, 12, cfg.text.hidden) and uni.image.shape == (3, 1 + n, cfg.vision.hidden)
    assert uni.audio.shape == (3, 1 + 30, cfg.audio.hidden) and uni.audio_valid[1].sum() == 1 + 13
    assert fused.tokens.shape == (3, 1 + 12 + 1 + n + 31, cfg.fusion.hidden)
    assert not fused.valid[:, fused.spans["image"]].any() and fused.valid[:, 0].all()
    assert torch.isfinite(fused.tokens).all()


def test_a_sample_with_nothing_but_audio_gives_finite_outputs(tiny):
    cfg, model = tiny
    batch = fake_batch(cfg, has=(False, False, True))
    with torch.no_grad():
        uni, fused = model.encode(batch)
    assert torch.isfinite(uni.text).all() and torch.isfinite(fused.tokens).all()


@pytest.mark.parametrize("beams", [1, 3])
def test_caption_generation_shapes_and_eos(tiny, beams):
    cfg, model = tiny
    batch = fake_batch(cfg)
    with torch.no_grad():
        _, fused = model.encode(batch)
        captions = generate_text(model, fused, bos=101, eos=102, max_len=10, beams=beams)
    assert len(captions) == 3 and all(1 <= len(c) <= 9 for c in captions)
    for c in captions:
        assert 102 not in c[:-1]  # nothing after EOS


@contextlib.contextmanager
def favoured_word(model, token: int, from_position: int = 1):
    """The text decoder's logits give `token` +1000 from the `from_position`-th generated position on."""

    def favour(_module, _inputs, logits):
        if logits.shape[1] >= from_position:
            logits[:, -1, token] += 1000.0
        return logits

    handle = model.text_decoder.head.register_forward_hook(favour)
    try:
        with torch.no_grad():
            yield
    finally:
        handle.remove()


def test_generation_stops_at_eos(tiny):
    """EOS made the best token from the third generated position on: captions end right there."""
    cfg, model = tiny
    with favoured_word(model, 102, from_position=3):
        _, fused = model.encode(fake_batch(cfg))
        for beams in (1, 4):
            captions = generate_text(model, fused, bos=101, eos=102, max_len=20, beams=beams)
            assert [len(c) for c in captions] == [3, 3, 3] and all(c[-1] == 102 for c in captions)


def test_no_repeat_ngram_forbids_a_bigram_twice(tiny):
    """Token 2000 made always the best: greedy repeats it; with no_repeat_ngram=2 no bigram comes twice."""
    cfg, model = tiny
    with favoured_word(model, 2000):
        _, fused = model.encode(fake_batch(cfg))
        repeated = generate_text(model, fused, bos=101, eos=102, max_len=8, beams=2)
        controlled = generate_text(model, fused, bos=101, eos=102, max_len=8, beams=2, no_repeat_ngram=2)
    assert all(c == [2000] * 7 for c in repeated)
    for c in controlled:
        bigrams = list(zip(c, c[1:]))
        assert len(bigrams) == len(set(bigrams)) and c.count(2000) >= 3  # still the favoured word; no bigram twice


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [[True, True, False, False], [False, False, True, True]]
    assert kept(filter_logits(logits, top_p=0.8)) == [[True, True, False, False], [False, False, True, True]]
    assert kept(filter_logits(logits, top_p=0.81)) == [[True, True, True, False], [False, True, True, True]]
    assert kept(filter_logits(logits, top_p=0.4)) == [[True, False, False, False], [False, False, False, True]]
    assert kept(filter_logits(logits)) == [[True] * 4] * 2


def test_image_token_generation(tiny):
    cfg, model = tiny
    with torch.no_grad():
        _, fused = model.encode(fake_batch(cfg))
        greedy = generate_image_tokens(model, fused)
        sampled = generate_image_tokens(
            model, fused, temperature=1.0, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1)
        )
    assert greedy.shape == sampled.shape == (3, cfg.vision.grid**2)
    assert greedy.max() < cfg.vq.codebook_size and sampled.max() < cfg.vq.codebook_size
    image = VQVAE(cfg.vq).decode(greedy)
    assert image.shape == (3, 3, cfg.vision.image_size, cfg.vision.image_size)


def test_image_guidance_moves_from_the_unconditional_codes_to_the_conditional_ones_and_beyond(tiny):
    """Classifier-free guidance: logits = unconditional + g * (conditional - unconditional). g=0 decodes as the
    unconditional fusion alone, g=1 as the conditional one alone; other scales change the codes."""
    cfg, model = tiny
    batch = fake_batch(cfg)
    absent = torch.zeros_like(batch["has_image"])
    with torch.no_grad():
        uni = model.unimodal(batch)
        fused = model.fuse(uni, batch, keep={"image": absent})
        free = model.fuse(uni, batch, keep={m: absent for m in ("text", "image", "audio")})
        conditional, unconditional = generate_image_tokens(model, fused), generate_image_tokens(model, free)
        assert not torch.equal(conditional, unconditional)
        assert torch.equal(generate_image_tokens(model, fused, guidance=1.0, unconditional=free), conditional)
        assert torch.equal(generate_image_tokens(model, fused, guidance=0.0, unconditional=free), unconditional)
        guided = generate_image_tokens(model, fused, guidance=5.0, unconditional=free)
    assert not torch.equal(guided, conditional) and guided.max() < cfg.vq.codebook_size
    with pytest.raises(ValueError, match="unconditional"):
        generate_image_tokens(model, fused, guidance=3.0)


def test_text_encoder_loads_the_shipped_minilm_weights():
    cfg = load_model_config("small", {"text": {"init_from": "minilm", "max_len": 512}})
    model = OPTModel(cfg)
    from safetensors.torch import load_file

    from opt_ds.data.tokenizer import default_tokenizer_dir

    shipped = load_file(str(default_tokenizer_dir() / "model.safetensors"))
    key = next(k for k in shipped if k.endswith("word_embeddings.weight"))
    assert torch.equal(model.text.word_embeddings.weight, shipped[key])
    with pytest.raises(ValueError, match="checkpoint has hidden=384"):
        OPTModel(load_model_config("tiny", {"text": {"init_from": "minilm"}}))


def test_vision_encoder_loads_a_timm_state_dict(tmp_path):
    import timm
    from safetensors.torch import save_file

    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=64, patch_size=8, embed_dim=128, depth=2, num_heads=2, num_classes=10
    )
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    model = OPTModel(load_model_config("tiny", {"vision": {"init_from": str(tmp_path / "vit.safetensors")}}))
    assert torch.equal(model.vision.pos_embed, vit.pos_embed) and torch.equal(
        model.vision.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight
    )


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = load_model_config("tiny", {"activation_checkpointing": ckpt})
        model = OPTModel(cfg)
        _, fused = model.encode(fake_batch(cfg))
        fused.tokens.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_vqvae_reconstruction_improves_on_synthetic_images(synthetic_shards):
    from opt_ds.data.batch import normalised_images
    from opt_ds.data.decode import DecodeConfig
    from opt_ds.data.stream import ReaderConfig, SourceConfig, make_loader

    torch.manual_seed(0)
    cfg = load_model_config("tiny").vq
    vq = VQVAE(cfg).train()
    opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
    loader = make_loader(
        [SourceConfig("s", str(synthetic_shards))], DecodeConfig(), ReaderConfig(batch_size=16, num_workers=0)
    )
    losses, used = [], []
    for step, batch in zip(range(150), loader):
        loss, metrics = vq(normalised_images(batch["image"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(metrics["recon_loss"]))
        used.append(float(metrics["codes_used"]))
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10
    assert min(used[-10:]) > 2 * used[0]  # dead-code restarts bring codes into use (simple images need few)
    codes = vq.eval().encode(normalised_images(batch["image"]))
    assert codes.shape == (16, cfg.grid**2) and vq.decode(codes).shape == batch["image"].shape
