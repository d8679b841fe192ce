"Dense features: cover-and-stride geometry (every token in its cell, the kit's cell-centre convention), s=8 == plain forward, shapes, checkpoints."
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sce_mae.config import load_profile, seed_everything, save_checkpoint
from sce_mae.mae import MAE, save_mae, grid_centres
from sce_mae.carb import Projector
from sce_mae.dense import (DenseFeatures, dense_from_checkpoint, shifted_copies, shift_offsets, interleave, check_stride,
                           similarity_maps, STRIDES)


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


@pytest.mark.parametrize('s', STRIDES)
def test_every_token_lands_in_its_cell(p, s):
    "Coordinate images: after cover-and-stride each cell holds the mean coordinate of its patch = its centre (j+0.5)s-0.5."
    xs = torch.arange(96.)
    coords = torch.stack([xs.expand(96, 96), xs[:, None].expand(96, 96), torch.zeros(96, 96)])[None]
    out = DenseFeatures(OffsetEncoder(p), stride=s, l2=False)(coords)[0]
    n = 96 // s
    centre = (torch.arange(n) + 0.5) * s - 0.5
    inner = (centre - 3.5 >= 0) & (centre + 3.5 <= 95)        # patches entirely inside the image (no padding seen)
    assert out.shape == (3, n, n)
    assert torch.allclose(out[0][:, inner][inner], centre[inner].expand(int(inner.sum()), -1), atol=1e-4)
    assert torch.allclose(out[1][:, inner][inner], centre[inner][:, None].expand(-1, int(inner.sum())), atol=1e-4)
    # replicate padding: border cells see repeated edge pixels, so they sit at most (8 - s)/2 px inward
    assert (out[0][0] - centre).abs().max() <= (8 - s) / 2 + 1e-4
    assert torch.equal(grid_centres(n, 96), centre.float())              # the kit's one grid convention (chapter 04)


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


def test_copies_and_offsets():
    assert shift_offsets(8) == [0] and shift_offsets(4) == [-2, 2] and shift_offsets(2) == [-3, -1, 1, 3]
    for bad in (3, 1, 16, 0):
        with pytest.raises(ValueError, match='must divide the patch size'): check_stride(bad)
    x = torch.rand(2, 3, 96, 96)
    assert torch.equal(shifted_copies(x, 8)[:, 0], x)
    c = shifted_copies(x, 2, pad_mode='reflect')
    assert c.shape == (2, 16, 3, 96, 96)
    assert torch.equal(c[:, 4 * 3 + 0, :, 10:80, 10:80], x[:, :, 13:83, 7:77])      # copy (a=3, b=0): moved by (+3, -3)


def test_stride8_equals_plain_forward(model, imgs):
    mae, proj = model
    with torch.no_grad():
        tok = mae.encode(imgs).tokens
    grid = lambda t: t.transpose(1, 2).reshape(len(imgs), -1, 12, 12)
    s1, s2 = F.normalize(tok, dim=-1), proj(tok).detach()
    assert torch.equal(DenseFeatures(mae, stride=8, l2=False)(imgs), grid(tok))
    assert torch.equal(DenseFeatures(mae, stride=8)(imgs), grid(s1))
    assert torch.equal(DenseFeatures(mae, proj, stride=8)(imgs), grid(s2))
    assert torch.equal(DenseFeatures(mae, proj, stride=8, which='both')(imgs), grid(torch.cat([s1, s2], -1)))


@pytest.mark.parametrize('s,which', [(4, 'stage1'), (4, 'stage2'), (4, 'both'), (2, 'stage2'), (2, 'both')])
def test_shapes(p, model, imgs, s, which):
    mae, proj = model
    df = DenseFeatures(mae, proj, stride=s, which=which, chunk=5)
    C = {'stage1': p.embed_dim, 'stage2': p.proj_dim, 'both': p.embed_dim + p.proj_dim}[which]
    out = df(imgs[:2])
    assert out.shape == (2, C, 96 // s, 96 // s) and df.channels == C and not df.training
    assert torch.equal(out, DenseFeatures(mae, proj, stride=s, which=which)(imgs[:2]))   # chunking changes nothing
    assert torch.isfinite(out).all()


def test_errors(model, imgs):
    mae, proj = model
    with pytest.raises(ValueError, match='needs a projector'): DenseFeatures(mae, which='both')
    with pytest.raises(ValueError, match="choose one of stage1, stage2, both"): DenseFeatures(mae, proj, which='stage3')
    with pytest.raises(ValueError, match=r'expected images \(B, 3, 96, 96\)'): DenseFeatures(mae)(imgs[0])


def test_from_checkpoint(p, model, imgs, tmp_path):
    mae, proj = model
    from sce_mae.refine import file_sha256
    bb = save_mae(mae, tmp_path / 'mae.pt')
    save_checkpoint(dict(projector=proj.state_dict(), profile=p.to_dict(), mode='sce', seed=0, epoch=1, step=1,
                         backbone=str(bb), backbone_rel='mae.pt', backbone_sha256=file_sha256(bb)), tmp_path / 'refined.pt')
    f1 = dense_from_checkpoint(bb, stride=4, device='cpu')
    f2 = dense_from_checkpoint(tmp_path / 'refined.pt', stride=4, which='both', device='cpu')
    assert (f1.which, f2.which, f2.channels) == ('stage1', 'both', p.embed_dim + p.proj_dim)
    assert torch.equal(f2(imgs[:1])[:, :p.embed_dim], f1(imgs[:1]))
    with pytest.raises(ValueError, match='is a stage-1 checkpoint'): dense_from_checkpoint(bb, which='stage2')
    sim = similarity_maps(f2, imgs, torch.tensor([40., 30.]))
    assert sim.shape == (3, 96, 96) and sim[0, 30, 40] > 0.999


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda(model, imgs):
    mae, proj = model
    import copy
    cpu = DenseFeatures(mae, proj, stride=4, which='both')
    g = copy.deepcopy(cpu).to('cuda')
    out = g(imgs)                                   # CPU images in, maps on the model's device out
    assert out.device.type == 'cuda' and out.shape == (len(imgs), cpu.channels, 24, 24)
    assert torch.allclose(out.cpu(), cpu(imgs), atol=1e-3)
