"""U^2-Net (engine/models/u2net.py) and rembg's pre- and post-processing (engine/background.py).

References: the published parameter counts (Qin et al. 2020, Table 3: U^2-Net 44.0M, U^2-Net-small 1.13M); an
independent recursive re-statement of the network over the state dict (the nested U-structure of Fig. 2/5 written
as recursion, from F.conv2d and F.batch_norm, against our module's loops); rembg's `normalize` and `predict` steps
re-computed in numpy and Pillow as rembg writes them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from engine import background
from engine.checkpoints import CheckpointError
from engine.context import NodeContext
from engine.errors import NotFound
from engine.folders import Folders
from engine.models.u2net import (VARIANTS, RSUSpec, U2Net, U2NetConfig, U2NetWeightsError, detect_u2net_config,
                                 load_u2net)
from engine.residency import ModelCache
from nodes.image import ImageEstimateForegroundMask

# a three-stage network with every kind of block, for fast exact comparisons
TINY = U2NetConfig(encoder=(RSUSpec(5, 3, 4, 8), RSUSpec(4, 8, 4, 8), RSUSpec(4, 8, 4, 8, True)),
                   decoder=(RSUSpec(4, 16, 4, 8), RSUSpec(5, 16, 4, 8)))


def random_weights(config: U2NetConfig, seed: int = 0, scale: float = 0.7) -> dict[str, torch.Tensor]:
    """Random weights in the real layout, generated from the module's own shapes (He-scaled convs, BatchNorm
    statistics near identity), scaled so that the sigmoid maps stay away from 0 and 1 where errors would hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in U2Net(config).state_dict().items()}
    weights = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            weights[key] = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith("conv_s1.weight") or key.startswith(("side", "outconv")) and key.endswith("weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            weights[key] = torch.randn(shape, generator=generator) * scale * (2.0 / fan_in) ** 0.5
        elif key.endswith("bn_s1.weight"):
            weights[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:  # biases and running means
            weights[key] = 0.1 * torch.randn(shape, generator=generator)
    return weights


# ---------------------------------------------------------------------------------------------------- reference


def ref_rebnconv(sd, prefix: str, x, dilation: int):
    x = F.conv2d(x, sd[prefix + "conv_s1.weight"], sd[prefix + "conv_s1.bias"], padding=dilation, dilation=dilation)
    x = F.batch_norm(x, sd[prefix + "bn_s1.running_mean"], sd[prefix + "bn_s1.running_var"],
                     sd[prefix + "bn_s1.weight"], sd[prefix + "bn_s1.bias"], training=False, eps=1e-5)
    return F.relu(x)


def up_to(x, like):
    return F.interpolate(x, size=like.shape[2:], mode="bilinear", align_corners=False)


def ref_rsu(sd, prefix: str, x, height: int, dilated: bool):
    """RSU-L as a recursion: level i convolves, descends (pooled, or dilated for RSU-4F) and joins what comes back."""
    conv = lambda name, t, d: ref_rebnconv(sd, f"{prefix}rebnconv{name}.", t, d)  # noqa: E731
    F4 = {1: 1, 2: 2, 3: 4, 4: 8}  # RSU-4F's dilations by level (Fig. 2 of the paper)

    def level(i, t):
        h = conv(i, t, F4[i] if dilated else 1)
        if i == height - 1:
            inner = conv(height, h, F4[height] if dilated else 2)
        else:
            inner = level(i + 1, h if dilated else F.max_pool2d(h, 2, 2, ceil_mode=True))
            inner = inner if dilated else up_to(inner, h)
        return conv(f"{i}d", torch.cat((inner, h), 1), F4[i] if dilated else 1)

    hxin = conv("in", x, 1)
    return level(1, hxin) + hxin


def ref_u2net(sd, config: U2NetConfig, x):
    stages = len(config.encoder)
    rsu = lambda name, spec, t: ref_rsu(sd, f"stage{name}.", t, spec.height, spec.dilated)  # noqa: E731
    decoded = {}

    def level(i, t):
        h = rsu(i, config.encoder[i - 1], t)
        if i == stages:
            decoded[i] = h
            return h
        inner = level(i + 1, F.max_pool2d(h, 2, 2, ceil_mode=True))
        d = rsu(f"{i}d", config.decoder[stages - 1 - i], torch.cat((up_to(inner, h), h), 1))
        decoded[i] = d
        return d

    level(1, x)
    sides = [F.conv2d(decoded[i], sd[f"side{i}.weight"], sd[f"side{i}.bias"], padding=1) for i in range(1, stages + 1)]
    sides = [sides[0]] + [up_to(s, sides[0]) for s in sides[1:]]
    fused = F.conv2d(torch.cat(sides, 1), sd["outconv.weight"], sd["outconv.bias"])
    return [torch.sigmoid(t) for t in [fused] + sides]


# ---------------------------------------------------------------------------------------------------- network


@pytest.mark.parametrize("name, published, exact", [("u2net", 44.0e6, 44_009_869), ("u2netp", 1.13e6, 1_131_181)])
def test_parameter_counts_match_the_published_models(name, published, exact):
    with torch.device("meta"):
        net = U2Net(VARIANTS[name]())
    count = sum(p.numel() for p in net.parameters())
    assert count == exact
    assert abs(count - published) / published < 0.005  # the paper's rounded 44.0M and 1.13M


def test_state_dict_names_are_the_original_layout():
    with torch.device("meta"):
        keys = list(U2Net(U2NetConfig.u2net()).state_dict())
    assert len(keys) == 798
    for key in ["stage1.rebnconvin.conv_s1.weight", "stage1.rebnconv7.bn_s1.running_var",
                "stage1.rebnconv6d.conv_s1.bias", "stage5.rebnconv4.conv_s1.weight",
                "stage6.rebnconv3d.bn_s1.num_batches_tracked", "stage5d.rebnconv1d.bn_s1.weight",
                "stage4d.rebnconv4.conv_s1.weight", "stage1d.rebnconv7.conv_s1.weight", "side1.weight", "side6.bias",
                "outconv.weight"]:
        assert key in keys, key
    assert "stage5.rebnconv5.conv_s1.weight" not in keys  # RSU-4F has four encoder convs
    assert all(k.split(".")[0] in {f"stage{i}" for i in range(1, 7)} | {f"stage{i}d" for i in range(1, 6)}
               | {f"side{i}" for i in range(1, 7)} | {"outconv"} for k in keys)


@pytest.mark.parametrize("config, size", [(TINY, (37, 50)), (TINY, (64, 64)), (U2NetConfig.u2netp(), (45, 70))])
def test_forward_matches_the_recursive_reference(config, size):
    sd = random_weights(config)
    net = load_u2net(sd, config)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = net(x)
        reference = ref_u2net(sd, config, x)
    assert len(ours) == 7 if config is not TINY else len(ours) == 4
    errors = [(a - b).abs().max().item() for a, b in zip(ours, reference)]
    assert all(a.shape == (2, 1, *size) for a in ours)
    assert max(errors) < 1e-5, errors  # observed 0 (same ops in the same order)


def test_full_u2net_with_random_weights_gives_a_mask_of_the_input_size_in_0_1():
    net = load_u2net(random_weights(U2NetConfig.u2net()))
    image = torch.rand(1, 96, 128, 3, generator=torch.Generator().manual_seed(2))
    mask = background.estimate_foreground(net, image)
    assert mask.shape == (1, 96, 128) and mask.dtype == torch.float32
    assert 0.0 <= mask.min() and mask.max() <= 1.0
    assert torch.equal(mask, torch.round(mask * 255) / 255)  # 8-bit levels, as rembg's mask
    assert mask.max() > mask.min()


def test_modules_are_built_without_initialisation_and_load_in_eval_mode():
    with torch.device("meta"):
        net = U2Net(TINY)
    assert all(p.is_meta for p in net.parameters())
    loaded = load_u2net(random_weights(TINY), TINY, dtype=torch.float64)
    assert not loaded.training and all(not m.training for m in loaded.modules())
    assert loaded.dtype == torch.float64 and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.stage1.rebnconvin.bn_s1.num_batches_tracked.dtype == torch.long


def test_loader_detects_the_size_strips_module_prefix_and_tolerates_missing_counters():
    sd = random_weights(U2NetConfig.u2netp())
    assert detect_u2net_config(sd) == U2NetConfig.u2netp()
    assert detect_u2net_config(random_weights(U2NetConfig.u2net())) == U2NetConfig.u2net()
    wrapped = {"module." + k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    net = load_u2net(wrapped)
    assert torch.equal(net.side3.weight, sd["side3.weight"])


def test_loader_names_a_missing_or_misshapen_key():
    sd = random_weights(TINY)
    missing = {k: v for k, v in sd.items() if k != "stage2d.rebnconv3d.bn_s1.running_mean"}
    with pytest.raises(U2NetWeightsError, match="stage2d.rebnconv3d.bn_s1.running_mean") as info:
        load_u2net(missing, TINY)
    assert info.value.key == "stage2d.rebnconv3d.bn_s1.running_mean"
    wrong = dict(sd, **{"side2.weight": torch.zeros(1, 8, 1, 1)})
    with pytest.raises(U2NetWeightsError, match=r"side2.weight.*\(1, 8, 1, 1\).*\(1, 8, 3, 3\)"):
        load_u2net(wrong, TINY)
    with pytest.raises(U2NetWeightsError, match="not a U\\^2-Net"):
        load_u2net({"weight": torch.zeros(1)})


@pytest.mark.parametrize("kind", ["zip .pth", "legacy .pth", ".safetensors"])
def test_load_from_a_file(tmp_path, kind):
    sd = random_weights(U2NetConfig.u2netp())
    path = tmp_path / ("u2netp.safetensors" if kind == ".safetensors" else "u2netp.pth")
    if kind == ".safetensors":
        save_file(sd, str(path))
    else:  # the published files are PyTorch 0.4 pickles: legacy format, no BatchNorm counters
        legacy = kind.startswith("legacy")
        torch.save({k: v for k, v in sd.items() if not (legacy and k.endswith("num_batches_tracked"))}, path,
                   _use_new_zipfile_serialization=not legacy)
    net = background.load_u2net_file(path, "u2netp", "cpu")
    assert net.dtype == torch.float32 and torch.equal(net.outconv.weight, sd["outconv.weight"])


def test_a_damaged_file_is_a_typed_error(tmp_path):
    path = tmp_path / "u2net.pth"
    path.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="u2net.pth could not be read"):
        background.load_u2net_file(path, "u2net", "cpu")


# ---------------------------------------------------------------------------------------------------- rembg steps


def rembg_normalize(pixels: np.ndarray) -> np.ndarray:
    """rembg's BaseSession.normalize for u2net, step by step."""
    im = Image.fromarray(pixels).convert("RGB").resize((320, 320), Image.Resampling.LANCZOS)
    im_ary = np.array(im)
    im_ary = im_ary / max(np.max(im_ary), 1e-6)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tmp = np.zeros((im_ary.shape[0], im_ary.shape[1], 3))
    for c in range(3):
        tmp[:, :, c] = (im_ary[:, :, c] - mean[c]) / std[c]
    return np.expand_dims(tmp.transpose((2, 0, 1)), 0).astype(np.float32)


def rembg_mask(pred: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """rembg's U2netSession.predict after the network, then the ComfyUI node's `/ 255`."""
    pred = pred[:, 0, :, :]
    ma, mi = np.max(pred), np.min(pred)
    pred = np.squeeze((pred - mi) / (ma - mi))
    mask = Image.fromarray((pred * 255).astype("uint8"), mode="L").resize(size, Image.LANCZOS)
    return np.asarray(mask).astype(np.float32) / 255.0


def images(batch=2, height=50, width=77, seed=3) -> torch.Tensor:
    return torch.rand(batch, height, width, 3, generator=torch.Generator().manual_seed(seed))


def test_to_uint8_is_comfyuis_conversion_and_drops_alpha():
    image = torch.tensor([[[[0.0, 0.5, 1.0, 0.3], [-0.2, 1.4, 0.999, 1.0]]]])
    assert background.to_uint8(image).tolist() == [[[[0, 127, 255], [0, 255, 254]]]]


def test_preprocess_is_rembgs_normalize_image_by_image():
    pixels = background.to_uint8(images())
    pixels[1] //= 3  # a darker image: its own maximum scales it
    ours = background.preprocess(pixels)
    assert ours.shape == (2, 3, 320, 320) and ours.dtype == torch.float32
    for index in range(2):
        assert np.array_equal(ours[index:index + 1].numpy(), rembg_normalize(pixels[index]))


def test_preprocess_of_a_black_image_divides_by_1e_6():
    ours = background.preprocess(np.zeros((1, 8, 8, 3), np.uint8))
    assert np.array_equal(ours.numpy(), rembg_normalize(np.zeros((8, 8, 3), np.uint8)))


def test_postprocess_is_rembgs_predict_per_image():
    generator = torch.Generator().manual_seed(4)
    fused = torch.sigmoid(4 * torch.randn(3, 1, 320, 320, generator=generator))
    fused[2] = fused[2] * 0.25 + 0.5  # a narrower range: min-max is per image
    ours = background.postprocess(fused, 50, 77)
    assert ours.shape == (3, 50, 77)
    for index in range(3):
        assert np.array_equal(ours[index].numpy(), rembg_mask(fused[index:index + 1].numpy(), (77, 50)))


def test_postprocess_of_a_constant_map_is_empty():
    assert torch.equal(background.postprocess(torch.full((1, 1, 320, 320), 0.7), 5, 6), torch.zeros(1, 5, 6))


def test_estimate_foreground_runs_the_batch_at_once_like_single_images():
    net = load_u2net(random_weights(TINY), TINY)
    batch = images(batch=3, height=40, width=64)
    together = background.estimate_foreground(net, batch)
    alone = torch.cat([background.estimate_foreground(net, batch[i:i + 1]) for i in range(3)])
    # convolutions of a batch may round differently from one image's; at most one 8-bit level apart
    assert (together - alone).abs().max() <= 1 / 255 + 1e-7


# ---------------------------------------------------------------------------------------------------- the node


class StubModels:
    """The model-files interface (check / find) over one folder, without a hub: a name finds `name` or
    `name.pth`, as the real model files resolve a name without an extension."""

    def __init__(self, folder: Path):
        self.root = folder
        self.found: list[str] = []

    def _path(self, folder: str, name: str) -> Path | None:
        for candidate in (self.root / folder / name, self.root / folder / f"{name}.pth"):
            if candidate.is_file():
                return candidate
        return None

    def check(self, folder: str, name: str) -> None:
        if self._path(folder, name) is None:
            raise NotFound(f"no {folder} model named {name!r}")

    def find(self, folder: str, name: str, progress=None) -> Path:
        self.check(folder, name)
        self.found.append(name)
        return self._path(folder, name)


@pytest.fixture
def node_context(tmp_path) -> NodeContext:
    (tmp_path / "models" / "background_removal").mkdir(parents=True)
    torch.save(random_weights(U2NetConfig.u2netp()), tmp_path / "models" / "background_removal" / "u2netp.pth")
    return NodeContext(Folders(tmp_path / "in", tmp_path / "out", tmp_path / "tmp"),
                       models=StubModels(tmp_path / "models"))  # no model cache: every load private


def test_node_schema():
    spec = ImageEstimateForegroundMask.INPUT_TYPES()
    assert spec["required"]["model"][0][:2] == ["u2net", "u2netp"]
    assert spec["required"]["model"][1] == {"default": "u2net"}
    assert ImageEstimateForegroundMask.RETURN_TYPES == ("MASK",)


def test_node_validates_the_model_file(node_context):
    assert ImageEstimateForegroundMask.VALIDATE_INPUTS(node_context, model="u2netp") is True
    assert "'u2net'" in ImageEstimateForegroundMask.VALIDATE_INPUTS(node_context, model="u2net")
    assert "one of" in ImageEstimateForegroundMask.VALIDATE_INPUTS(node_context, model="isnet")


def test_node_returns_a_mask_per_image_and_keeps_the_network_in_the_model_cache(node_context):
    events = []
    node_context.resident = ModelCache(1 << 40, torch.device("cpu"), lambda event, data: events.append(event))
    image = images(batch=2, height=33, width=48)
    (first,) = ImageEstimateForegroundMask().estimate_background(image, "u2netp", node_context)
    (second,) = ImageEstimateForegroundMask().estimate_background(image, "u2netp", node_context)
    assert node_context.models.found == ["u2netp", "u2netp"]  # looked up by the model's name
    assert events == ["model_load"] and torch.equal(first, second)  # loaded once, used twice
    assert node_context.resident.entries()[0]["name"] == "u2netp.pth"
    assert first.shape == (2, 33, 48) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, torch.round(first * 255) / 255)


def test_node_without_a_model_cache_loads_for_the_call(node_context):
    (mask,) = ImageEstimateForegroundMask().estimate_background(images(1, 8, 8), "u2netp", node_context)
    assert mask.shape == (1, 8, 8)
