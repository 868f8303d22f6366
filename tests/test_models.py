import json
import shutil

import pytest
import torch

from dori.errors import DoriError
from dori.models import load_pipeline, resolve_model, select_modules


def test_loads_saved_sd1_and_sd2_layouts(tiny_pipeline_folder):
    pipe = load_pipeline(tiny_pipeline_folder)
    saved = json.loads((tiny_pipeline_folder / "scheduler" / "scheduler_config.json").read_text())
    assert pipe.scheduler.config.prediction_type == saved["prediction_type"]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    images = pipe("a red circle", num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_value_layers_found_by_name_in_every_layout(tiny_pipeline_folder):
    pipe = load_pipeline(tiny_pipeline_folder)
    found = select_modules(pipe.unet, "*attn2.to_v")
    assert found and all(isinstance(m, torch.nn.Linear) for m in found.values())
    assert all(m.in_features == pipe.unet.config.cross_attention_dim for m in found.values())
    by_list = select_modules(pipe.unet, list(found))
    assert list(by_list) == list(found)
    by_pred = select_modules(pipe.unet, lambda name, m: name.endswith("attn2.to_v"))
    assert list(by_pred) == list(found)
    with pytest.raises(DoriError, match="no module named"):
        select_modules(pipe.unet, ["down_blocks.99.nothing"])


def test_folder_that_is_not_a_pipeline_names_what_is_missing(tmp_path, sd1_folder):
    broken = tmp_path / "broken"
    shutil.copytree(sd1_folder, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(DoriError, match="missing unet/config.json"):
        load_pipeline(broken)
    with pytest.raises(DoriError, match="missing model_index.json"):
        load_pipeline(tmp_path / "broken" / "vae")


def test_nonexistent_path_and_hub_ids(tmp_path):
    with pytest.raises(DoriError, match="does not exist"):
        resolve_model(tmp_path / "nowhere")
    assert resolve_model("CompVis/stable-diffusion-v1-4") == ("hub", "CompVis/stable-diffusion-v1-4")
    with pytest.raises(DoriError, match="hub"):
        load_pipeline("nobody-here/no-such-model")


@pytest.mark.parametrize("flags, native", [("fpu avx2 fma", False), ("avx2 avx512f avx512_bf16", True),
                                           ("avx2 amx_tile amx_bf16", True)])
def test_half_precision_on_a_cpu_without_its_instructions_is_warned_about(monkeypatch, caplog, sd1_folder, flags,
                                                                          native):
    import dori.models as models

    real_read = models.Path.read_text
    monkeypatch.setattr(models.Path, "read_text", lambda self, *a, **k: f"flags\t\t: {flags}\n"
                        if str(self) == "/proc/cpuinfo" else real_read(self, *a, **k))
    assert models.cpu_runs_natively("bfloat16") is native
    assert models.cpu_runs_natively("float16") is False and models.cpu_runs_natively("float32") is True
    with caplog.at_level("WARNING", logger="dori.models"):
        pipe = load_pipeline(sd1_folder, dtype="bfloat16")
    assert pipe.unet.dtype == torch.bfloat16
    warned = [r.getMessage() for r in caplog.records if "emulates" in r.getMessage()]
    assert bool(warned) is not native
    if warned:
        assert "bfloat16" in warned[0] and "avx512_bf16" in warned[0] and "float32" in warned[0]
