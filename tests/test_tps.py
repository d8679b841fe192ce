"TPS warps (sce_mae.tps): identity, forward-back within 0.5 px, colour follows the point, determinism, map_points, errors."
import math
import pytest
import torch
import torch.nn.functional as F
from sce_mae.config import load_profile
from sce_mae.tps import (TPSParams, Warp, compose, draw_dots, identity_warp, map_points, random_warp, sampling_grid,
                         to_normalized, tps_pair, tps_params, unwarp_points, warp_images, warp_points)

P = load_profile('smoke')


def gen(seed): return torch.Generator().manual_seed(seed)


def test_params_from_profile_are_dves():
    tp = tps_params(P)
    assert (tp.tps_global, tp.tps_local, tp.tps_trans, tp.tps_scale, tp.tps_rot, tp.tps_grid) == (0.0005, 0.005, 0.05, 0.05, 2.5, 10)
    assert tps_params('deit_base') == tp
    with pytest.raises(ValueError, match='missing key'): tps_params({'tps_global': 0.1})
    with pytest.raises(ValueError, match='tps_rot'): TPSParams(0, 0, 0, 0, -1, 10)


def test_identity_maps_points_and_images_to_themselves():
    g = gen(0)
    imgs = torch.rand(3, 3, 40, 56, generator=g)
    pts = torch.rand(3, 30, 2, generator=g) * torch.tensor([55., 39.])
    w = random_warp(3, TPSParams.identity(), g)
    assert torch.equal(w.theta, identity_warp(3).theta)
    assert torch.allclose(warp_images(imgs, w), imgs, atol=1e-5)
    assert torch.allclose(warp_points(pts, w, (40, 56)), pts, atol=1e-4)
    assert torch.allclose(unwarp_points(pts, w, (40, 56)), pts, atol=1e-4)


def test_translation_moves_image_and_points_the_same_way():
    w = identity_warp(1); w.theta[0, 0, -3, 0] = 0.1          # sample 0.1 * (W-1)/2 px to the right
    shift = 0.1 * 55 / 2
    pts = torch.tensor([[[10., 5.], [30.5, 20.]]])
    assert torch.allclose(warp_points(pts, w, (40, 56)), pts - torch.tensor([shift, 0.]), atol=1e-4)
    ramp = torch.arange(56.).expand(1, 1, 40, 56).contiguous()
    assert torch.allclose(warp_images(ramp, w)[..., :50], ramp[..., :50] + shift, atol=1e-3)


def test_forward_and_back_within_half_a_pixel():
    g = gen(1)
    w = compose(random_warp(16, P, g), random_warp(16, P, g))    # view 1 of a pair: two stages
    seen = torch.rand(16, 300, 2, generator=g) * 105 - 5           # points of the view, 5 px beyond it
    src = unwarp_points(seen, w, 96)
    fwd, ok = warp_points(src, w, 96, return_visible=True)
    assert ok.float().mean() > 0.99
    assert (unwarp_points(fwd, w, 96) - src).norm(dim=-1)[ok].max() < 0.5
    assert ((fwd - seen).norm(dim=-1)[ok] < 0.5).float().mean() > 0.99
    # the other way round: points of the source carried into the view and back
    w1 = random_warp(16, P, g)
    src = torch.rand(16, 300, 2, generator=g) * 75 + 10
    fwd, ok = warp_points(src, w1, 96, return_visible=True)
    assert ok.float().mean() > 0.99                                 # DVE's spline folds in rare draws
    assert (unwarp_points(fwd, w1, 96) - src).norm(dim=-1)[ok].max() < 0.5


def test_points_without_inverse_are_reported():
    w = random_warp(64, P, gen(6))
    q = torch.rand(64, 200, 2, generator=gen(7)) * 96 - 0.5
    near, vis = warp_points(q, w, 96, return_visible=True)
    nan = warp_points(q, w, 96, invisible='nan')
    assert torch.equal(torch.isnan(nan).any(-1), ~vis) and torch.isfinite(near).all()
    assert (~vis).float().mean() < 0.02
    with pytest.raises(ValueError, match="invisible='drop'"): warp_points(q, w, 96, invisible='drop')


