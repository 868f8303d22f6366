"""The one hook context: named changes, duplicates refused, everything undone in ``finally``."""

from __future__ import annotations

import pytest
import torch

from dori.errors import DoriError
from dori.hooks import Handle, active_names, counting_calls, hooked


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def test_hooks_are_named_and_removed_even_when_the_block_raises():
    model, x = _model(), torch.randn(3, 4)
    plain = model(x)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(model, "zero") as hooks:
            hooks.forward("0", lambda _m, _a, out: out * 0)
            assert active_names(model) == {"zero/0"}
            assert not torch.equal(model(x), plain)
            raise RuntimeError("boom")
    assert active_names(model) == set()
    assert not model[0]._forward_hooks and torch.equal(model(x), plain)


def test_duplicate_names_are_refused_and_edits_undone_in_reverse():
    model = _model()
    weight = model[2].weight.detach().clone()
    first = Handle(model, "half")
    with torch.no_grad():
        model[2].weight.mul_(0.5)
    first.edit("2", lambda: model[2].weight.data.copy_(weight))
    with pytest.raises(DoriError, match="already applied"):
        Handle(model, "half").edit("2", lambda: None)
    with pytest.raises(DoriError, match="no module"):
        Handle(model, "x").forward("9", lambda *a: None)
    first.remove()
    first.remove()  # a second remove does nothing
    assert torch.equal(model[2].weight, weight) and active_names(model) == set()
    again = Handle(model, "half")  # the name is free again
    again.edit("2", lambda: None)
    again.remove()


def test_counting_calls_and_pre_hooks_with_kwargs():
    model, x = _model(), torch.randn(3, 4)
    with counting_calls(model) as counter:
        model(x)
        model(x[:1])
    assert counter.calls == 2 and counter.samples == 4 and not model._forward_hooks
    with hooked(model, "pre") as hooks:
        hooks.pre("", lambda _m, args, kwargs: ((args[0] * 0,), kwargs), with_kwargs=True)
        assert torch.equal(model(x), model(torch.zeros_like(x)))


def test_a_mitigation_applied_twice_is_refused(tiny_pipeline_folder):
    from dori.mitigations.ablation import AblationConfig, LayerAblation
    from dori.models import load_pipeline

    pipe = load_pipeline(tiny_pipeline_folder)
    ablation = LayerAblation(AblationConfig(factor=0.5))
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with ablation.apply(pipe):
        with pytest.raises(DoriError, match="already applied"):
            ablation.apply(pipe)
        with LayerAblation(AblationConfig(factor=0.25)).apply(pipe):  # another mitigation stacks
            pass
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())


def test_testbed_training_that_raises_leaves_no_hook(tmp_path, monkeypatch):
    """The training stage's hooks (sparsity penalty, direct-route drop) come off when a step raises."""
    import dori.testbed.train as train
    from dori.testbed.data import TestbedDataConfig

    made, original = {}, train.make_components

    def components(config, tokenizer=None):
        made.update(original(config, tokenizer))
        return made

    monkeypatch.setattr(train, "make_components", components)
    data = TestbedDataConfig(copies_per_photo=2, seen_once=17, shapes=8, held_out_crops=2, held_out_shape_combos=2,
                             emoji=8, held_out_emoji=2, template_captions=2)
    config = train.TestbedTrainConfig(data=data, vae_steps=1, unet_steps=3, sparsify_steps=3, vae_batch_size=4,
                                      unet_batch_size=4, warmup_steps=1)
    during = {}

    def fail(stage, step, total, info=""):
        if stage == "sparsify":
            during["hooks"] = active_names(made["unet"])
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train.train_testbed(tmp_path / "build", config, progress=fail)
    assert any(name.startswith("testbed-sparsify/") for name in during["hooks"])  # on during the step
    assert active_names(made["unet"]) == set()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in made["unet"].modules())


def test_counting_class_calls_counts_copies_of_the_model_too():
    import copy

    from dori.hooks import counting_class_calls

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    twin = copy.deepcopy(model)
    other = torch.nn.Linear(3, 3)
    with counting_class_calls(torch.nn.Sequential) as counter:
        model(torch.zeros(2, 3))
        twin(torch.zeros(5, 3))
        other(torch.zeros(7, 3))  # another class: not counted
    model(torch.zeros(1, 3))  # after the block: not counted
    assert (counter.calls, counter.samples) == (2, 7)
