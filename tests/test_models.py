"""The CIFAR zoo: published sizes, timm registration/protocol, stage split, small inputs, weight files."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import mutualkd.models  # noqa: F401  (registers the zoo)

REPO = Path(__file__).resolve().parents[1]

# name: (published size in M with 100 classes (CRD / RepDistiller), exact count of RepDistiller's definition)
PARAMS = {
    "cifar_resnet8": (0.08, 83_892),
    "cifar_resnet14": (0.17, 181_108),
    "cifar_resnet20": (0.28, 278_324),
    "cifar_resnet32": (0.47, 472_756),
    "cifar_resnet44": (0.67, 667_188),
    "cifar_resnet56": (0.86, 861_620),
    "cifar_resnet110": (1.73, 1_736_564),
    "cifar_resnet8x4": (1.23, 1_233_540),
    "cifar_resnet32x4": (7.43, 7_433_860),
    "wrn_16_1": (0.18, 180_916),
    "wrn_16_2": (0.70, 703_284),
    "wrn_40_1": (0.57, 569_780),
    "wrn_40_2": (2.26, 2_255_156),
    "cifar_vgg8": (3.96, 3_965_028),
    "cifar_vgg11": (9.28, 9_277_284),  # no published figure; computed by hand from configuration A
    "cifar_vgg13": (9.46, 9_462_180),
    "mobilenetv2": (0.81, 812_836),
    "shufflenet_v1": (0.95, 949_258),
    "shufflenet_v2": (1.36, 1_355_528),
}
# Published figures that RepDistiller's own definitions miss by more than 0.005M (rounding/sourcing in the tables).
KNOWN_GAPS = {
    "cifar_resnet14": "definition gives 0.181M (0.178M even with parameter-free shortcuts)",
    "cifar_resnet110": "definition gives 1.737M (1.734M with parameter-free shortcuts)",
    "cifar_vgg8": "definition gives 3.965M (its convs keep their bias; 3.964M without)",
}
NAMES = list(PARAMS)


@pytest.fixture(scope="module")
def models():
    """One model per name in eval mode: CIFAR-100 defaults and a 1-channel 10-class variant."""
    torch.manual_seed(0)
    return {
        name: (
            timm.create_model(name, num_classes=100).eval(),
            timm.create_model(name, num_classes=10, in_chans=1).eval(),
        )
        for name in NAMES
    }


def test_registered():
    assert set(NAMES) <= set(timm.list_models())


@pytest.mark.parametrize("name", NAMES)
def test_param_count(models, name):
    published, exact = PARAMS[name]
    count = sum(p.numel() for p in models[name][0].parameters())
    assert count == exact
    if name not in KNOWN_GAPS:
        assert abs(count / 1e6 - published) <= 0.005


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg(models, name):
    model = models[name][0]
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 100 and cfg["input_size"] == (3, 32, 32) and cfg["url"] == ""
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_protocol(models, name):
    model = models[name][0]
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 100)

    # The stage split reproduces forward() exactly.
    split = model.forward_head(model.norm_pre(model.stages(model.stem(x))))
    assert torch.allclose(split, logits)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)

    # forward_intermediates: stem + one point per stage, matching feature_info.
    final, feats = model.forward_intermediates(x)
    assert len(feats) == len(model.feature_info) == len(model.stages) + 1
    for feat, info in zip(feats, model.feature_info):
        assert feat.shape == (2, info["num_chs"], 32 // info["reduction"], 32 // info["reduction"])
    assert torch.allclose(final, model.forward_features(x))
    last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [f.shape for f in last_two] == [f.shape for f in feats[-2:]]
    _, early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert torch.equal(early[0], feats[1])


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_small_gray_inputs(models, name):
    model = models[name][1]
    for size in (8, 28):
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)


@pytest.mark.parametrize("name", ["cifar_resnet8", "wrn_16_1", "cifar_vgg8", "mobilenetv2", "shufflenet_v2"])
@torch.no_grad()
def test_features_only_and_pruning(name):
    x = torch.randn(2, 3, 32, 32)
    backbone = timm.create_model(name, features_only=True).eval()
    assert [f.shape[1] for f in backbone(x)] == backbone.feature_info.channels()

    model = timm.create_model(name).eval()
    kept = model.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(model.stages) == 1
    info = model.feature_info[1]
    assert model.num_features == info["num_chs"]
    side = 32 // info["reduction"]
    assert model(x).shape == (2, info["num_chs"], side, side)  # norm and head (pool too) pruned, as in timm


_ROUND_TRIP = """
import sys
import timm, torch, mutualkd.models
foreign = [m for m in sys.modules if m.startswith('mutualkd.') and not m.startswith('mutualkd.models')]
assert not foreign, foreign
tmp = sys.argv[1]
for name in sys.argv[2:]:
    io = timm.models.load_state_dict(f'{tmp}/{name}.io.safetensors')
    kwargs = dict(pretrained=True, num_classes=10, in_chans=1)
    file = f'{tmp}/{name}.safetensors'
    own = dict(file=file, num_classes=10, input_size=(1, 32, 32))
    with torch.no_grad():
        # Overlay declaring the checkpoint's own head/input: every weight loads, outputs are identical.
        m = timm.create_model(name, pretrained_cfg_overlay=own, **kwargs)
        assert torch.equal(m.eval()(io['x']), io['y']), name
        # File-only overlay: timm treats it as a 100-class source and re-initialises the head; backbone identical.
        m = timm.create_model(name, pretrained_cfg_overlay=dict(file=file), **kwargs)
        assert torch.equal(m.eval().forward_features(io['x']), io['features']), name
print('ok', len(sys.argv) - 2)
"""


def test_safetensors_round_trip(models, tmp_path):
    for name in NAMES:
        model = models[name][1]
        x = torch.randn(2, 1, 32, 32)
        with torch.no_grad():
            io = dict(x=x, y=model(x), features=model.forward_features(x))
        save_file(model.state_dict(), tmp_path / f"{name}.safetensors")
        save_file(io, tmp_path / f"{name}.io.safetensors")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-c", _ROUND_TRIP, str(tmp_path), *NAMES],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == f"ok {len(NAMES)}"