def test_colour_follows_the_landmark():
    colours = torch.tensor([[1., 0., 0.], [0., 1., 0.], [0., 0., 1.], [1., 1., 0.], [0., 1., 1.], [1., 0., 1.]])
    g = gen(2)
    base = torch.tensor([[20., 30.], [48., 30.], [76., 30.], [20., 66.], [48., 66.], [76., 66.]])
    centres = base.expand(16, -1, -1) + torch.rand(16, 6, 2, generator=g) * 6 - 3
    dots = draw_dots(centres, colours, 96)
    w = compose(random_warp(16, P, g), random_warp(16, P, g))
    out = warp_images(dots, w)
    cw, vis = warp_points(centres, w, 96, return_visible=True)
    assert vis.float().mean() > 0.95
    col = F.grid_sample(out, to_normalized(cw, 96)[:, :, None], align_corners=True)[..., 0].transpose(1, 2)
    assert (col - colours).abs().amax(-1)[vis].max() < 0.02
    wrong = F.grid_sample(out, to_normalized(unwarp_points(centres, w, 96), 96)[:, :, None], align_corners=True)[..., 0].transpose(1, 2)
    assert (wrong - colours).abs().amax(-1)[vis].mean() > 0.2     # the reversed direction misses the dots


def test_determinism_and_seeds():
    a = random_warp(4, P, gen(0)); b = random_warp(4, P, gen(0)); c = random_warp(4, P, gen(1))
    assert torch.equal(a.theta, b.theta) and not torch.equal(a.theta, c.theta)
    g = gen(3)
    imgs, lms = torch.rand(4, 3, 64, 64, generator=g), torch.rand(4, 5, 2, generator=g) * 30 + 17
    p1 = tps_pair(imgs, lms, P, seed=0, crop=8, index=[10, 11, 12, 13])
    p2 = tps_pair(imgs, lms, P, seed=0, crop=8, index=[10, 11, 12, 13])
    assert torch.equal(p1['img1'], p2['img1']) and torch.equal(p1['lms2'], p2['lms2'])
    part = tps_pair(imgs[2:], lms[2:], P, seed=0, crop=8, index=[12, 13])     # batch-independent with index
    assert torch.equal(part['warp1'].theta, p1['warp1'].theta[2:])
    other = tps_pair(imgs, lms, P, seed=1, crop=8, index=[10, 11, 12, 13])
    assert (other['lms1'] - p1['lms1']).abs().max() > 0.5
    assert p1['img1'].shape == (4, 3, 48, 48) and p1['vis1'].shape == (4, 5)
    assert (p1['warp1'].n_stages, p1['warp2'].n_stages) == (2, 1)
    assert torch.equal(p1['warp1'].theta[:, :1], p1['warp2'].theta)   # view 1 = W1 then W2, view 2 = W1 (DVE)


def test_map_points_agrees_with_the_long_way_round():
    g = gen(3)
    wa = compose(random_warp(8, P, g), random_warp(8, P, g)); wb = random_warp(8, P, g)
    q = torch.rand(8, 200, 2, generator=g) * 95
    m, vis = map_points(q, wa, wb, 96, return_visible=True)
    long_way = warp_points(unwarp_points(q, wa, 96), wb, 96, invisible='nan')
    assert torch.equal(torch.isnan(long_way).any(-1), ~vis)
    assert torch.allclose(m[vis], long_way[vis], atol=1e-3)
    back = map_points(m, wb, wa, 96)
    assert ((back - q).norm(dim=-1)[vis] < 1e-3).float().mean() > 0.99
    # within a pair (frame 64, crop 8): landmarks of view 1 land on those of view 2
    imgs, lms = torch.rand(8, 3, 64, 64, generator=g), torch.rand(8, 5, 2, generator=g) * 30 + 17
    pr = tps_pair(imgs, lms, P, seed=0, crop=8)
    assert torch.allclose(map_points(pr['lms1'], pr['warp1'], pr['warp2'], pr['size'], pr['crop']), pr['lms2'], atol=1e-3)
    assert torch.allclose(map_points(pr['lms2'], pr['warp2'], pr['warp1'], pr['size'], pr['crop']), pr['lms1'], atol=1e-3)


def test_default_sampling_grid_is_close_to_exact():
    g = gen(5)
    w = compose(random_warp(4, P, g), random_warp(4, P, g))
    err = ((sampling_grid(w, 136) - sampling_grid(w, 136, step=1)) * 67.5).norm(dim=-1)
    assert err.max() < 0.02


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
