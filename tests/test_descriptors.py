import numpy as np
import pytest
import torch

from dori.descriptors import SSCDDescriptor, TestbedDescriptor, make_descriptor, preprocess_sscd, roc_auc, similarity
from dori.errors import DoriError
from tests.helpers import write_sscd


@pytest.fixture
def sscd_file(tmp_path):
    return write_sscd(tmp_path / "sscd_disc_mixup.torchscript.pt")


def test_preprocessing_conventions():
    images = torch.rand(2, 3, 40, 60)
    nemo = preprocess_sscd(images, "nemo")
    assert nemo.shape == (2, 3, 320, 320)
    dcr = preprocess_sscd(images, "dcr")
    assert dcr.shape == (2, 3, 224, 224)
    grey = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(preprocess_sscd(grey, "dcr"), torch.zeros(1, 3, 224, 224), atol=1e-5)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(preprocess_sscd(grey, "nemo")[0, :, 5, 5], expected, atol=1e-5)
    with pytest.raises(DoriError, match="sscd_preprocess"):
        preprocess_sscd(images, "other")


def test_sscd_torchscript_file(sscd_file):
    for convention in ("nemo", "dcr"):
        descriptor = SSCDDescriptor(sscd_file, preprocess=convention)
        feats = descriptor.embed(torch.rand(3, 3, 32, 32))
        assert feats.shape == (3, 16)
        assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
        assert descriptor.describe()["preprocess"] == convention and descriptor.threshold == 0.7
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert similarity(descriptor, image, image).item() == pytest.approx(1.0, abs=1e-5)


def test_sscd_bad_files(tmp_path):
    with pytest.raises(DoriError, match="does not exist"):
        SSCDDescriptor(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not torchscript")
    with pytest.raises(DoriError, match="not a TorchScript file"):
        SSCDDescriptor(junk)
    with pytest.raises(DoriError, match="threshold"):
        make_descriptor("testbed", threshold=1.5)


def test_testbed_descriptor_invariants():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    d = TestbedDescriptor()
    assert similarity(d, a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert abs(similarity(d, a, b).item()) < 0.3
    big = np.kron(a, np.ones((2, 2, 1), np.uint8))
    assert similarity(d, big, a).item() > 0.95
    brighter = np.clip(a.astype(int) + 20, 0, 255).astype(np.uint8)
    assert similarity(d, brighter, a).item() > 0.9


def test_roc_auc():
    assert roc_auc(np.array([0.9, 0.8]), np.array([0.1, 0.2])) == 1.0
    assert roc_auc(np.array([0.1]), np.array([0.9])) == 0.0
    assert roc_auc(np.array([0.5]), np.array([0.5])) == 0.5
