"""Utility metrics: FID with a passed-in extractor (a real TorchScript file in the clean-fid convention),
CLIP score on a local CLIPModel folder, the fixed-draw denoising loss, and clear errors for missing weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dori.errors import DoriError
from dori.generation import GenerationConfig
from dori.utility import InceptionFeatures, LatentFeatures, clip_score, denoising_loss, fid


class _PoolNet(torch.nn.Module):
    """A stand-in with the clean-fid Inception signature: ``forward(x in [0, 255], return_features=True)``."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x / 255.0, 2).flatten(1)  # 12 features
        return pooled if return_features else pooled.sum(1, keepdim=True)


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "inception-2015-12-05.pt"
    torch.jit.script(_PoolNet()).save(str(path))
    return path


def test_fid_is_zero_for_identical_sets_and_grows_with_a_shift(torchscript_file):
    g = torch.Generator().manual_seed(0)
    real = torch.rand((64, 3, 16, 16), generator=g)
    features = InceptionFeatures(torchscript_file)
    assert features(real).shape == (64, 12)
    assert abs(fid(real, real, features)) < 1e-3
    near = fid(real, (real + 0.05).clamp(0, 1), features)
    far = fid(real, (real * 0.5), features)
    assert 0 < near < far


class _Pooled(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)


def _images(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    real = torch.rand((32, 3, 8, 8), generator=g)
    return real, (real * (0.5 + 0.2 * rank)).clamp(0, 1)


def _fid_in_a_group(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        value = fid(*_images(rank), _Pooled())
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(value, f"{out}/{rank}.pt")


def test_fid_is_each_process_own_in_a_launched_run(tmp_path):
    """Under ``--processes`` (a process group) every process scores its own images: FID gathers nothing
    (torchmetrics would otherwise merge the two sets, or wait for a process that never computes one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_fid_in_a_group, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        alone = fid(*_images(rank), _Pooled())
        assert torch.load(tmp_path / f"{rank}.pt") == pytest.approx(alone, rel=1e-6)
    assert fid(*_images(0), _Pooled()) != pytest.approx(fid(*_images(1), _Pooled()), rel=1e-2)


def test_missing_or_bad_weights_name_the_file(tmp_path):
    with pytest.raises(DoriError, match="inception: no file .*missing.pt"):
        InceptionFeatures(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(DoriError, match="not a TorchScript file"):
        InceptionFeatures(tmp_path / "junk.pt")
    with pytest.raises(DoriError, match="clip_model: .* has no config.json"):
        clip_score(torch.rand(2, 3, 8, 8), ["a", "b"], tmp_path)


def test_clip_score_on_a_local_clip_folder(tmp_path, clip_tokenizer):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                         vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                           num_hidden_layers=2, image_size=32, patch_size=8),
                        projection_dim=16)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer)
    processor.save_pretrained(folder)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    score = clip_score(images, ["a red circle", "a blue square", "a photo"], folder)
    assert 0.0 <= score <= 100.0
    assert score == pytest.approx(clip_score(images, ["a red circle", "a blue square", "a photo"], folder))


def test_denoising_loss_is_reproducible_and_tracks_the_model(testbed_pipe):
    from dori.images import to_tensor
    from dori.models import encode_images, encode_prompts
    from dori.prompts import load_prompt_set

    shapes = load_prompt_set("testbed:shape").records[:8]
    refs = load_prompt_set("testbed:shape").references
    latents = encode_images(testbed_pipe, to_tensor(np.stack([refs[r.id] for r in shapes])))
    right = encode_prompts(testbed_pipe, [r.prompt for r in shapes])
    first = denoising_loss(testbed_pipe, latents, right)
    assert first == denoising_loss(testbed_pipe, latents, right)
    wrong = encode_prompts(testbed_pipe, ["a portrait photo of astronaut eileen collins in front of the flag"] * 8)
    assert denoising_loss(testbed_pipe, latents, wrong) > first  # captions that do not match denoise worse


def test_latent_features_are_the_vae_posterior_means(testbed_pipe):
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    feats = LatentFeatures(testbed_pipe.vae)(images)
    with torch.no_grad():
        expected = testbed_pipe.vae.encode(images * 2 - 1).latent_dist.mean.flatten(1)
    assert torch.allclose(feats, expected)


def test_testbed_concept_is_a_nearest_subject_accuracy_and_an_fid_against_a_baseline(testbed_pipe):
    """``testbed_concept``: the 32 shipped paraphrases, a_concept = share of generations whose closest memorized
    photo (testbed descriptor) is their caption's subject, fid_concept = 0 against the same images."""
    from dori.descriptors import DescriptorConfig
    from dori.prompts import prompts_for
    from dori.utility import testbed_concept

    figures, images = testbed_concept(testbed_pipe, num_seeds=1)
    concept = prompts_for(testbed_pipe, "testbed:concept")
    assert figures["concept_images"] == len(concept.records) == 32 and "fid_concept" not in figures
    descriptor = DescriptorConfig().build(testbed_pipe)
    names = list(concept.gallery)
    photos = torch.stack([descriptor.embed(torch.from_numpy(concept.gallery[n]).permute(2, 0, 1)[None] / 255.0)[0]
                          for n in names])
    nearest = (descriptor.embed(images) @ photos.T).argmax(dim=1).tolist()
    subjects = [r.id.split("/")[1].rsplit("-", 1)[0] for r in concept.records]
    assert figures["a_concept"] == pytest.approx(np.mean([names[j] == s for j, s in zip(nearest, subjects, strict=True)]))
    again, _ = testbed_concept(testbed_pipe, baseline=images, num_seeds=1)
    assert again["a_concept"] == figures["a_concept"] and abs(again["fid_concept"]) < 1e-2


def test_utility_blocks_start_with_the_demo_stage_and_a_model_differs_from_itself_by_nothing(testbed_pipe):
    from dori.utility import paired_spread, testbed_utility, testbed_utility_blocks

    blocks = testbed_utility_blocks(testbed_pipe, blocks=2, num_images=6, seed=3, stride=6)
    assert [b["seed"] for b in blocks] == [3, 9]
    assert {k: v for k, v in blocks[0].items() if k != "seed"} == testbed_utility(testbed_pipe, num_images=6, seed=3)
    fids = [b["fid_vae"] for b in blocks]
    assert fids[0] != fids[1]  # other seeds, other generations
    same = paired_spread(fids, fids)
    assert same["diff_mean"] == same["diff_sd"] == same["diff_low"] == same["diff_high"] == 0
    assert same["base_sd"] == same["other_sd"] > 0
    sampler = testbed_utility_blocks(testbed_pipe, blocks=1, num_images=6, seed=3, generation=GenerationConfig())[0]
    assert sampler == blocks[0]  # the demo's sampler is the default one
    unguided = testbed_utility_blocks(testbed_pipe, blocks=1, num_images=6, seed=3,
                                      generation=GenerationConfig(guidance_scale=1.0))[0]
    assert unguided["fid_vae"] != blocks[0]["fid_vae"] and unguided["retain_loss"] == blocks[0]["retain_loss"]
    with_failures = testbed_utility_blocks(testbed_pipe, blocks=1, num_images=6, seed=3, failures=True)[0]
    assert {k: v for k, v in with_failures.items() if not k.startswith("shape_") or k == "shape_accuracy"} == blocks[0]
    shares = [with_failures[f"shape_{k}"] for k in ("background_wrong", "object_missing", "object_wrong")]
    assert with_failures["shape_accuracy"] + sum(shares) == pytest.approx(1.0)
    assert sum(with_failures["shape_confusions"].values()) == round(6 * (shares[0] + shares[2]))
    with pytest.raises(DoriError, match="stride: 5 .* at least 6"):
        testbed_utility_blocks(testbed_pipe, blocks=2, num_images=6, stride=5)
    with pytest.raises(DoriError, match="blocks: 0"):
        testbed_utility_blocks(testbed_pipe, blocks=0)


def test_paired_spread_is_a_student_t_interval_over_the_blocks_differences():
    from dori.utility import paired_spread

    spread = paired_spread([0.5, 0.7, 0.6], [0.4, 0.5, 0.6])  # differences -0.1, -0.2, 0.0
    assert spread["diff_mean"] == pytest.approx(-0.1)
    assert spread["diff_sd"] == pytest.approx(0.1)
    half = 4.302653 * 0.1 / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
    assert (spread["diff_low"], spread["diff_high"]) == pytest.approx((-0.1 - half, -0.1 + half), abs=1e-6)
    assert spread["base_mean"] == pytest.approx(0.6) and spread["other_sd"] == pytest.approx(0.1)
    with pytest.raises(DoriError, match="same number of blocks"):
        paired_spread([0.5, 0.6], [0.5])
    with pytest.raises(DoriError, match="level: 1.5"):
        paired_spread([0.5, 0.6], [0.5, 0.7], level=1.5)
