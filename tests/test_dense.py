"Dense features beyond notebook 11: a wrong interleaving is caught by the geometry check, failure cases, CUDA."
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sce_mae.config import load_profile
from sce_mae.runtime import seed_everything
from sce_mae.mae import MAE
from sce_mae.carb import Projector
from sce_mae.dense import DenseFeatures, shifted_copies, interleave


@pytest.fixture(scope='module')
def p():
    return load_profile('smoke')


@pytest.fixture(scope='module')
def model(p):
    seed_everything(0)
    return MAE(p).eval(), Projector(p.embed_dim, p.proj_dim).eval()


@pytest.fixture(scope='module')
def imgs():
    return torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))


class OffsetEncoder(nn.Module):
    "Test double of MAE: token (i, k) = the mean (x, y) pixel coordinate its 8x8 patch saw, read from coordinate images."
    def __init__(self, profile):
        super().__init__(); self.profile = profile
    def encode(self, imgs):
        class E: pass
        e = E(); e.tokens = F.avg_pool2d(imgs, 8).flatten(2).transpose(1, 2)
        return e


def test_wrong_interleaving_is_caught(p):
    "The same check fails if a copy goes to the wrong slot (here: row and column offsets swapped)."
    xs = torch.arange(96.)
    coords = torch.stack([xs.expand(96, 96), xs[:, None].expand(96, 96), torch.zeros(96, 96)])[None]
    copies = shifted_copies(coords, 4).flatten(0, 1)
    maps = OffsetEncoder(p).encode(copies).tokens.reshape(1, 4, 12, 12, 3).permute(0, 1, 4, 2, 3)
    good = interleave(maps, 2)
    bad = interleave(maps[:, [0, 2, 1, 3]], 2)
    centre = (torch.arange(24) + 0.5) * 4 - 0.5
    assert torch.allclose(good[0, 0, 5, 1:-1], centre[1:-1], atol=1e-4)
    assert not torch.allclose(bad[0, 0, 5, 1:-1], centre[1:-1], atol=1e-4)


def test_errors(model, imgs):
    mae, proj = model
    with pytest.raises(ValueError, match='needs a projector'): DenseFeatures(mae, which='both')
    with pytest.raises(ValueError, match="choose one of stage1, stage2, both"): DenseFeatures(mae, proj, which='stage3')
    with pytest.raises(ValueError, match=r'expected images \(B, 3, 96, 96\)'): DenseFeatures(mae)(imgs[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda(model, imgs):
    mae, proj = model
    import copy
    cpu = DenseFeatures(mae, proj, stride=4, which='both')
    g = copy.deepcopy(cpu).to('cuda')
    out = g(imgs)                                   # CPU images in, maps on the model's device out
    assert out.device.type == 'cuda' and out.shape == (len(imgs), cpu.channels, 24, 24)
    assert torch.allclose(out.cpu(), cpu(imgs), atol=1e-3)
