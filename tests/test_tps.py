"""TPS warps (sce_mae.tps): what notebook 03 does not check: points a warp cannot invert, bad input, the CUDA path.
(Identity, translation, forward-back within 0.5 px, colour following the point, determinism and map_points are
tested in notebook 03, where they are worked out.)"""
import pytest
import torch
from sce_mae.config import load_profile
from sce_mae.tps import Warp, compose, random_warp, tps_pair, warp_images, warp_points

P = load_profile('smoke')


def gen(seed): return torch.Generator().manual_seed(seed)


def test_points_without_inverse_are_reported():
    w = random_warp(64, P, gen(6))
    q = torch.rand(64, 200, 2, generator=gen(7)) * 96 - 0.5
    near, vis = warp_points(q, w, 96, return_visible=True)
    nan = warp_points(q, w, 96, invisible='nan')
    assert torch.equal(torch.isnan(nan).any(-1), ~vis) and torch.isfinite(near).all()
    assert (~vis).float().mean() < 0.02
    with pytest.raises(ValueError, match="invisible='drop'"): warp_points(q, w, 96, invisible='drop')


def test_bad_input_names_the_problem():
    w = random_warp(2, P, gen(0))
    with pytest.raises(ValueError, match=r'\(B, P, 2\)'): warp_points(torch.zeros(5, 2), w, 96)
    with pytest.raises(ValueError, match='3 point sets for 2 warps'): warp_points(torch.zeros(3, 5, 2), w, 96)
    with pytest.raises(ValueError, match=r'\(B, C, H, W\)'): warp_images(torch.zeros(3, 8, 8), w)
    with pytest.raises(ValueError, match='1 images for 2 warps'): warp_images(torch.zeros(1, 3, 8, 8), w)
    with pytest.raises(ValueError, match='crop=40'): tps_pair(torch.zeros(2, 3, 64, 64), None, P, 0, crop=40)
    with pytest.raises(ValueError, match='compose: warp 1 has B=1'): compose(w, w[0])
    with pytest.raises(ValueError, match='theta must be'): Warp(torch.zeros(2, 1, 5, 2), torch.zeros(100, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    g = gen(8)
    w = compose(random_warp(4, P, g), random_warp(4, P, g))
    imgs, pts = torch.rand(4, 3, 96, 96, generator=g), torch.rand(4, 50, 2, generator=g) * 75 + 10
    wc = w.to('cuda')
    assert torch.allclose(warp_images(imgs.cuda(), wc).cpu(), warp_images(imgs, w), atol=1e-4)
    assert torch.allclose(warp_points(pts.cuda(), wc, 96).cpu(), warp_points(pts, w, 96), atol=1e-3)
    pr = tps_pair(imgs.cuda(), pts.cuda(), P, seed=0, index=range(4))
    pc = tps_pair(imgs, pts, P, seed=0, index=range(4))
    assert torch.allclose(pr['lms1'].cpu(), pc['lms1'], atol=1e-3) and pr['img1'].is_cuda
