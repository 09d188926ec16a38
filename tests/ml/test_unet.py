import pytest
import torch

from app.ml.unet import UNet, UNetConfig, count_parameters


def test_paper_unet_maps_572_to_388_with_31_03_million_parameters():
    config = UNetConfig.paper()
    model = UNet(config).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 572, 572))
    assert out.shape == (1, 2, 388, 388)
    assert config.output_size(572) == 388
    assert count_parameters(model) == 31_030_658  # the paper's 31.03 M


def test_paper_unet_has_23_convolutional_layers():
    model = UNet(UNetConfig.paper())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert len(convs) == 23
    assert all(m.padding == (0, 0) for m in convs)
    assert [m.out_channels for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)] == [512, 256, 128, 64]


def test_padded_unet_keeps_the_input_size_and_trains():
    config = UNetConfig(in_channels=1, num_classes=3, base_width=4, depth=3)
    model = UNet(config)
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    assert out.shape == (2, 3, 64, 64)
    out.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "config",
    [
        UNetConfig(in_channels=3, num_classes=2, base_width=8, depth=2),
        UNetConfig(in_channels=1, num_classes=4, base_width=4, depth=3, batch_norm=False),
        UNetConfig(in_channels=1, num_classes=3, base_width=4, depth=2, padded=False),
    ],
)
def test_config_is_plain_data_that_rebuilds_the_same_network(config):
    model = UNet(config).eval()
    rebuilt = UNet(UNetConfig.from_dict(config.to_dict())).eval()
    rebuilt.load_state_dict(model.state_dict())
    size = 64 if config.padded else 92
    x = torch.randn(1, config.in_channels, size, size)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(rebuilt(x), expected)
    assert expected.shape[1] == config.num_classes
    assert expected.shape[-1] == config.output_size(size)


def test_invalid_sizes_are_refused_with_a_hint():
    with pytest.raises(ValueError, match="try 572"):
        UNetConfig.paper().output_size(570)
    with pytest.raises(ValueError, match="multiples of 16"):
        UNetConfig().output_size(572)
    with pytest.raises(ValueError, match="'architecture' has unknown keys"):
        UNetConfig.from_dict({"widht": 3})
