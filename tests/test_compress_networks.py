"""The fixed-point coding networks' arithmetic (pyro_vae/compress/networks.py): the transposed convolutions' taps
added where they land give torch's own transposed convolution on the same integers, chunking the rows changes no
row, and a layer whose sums could leave float64's exact integers is refused."""

import pytest
import torch
from torch import nn

from pyro_vae.compress import networks
from pyro_vae.nets import conv_nets


@pytest.mark.parametrize("stride, padding, extra", [(2, 1, 1), (1, 1, 0), (2, 0, 0), (3, 2, 1)])
def test_a_transposed_convolution_on_integers_is_torchs_on_the_same_integers(stride, padding, extra):
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(5, 4, 3, stride=stride, padding=padding, output_padding=extra)
    affine = networks._Affine(layer, networks.ACT_BITS, 2.0 ** 10)
    a = torch.randint(0, 1 << 10, (6, 5, 7, 9)).double()  # (N, C, H, W)
    expected = nn.functional.conv_transpose2d(a, affine.weight, affine.bias, stride, padding, extra)
    out = affine(a.transpose(0, 1).contiguous())  # channel-first in, channel-first out
    assert torch.equal(out.transpose(0, 1), expected)  # integer sums below 2^53: equal, not close


def test_the_decoder_in_chunks_gives_each_row_what_it_gives_that_row_alone():
    torch.manual_seed(0)
    decoder = networks.ExactDecoder(conv_nets(4)[1])
    z = torch.randn(networks.CHUNK * 2 + 5, 4)
    out = decoder(z)
    assert out.shape == (len(z), 1, 28, 28)
    for i in (0, networks.CHUNK - 1, networks.CHUNK, len(z) - 1):
        assert torch.equal(out[i], decoder(z[i:i + 1])[0])


@pytest.mark.parametrize("layer", [nn.Linear(3000, 2), nn.ConvTranspose2d(400, 2, 3), nn.Conv2d(400, 2, 3)])
def test_a_layer_whose_sums_could_pass_float64s_exact_integers_is_refused(layer):
    nn.init.constant_(layer.weight, 1.0)  # every weight 2^14 (|w| < 2^1): 3,000 (3,600) x 2^14 = 2^25.6 (2^25.8)
    with pytest.raises(networks.NotExact, match="past float64's exact integers"):
        networks._Affine(layer, networks.ACT_BITS, 2.0 ** 26)  # sums up to 2^51.6: past the 2^51 allowed
    networks._Affine(layer, networks.ACT_BITS, 2.0 ** 24.5)  # up to 2^50.3: built
