import pytest
import torch

from dlcore import models


def test_mlp_autoencoder_has_e5_layer_sizes():
    enc = models.mlp_encoder((1, 28, 28))
    dec = models.mlp_decoder((1, 28, 28))
    linears = [m for m in enc if isinstance(m, torch.nn.Linear)] + [m for m in dec if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 512), (512, 128), (128, 128), (128, 128), (128, 512), (512, 784)]
    # ReLU after the first two layers of each, none after the last
    for seq in (enc, dec):
        kinds = [type(m).__name__ for m in seq if not isinstance(m, (torch.nn.Flatten, torch.nn.Unflatten))]
        assert kinds == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    x = torch.rand(3, 1, 28, 28)
    assert enc(x).shape == (3, 128) and dec(enc(x)).shape == x.shape


@pytest.mark.parametrize("shape, channels", [((1, 28, 28), (32, 64)), ((3, 32, 32), (32, 64, 128)), ((1, 28, 28), (16, 32, 64))])
@pytest.mark.parametrize("fc_hidden", [0, 64])
def test_conv_autoencoder_roundtrips_shape_through_latent_d(shape, channels, fc_hidden):
    enc = models.conv_encoder(shape, channels, latent_dim=12, fc_hidden=fc_hidden)
    dec = models.conv_decoder(shape, channels, latent_dim=12, fc_hidden=fc_hidden)
    x = torch.rand(2, *shape)
    z = enc(x)
    assert z.shape == (2, 12) and enc.out_dim == 12
    assert dec(z).shape == x.shape


def test_resnet18_cifar_stem_and_siamese_forward():
    enc = models.resnet18_cifar()
    assert enc[0].kernel_size == (3, 3) and enc[0].stride == (1, 1)  # CIFAR stem, and no max-pool after it
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in enc.modules())
    assert sum(isinstance(m, models.BasicBlock) for m in enc.modules()) == 8
    assert models.resnet18_cifar(width=16).out_dim == 128
    net = models.Siamese(enc, models.projection_head(enc.out_dim, 64, 256))
    h, z = net(torch.rand(2, 3, 32, 32))
    assert h.shape == (2, 512) and z.shape == (2, 64)
    assert 11_000_000 < models.count_params(enc) < 11_300_000


def test_classifier_head_is_two_layer_mlp_or_linear_probe():
    enc = models.conv_encoder((1, 28, 28))
    two = models.Classifier(enc, models.mlp_head(12, 10, 128))
    probe = models.mlp_head(12, 10, 0)
    assert two(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    assert isinstance(probe, torch.nn.Linear)


def test_registry_names_known_models():
    with pytest.raises(ValueError, match=r"unknown encoder 'vit'; known: \['conv', 'mlp', 'resnet18'\]"):
        models.build_encoder("vit", (1, 28, 28))


def test_encoder_state_dict_roundtrip_weights_only(tmp_path):
    enc = models.conv_encoder((1, 28, 28))
    torch.save(enc.state_dict(), tmp_path / "e.pt")
    fresh = models.conv_encoder((1, 28, 28))
    fresh.load_state_dict(models.load_state(str(tmp_path / "e.pt")))
    x = torch.rand(2, 1, 28, 28)
    enc.eval(), fresh.eval()
    assert torch.equal(enc(x), fresh(x))


def test_conv_encoder_flatten_returns_gradients_in_the_activations_layout():
    """The ReLU before the flatten gets its gradient in its own (channels-last) layout, and the
    values are nn.Flatten's: same output, same gradient."""
    leaf = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 8 * 5 * 5)
    grads = {}

    def run(flatten, key):
        act = torch.relu(leaf)  # an activation, not a leaf: autograd hands it the gradient as computed
        act.register_hook(lambda g: grads.__setitem__(key, g))
        out = flatten(act)
        (out * w).sum().backward()
        return out

    assert torch.equal(run(models.Flatten(), "ours"), run(torch.nn.Flatten(), "torch"))
    assert grads["ours"].is_contiguous(memory_format=torch.channels_last) and not grads["ours"].is_contiguous()
    assert torch.equal(grads["ours"], grads["torch"])
    plain = torch.randn(4, 8, 5, 5)
    assert models.Flatten()(plain)._base is plain  # an NCHW input: nn.Flatten's view, no autograd function
    assert torch.autograd.gradcheck(models.Flatten(), torch.randn(2, 3, 2, 2, dtype=torch.double).contiguous(
        memory_format=torch.channels_last).requires_grad_())
    enc = models.build_encoder("conv", (1, 28, 28), channels=[8, 16], latent_dim=4)
    assert any(isinstance(m, models.Flatten) for m in enc.modules())


def test_conv_features_is_the_encoder_cut_after_its_flatten_with_the_same_weights():
    enc = models.build_encoder("conv", (3, 32, 32), channels=[8, 16], latent_dim=5, fc_hidden=7)
    feats = models.conv_features(enc)
    assert feats.out_dim == 16 * 8 * 8
    x = torch.rand(2, 3, 32, 32)
    assert feats(x).shape == (2, 16 * 8 * 8)
    assert torch.equal(enc[-1](enc[-2](enc[-3](feats(x)))), enc(x))  # the rest of the encoder is its FC layers
    assert feats[0][0].weight is enc[0][0].weight
    with pytest.raises(ValueError, match="conv encoder"):
        models.conv_features(models.build_encoder("mlp", (1, 28, 28)))
