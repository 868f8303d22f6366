import copy

import pytest
import torch

from dori.errors import DoriError
from dori.weight_groups import WEIGHT_GROUPS, group_change, group_of, parameters_in, revert_groups


@pytest.fixture(params=["sd1", "sd2"])
def unet(request, clip_tokenizer):
    from tests.conftest import tiny_components

    return tiny_components(request.param, clip_tokenizer)["unet"].eval()


def _predict(unet, states):
    size = unet.config.sample_size
    sample = torch.randn(2, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet(sample, torch.tensor(400), encoder_hidden_states=states).sample


def _states(unet, seed=1):
    return torch.randn(2, 5, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(seed))


def test_every_parameter_falls_in_one_group_and_every_group_is_present(unet):
    names = [n for n, _ in unet.named_parameters()]
    counts = {g: len(parameters_in(unet, [g])) for g in WEIGHT_GROUPS}
    assert all(counts.values()) and sum(counts.values()) == len(names)
    assert all(n.split(".attn2.")[1].startswith(("to_k.", "to_v.")) for n in parameters_in(unet, ["cross_kv"]))
    assert group_of("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.default.weight") == "cross_kv"
    assert group_of("mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.bias") == "cross_qo"
    assert group_of("up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight") == "ff"
    assert group_of("time_embedding.linear_1.weight") == "rest"


def test_the_text_conditioning_enters_the_unet_only_through_the_cross_attention_keys_and_values(unet):
    """The layers that take the text encoder's output as their input are exactly the ``cross_kv`` group's."""
    states = _states(unet)
    readers = set()

    def record(name):
        def hook(_module, args):
            if any(a is states for a in args):
                readers.add(name)
        return hook

    leaves = {n: m for n, m in unet.named_modules() if not list(m.children())}
    handles = [m.register_forward_pre_hook(record(n)) for n, m in leaves.items()]
    try:
        _predict(unet, states)
    finally:
        for h in handles:
            h.remove()
    kv_layers = {n.rsplit(".", 1)[0] for n in parameters_in(unet, ["cross_kv"])}
    assert readers and readers == kv_layers


def test_revert_groups_undoes_a_change_in_that_group_only_and_restores_it_after(unet):
    changed = copy.deepcopy(unet)
    with torch.no_grad():
        for p in parameters_in(changed, ["cross_kv", "ff"]).values():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    states = _states(unet)
    original, moved = _predict(unet, states), _predict(changed, states)
    assert not torch.allclose(original, moved, atol=1e-4)
    kept = {n: p.detach().clone() for n, p in changed.named_parameters()}
    with revert_groups(changed, unet, ["cross_kv", "ff"]):
        torch.testing.assert_close(_predict(changed, states), original)
    for group in ("cross_kv", "ff"):
        with revert_groups(changed, unet, [group]):  # half the change left: neither the original nor the changed model
            half = _predict(changed, states)
        assert not torch.allclose(half, original, atol=1e-5) and not torch.allclose(half, moved, atol=1e-5)
    with revert_groups(changed, unet, ["self_attn", "cross_qo", "rest"]):
        torch.testing.assert_close(_predict(changed, states), moved)
    assert all(torch.equal(p, kept[n]) for n, p in changed.named_parameters())

    change = group_change(changed, unet)
    assert change["cross_kv"]["relative_change"] > 0 and change["ff"]["relative_change"] > 0
    assert all(change[g]["relative_change"] == 0 for g in ("self_attn", "cross_qo", "rest"))
    assert sum(c["share"] for c in change.values()) == pytest.approx(1)


def test_revert_groups_restores_the_weights_when_the_block_raises(unet):
    changed = copy.deepcopy(unet)
    with torch.no_grad():
        changed.conv_out.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="inside"):
        with revert_groups(changed, unet, ["rest"]):
            assert torch.equal(changed.conv_out.bias, unet.conv_out.bias)
            raise RuntimeError("inside")
    assert torch.equal(changed.conv_out.bias, unet.conv_out.bias + 1.0)


def test_bad_groups_and_other_architectures_are_refused(unet, clip_tokenizer):
    with pytest.raises(DoriError, match="groups: 'attention' not a weight group; allowed: cross_kv, cross_qo"):
        parameters_in(unet, ["attention"])
    from tests.conftest import tiny_components

    layout = "sd1" if unet.config.cross_attention_dim == 48 else "sd2"
    other = tiny_components(layout, clip_tokenizer)["unet"]
    with pytest.raises(DoriError, match="original: has no parameter .* of the same shape"):
        with revert_groups(unet, other, ["cross_kv"]):
            pass


def test_a_reverted_group_trains_inside_the_block_and_cannot_be_reverted_twice(unet):
    changed = copy.deepcopy(unet)
    with revert_groups(changed, unet, ["cross_kv"]):
        prediction = changed(torch.zeros(1, 4, 8, 8), torch.tensor(10),
                                     encoder_hidden_states=_states(unet)[:1]).sample
        prediction.sum().backward()
        assert all(p.grad is not None for p in parameters_in(changed, ["cross_kv"]).values())
        with pytest.raises(DoriError, match="revert-groups/.*is already applied"):
            with revert_groups(changed, unet, ["cross_kv"]):
                pass
        with revert_groups(changed, unet, ["ff"]):  # another group: no conflict
            pass
