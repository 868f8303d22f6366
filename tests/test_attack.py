import numpy as np
import pytest
import torch

from dori.attack import AttackConfig, AttackItem, DiffusionLoss, L2Ball, LinfBall, RandomNormal, dori_kowalczuk2025
from dori.attack.parts import FromPrompt
from dori.attack.run import AttackRunConfig, load_triggers, run_attack
from dori.descriptors import TestbedDescriptor
from dori.errors import DoriError
from dori.images import to_tensor
from dori.models import encode_images
from dori.models import testbed_path as shipped_testbed
from dori.prompts import load_prompt_set
from dori.seeding import item_generator


@pytest.fixture(scope="module")
def setting(testbed_pipe):
    prompt_set = load_prompt_set("testbed:memorized").subset(2)
    refs = [prompt_set.references[r.id] for r in prompt_set.records]
    targets = encode_images(testbed_pipe, to_tensor(np.stack(refs)))
    return prompt_set, refs, targets, TestbedDescriptor.from_folder(shipped_testbed())


def test_diffusion_loss_draws_its_timesteps_from_the_range_it_is_given(testbed_pipe, setting):
    _, _, targets, _ = setting
    y = torch.stack([RandomNormal(seed=3)(testbed_pipe, "a photo", 0) for _ in range(len(targets))])

    def draws(loss):
        return loss.inputs(y, targets, [item_generator("range", i) for i in range(len(targets))])

    every, explicit = draws(DiffusionLoss(testbed_pipe, 16)), draws(DiffusionLoss(testbed_pipe, 16, timesteps=(0, 1000)))
    for a, b in zip(every, explicit, strict=True):
        assert torch.equal(a, b)  # the whole range is the default
    assert every[1].min() < 500 <= every[1].max()
    noisy, t, _, target = draws(DiffusionLoss(testbed_pipe, 16, timesteps=(500, 1000)))
    assert t.min() >= 500 and t.max() < 1000 and len(t) == 16 * len(targets)
    assert noisy.shape == every[0].shape and target.shape == every[3].shape
    for bad in ((500, 500), (-1, 10), (0, 1001)):
        with pytest.raises(DoriError, match=r"timesteps: must be a range \[low, high\) with 0 <= low < high <= 1000"):
            DiffusionLoss(testbed_pipe, timesteps=bad)


def test_loss_falls_and_gradients_reach_the_embedding_only(testbed_pipe, setting):
    prompt_set, refs, targets, descriptor = setting
    unet = testbed_pipe.unet
    unet.train()  # a mode the attack must leave as found
    hooks_before = len(unet._forward_hooks)
    objective = DiffusionLoss(testbed_pipe)
    y0 = torch.stack([RandomNormal(seed=3)(testbed_pipe, r.prompt, 0) for r in prompt_set.records])
    fixed = [item_generator("eval", i) for i in range(2)]
    with torch.no_grad():
        before = objective(y0, targets, [item_generator("eval", i) for i in range(2)])
    attack = dori_kowalczuk2025(testbed_pipe, descriptor, refs, initializer=RandomNormal(seed=3), seeds=[0],
                                config=AttackConfig(steps=10, record_at=()))
    results = attack.run([AttackItem(r.id, r.prompt, i) for i, r in enumerate(prompt_set.records)], targets)
    with torch.no_grad():
        after = objective(torch.stack([r.trigger for r in results]), targets, fixed)
    assert (after < before).all(), (before, after)
    assert unet.training and len(unet._forward_hooks) == hooks_before
    assert all(p.grad is None and not p.requires_grad for p in unet.parameters())
    assert all(torch.equal(r.initial, y0[i]) for i, r in enumerate(results))
    assert all(r.unet_evaluations == 10 * 8 and r.relative_perturbation > 0 for r in results)
    unet.eval()


