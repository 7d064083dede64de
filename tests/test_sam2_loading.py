"""SAM 2 models by name and from Meta's checkpoint files: the registry, the official
downloads, reading ``sam2*_hiera_*.pt``, ``segany weights convert`` and loading back.

The checkpoint files here are written from Meta's own model (``sam2`` 1.1.0, random
weights) in Meta's format (``{"model": state_dict}``), so every name is Meta's.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from sam2_reference import meta_sam2

from segany import weights
from segany.build import (
    MODEL_NAMES,
    SAM2_MODEL_CONFIGS,
    build_sam,
    build_sam2,
    sam2_model_name,
)
from segany.cli import main
from segany.errors import SeganyError
from segany.loading import load_model, load_model_and_config
from segany.modeling.sam2 import Sam2
from segany.sam2_predictor import Sam2ImagePredictor


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sam2.1_t", "sam2.1_t"),
        ("sam2.1_hiera_t", "sam2.1_t"),  # Meta's config name
        ("configs/sam2.1/sam2.1_hiera_b+.yaml", "sam2.1_b+"),  # ... as build_sam2 takes it
        ("sam2_hiera_large.pt", "sam2_l"),  # Meta's checkpoint file
        ("sam2.1_hiera_small", "sam2.1_s"),
        ("facebook/sam2.1-hiera-base-plus", "sam2.1_b+"),  # Hugging Face
        ("facebook/sam2-hiera-tiny", "sam2_t"),
        ("SAM2.1_L", "sam2.1_l"),
        ("vit_b", None),
        ("sam2.1_hiera_b", None),
        ("sam3_t", None),
    ],
)
def test_sam2_names(given: str, expected: str | None) -> None:
    assert sam2_model_name(given) == expected


def test_registry_holds_the_eight_official_models() -> None:
    assert set(SAM2_MODEL_CONFIGS) == {
        f"{version}_{size}" for version in ("sam2", "sam2.1") for size in ("t", "s", "b+", "l")
    }
    assert set(SAM2_MODEL_CONFIGS) <= set(MODEL_NAMES)


def _meta_name_of(segany_key: str) -> str:
    """segany's parameter name -> Meta's (only the decoder transformer's MLPs differ:
    Meta's MLP class names its layers ``layers.0/1``, segany keeps SAM's ``lin1/lin2``)."""
    key = re.sub(
        r"(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)lin1\.", r"\1layers.0.", segany_key
    )
    return re.sub(r"(sam_mask_decoder\.transformer\.layers\.\d+\.mlp\.)lin2\.", r"\1layers.1.", key)


@pytest.fixture(scope="module")
def meta_state() -> dict[str, torch.Tensor]:
    return meta_sam2().state_dict()


@pytest.fixture(scope="module")
def official_file(tmp_path_factory: pytest.TempPathFactory, meta_state) -> Path:
    """A SAM 2.1 Hiera-Tiny checkpoint as Meta ships it."""
    path = tmp_path_factory.mktemp("meta") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": meta_state}, path)
    return path


def assert_weights_are(model: Sam2, meta_state: dict[str, torch.Tensor], atol: float = 0) -> None:
    ours = model.state_dict()
    assert {_meta_name_of(key) for key in ours} == set(meta_state)
    for key, value in ours.items():
        torch.testing.assert_close(value, meta_state[_meta_name_of(key)], atol=atol, rtol=0)


def test_meta_checkpoint_loads_without_a_name(official_file: Path, meta_state) -> None:
    model, config = load_model_and_config(None, official_file, "cpu")
    assert isinstance(model, Sam2)
    assert config == SAM2_MODEL_CONFIGS["sam2.1_t"]  # recognised from its tensors
    assert_weights_are(model, meta_state)


@pytest.mark.parametrize("name", ["sam2.1_t", "sam2.1_hiera_t", "facebook/sam2.1-hiera-tiny"])
def test_meta_checkpoint_loads_by_any_name(official_file: Path, meta_state, name: str) -> None:
    assert_weights_are(load_model(name, official_file, "cpu"), meta_state)
    assert_weights_are(build_sam2(name, official_file), meta_state)


def test_checkpoint_of_another_model_is_named(official_file: Path) -> None:
    # SAM 2.0 lacks two of 2.1's tensors: the error names them and the right model.
    with pytest.raises(SeganyError, match=r"unexpected keys.*use --model sam2\.1_t"):
        load_model("sam2_t", official_file, "cpu")
    with pytest.raises(SeganyError, match="does not fit model 'vit_b'"):
        load_model("vit_b", official_file, "cpu")


def test_official_weights_are_downloaded_by_name(
    official_file: Path, meta_state, monkeypatch
) -> None:
    asked = []

    def download(name: str, **_: object) -> Path:
        asked.append(name)
        return official_file

    monkeypatch.setattr(weights, "download", download)
    assert_weights_are(load_model("sam2.1_hiera_t", device="cpu"), meta_state)
    predictor = Sam2ImagePredictor.from_pretrained("facebook/sam2.1-hiera-tiny", precision="fp32")
    assert_weights_are(predictor.model, meta_state)
    assert asked == ["sam2.1_hiera_tiny", "sam2.1_hiera_tiny"]
    with pytest.raises(SeganyError, match="not a SAM 2 model"):
        Sam2ImagePredictor.from_pretrained("facebook/sam-vit-base")


def test_convert_to_segany_safetensors_and_back(official_file: Path, meta_state, tmp_path) -> None:
    output = tmp_path / "tiny.safetensors"
    assert (
        main(["weights", "convert", str(official_file), "-o", str(output), "--dtype", "fp16"]) == 0
    )
    with safe_open(str(output), framework="pt") as f:
        assert '"sam2_model": "sam2.1_t"' in f.metadata()["segany_config"]
    model = load_model(None, output, "cpu")  # the architecture is read from the file
    assert isinstance(model, Sam2)
    half = {key: value.half().float() for key, value in meta_state.items()}
    assert_weights_are(model, half)


def test_sam_and_sam2_builders_refuse_each_other() -> None:
    with pytest.raises(SeganyError, match="is a SAM 2 model; build it with build_sam2"):
        build_sam("sam2.1_t")
    with pytest.raises(SeganyError, match=r"unknown model 'vit_b'.*sam2\.1_t"):
        build_sam2("vit_b")
    with pytest.raises(SeganyError, match=r"unknown model 'sam2\.2_t'; choose one of: vit_h"):
        load_model("sam2.2_t")


def test_weights_commands_take_model_names(capsys) -> None:
    assert main(["weights", "path", "sam2.1_b+"]) in (0, 1)  # 1: not downloaded
    assert capsys.readouterr().out.strip().endswith("sam2.1_hiera_base_plus.pt")
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out
    assert re.search(r"sam2_hiera_large\s+sam2_l\s+898 MB", listing)
