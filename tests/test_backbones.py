import pytest
import torch

from ddcnn import GlobalCNN, count_parameters, local_width
from ddcnn.errors import ConfigError, ShapeError
from ddcnn.models.backbones import build_backbone, min_input_size


@pytest.mark.parametrize("name", ["vgg", "resnet"])
@pytest.mark.parametrize("dims", [2, 3])
def test_backbones_map_images_to_logits_with_doubling_stage_widths(name, dims):
    net = build_backbone(name, in_channels=3, num_classes=7, width=4, depth=(1, 2, 1), dims=dims)
    size = (9, 10) if dims == 2 else (5, 6, 4)
    assert net(torch.randn(2, 3, *size)).shape == (2, 7)
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert {m.out_channels for m in convs} == {4, 8, 16}
    assert all(type(m).__name__.endswith(f"{dims}d") for m in convs)


def test_min_input_size_follows_the_number_of_downsamplings():
    assert min_input_size("vgg", (2, 2, 2)) == 4
    assert min_input_size("resnet", (1, 1, 1, 1)) == 8
    net = build_backbone("vgg", 1, 10, 4, (1, 1, 1))
    net(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ShapeError, match="4 pixels"):
        net(torch.zeros(1, 1, 3, 8))


@pytest.mark.parametrize("name", ["vgg", "resnet"])
@pytest.mark.parametrize("n", [4, 16])
def test_local_width_rule_keeps_total_parameters_near_the_global_cnn(name, n):
    width = 32
    assert local_width(width, n) == round(width / n**0.5)
    global_params = count_parameters(GlobalCNN(3, 10, name, width))
    local_params = n * count_parameters(GlobalCNN(3, 10, name, local_width(width, n)))
    assert 0.8 < local_params / global_params < 1.4


def test_bad_backbone_arguments():
    with pytest.raises(ConfigError, match="did you mean 'vgg'"):
        build_backbone("vggg")
    with pytest.raises(ConfigError, match="width"):
        build_backbone("vgg", width=0)
    with pytest.raises(ConfigError, match="depth"):
        build_backbone("vgg", depth=[2, 0])
    with pytest.raises(ConfigError, match="dims"):
        build_backbone("vgg", dims=1)