@pytest.mark.parametrize("confirm", [1, 2])
def test_early_stop_stops_after_confirmed_checks_and_counts_them(testbed_pipe, setting, confirm):
    """From the memorized prompt the unmitigated testbed already replicates, so every check passes:
    triggers stop at the ``confirm``-th check, and each check's sampling is counted."""
    prompt_set, refs, targets, descriptor = setting
    config = AttackConfig(steps=20, record_at=(), early_stop=True, check_every=3, check_confirm=confirm, check_tail=0)
    attack = dori_kowalczuk2025(testbed_pipe, descriptor, refs, initializer=FromPrompt(), seeds=[0, 1], config=config,
                                check_seeds=1)
    results = attack.run([AttackItem(r.id, r.prompt, i) for i, r in enumerate(prompt_set.records)], targets)
    check_cost = attack.early_check.cost
    for r in results:
        assert r.steps_run == 3 * confirm
        assert r.unet_evaluations == 3 * confirm * config.pairs + confirm * check_cost
        assert r.status == "succeeded"


class _CountedCheck:
    """An early check that records how many triggers each call checked."""

    def __init__(self, check):
        self.check, self.cost, self.calls = check, check.cost, []

    def __call__(self, y, which):
        self.calls.append(len(y))
        return self.check(y, which)


def test_early_stop_tail_keeps_optimising_without_checks(testbed_pipe, setting):
    """With ``check_tail`` a trigger that passed its check runs that many more steps, is not checked
    again, and its evaluations count the steps and the one check; a run shorter than the tail stops at
    its last step."""
    prompt_set, refs, targets, descriptor = setting
    items = [AttackItem(r.id, r.prompt, i) for i, r in enumerate(prompt_set.records)]
    for steps, tail, stop in ((20, 4, 7), (5, 4, 5)):
        config = AttackConfig(steps=steps, record_at=(), early_stop=True, check_every=3, check_confirm=1, check_tail=tail)
        attack = dori_kowalczuk2025(testbed_pipe, descriptor, refs, initializer=FromPrompt(), seeds=[0, 1],
                                    config=config)
        counted = _CountedCheck(attack.early_check)
        attack.early_check = counted
        results = attack.run(items, targets)
        assert counted.calls == [len(items)]  # one check of every trigger, at step 3; none after it passed
        for r in results:
            assert r.steps_run == stop
            assert r.unet_evaluations == stop * config.pairs + counted.cost


def test_constraints_project_onto_their_balls():
    torch.manual_seed(0)
    origin, y = torch.randn(3, 5, 4), torch.randn(3, 5, 4) * 10
    l2 = L2Ball(0.5).project(y, origin)
    assert torch.all((l2 - origin).flatten(1).norm(dim=1) <= 0.5 * origin.flatten(1).norm(dim=1) + 1e-5)
    linf = LinfBall(0.1).project(y, origin)
    assert (linf - origin).abs().max() <= 0.1 + 1e-6
    inside = origin + 0.01
    assert torch.allclose(L2Ball(0.5).project(inside, origin), inside)


def test_bad_attack_settings():
    with pytest.raises(DoriError, match="check_confirm"):
        AttackConfig(check_confirm=0).validate()
    with pytest.raises(DoriError, match="check_tail"):
        AttackConfig(check_tail=-1).validate()
    with pytest.raises(DoriError, match="steps"):
        AttackConfig(steps=0).validate()
    with pytest.raises(DoriError, match="init"):
        AttackRunConfig(init="nowhere").validate()


def test_run_saves_triggers_that_load_back_identical(tmp_path, testbed_pipe):
    config = AttackRunConfig(prompts="testbed:memorized", limit=1, num_seeds=2,
                             attack=AttackConfig(steps=2, record_at=(0, 2)))
    path, records = run_attack(testbed_pipe, config, tmp_path / "attack")
    triggers = load_triggers(path)
    assert set(triggers) == {r["key"] for r in records}
    from safetensors.torch import load_file

    for r in records:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in r["key"])
        assert torch.equal(triggers[r["key"]], load_file(str(path / "triggers" / f"{safe}.safetensors"))["trigger"])
    assert set(records[0]["mr_by_step"]) == {"0", "2"}
    again_path, again = run_attack(testbed_pipe, config, tmp_path / "attack")
    assert [r["key"] for r in again] == [r["key"] for r in records]  # resumed: nothing recomputed


def test_prompt_initialiser_is_the_prompt_embedding(testbed_pipe):
    from dori.models import encode_prompts as encode

    y = FromPrompt()(testbed_pipe, "a cup of coffee", 0)
    assert torch.equal(y, encode(testbed_pipe, ["a cup of coffee"])[0])
