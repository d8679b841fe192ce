"DVE's matching protocol (sce_mae.matching): conventions, constructed features, the same-location baseline."
import json
import pytest
import torch
import torch.nn.functional as F
import matplotlib
matplotlib.use('Agg')
from sce_mae.config import load_profile
from sce_mae.tps import tps_pair
from sce_mae.matching import (FRAME, MATCHERS, bump_features, match_points, match_errors,
                              make_pairs, matching_views, matching_eval, same_location_baseline, show_matches,
                              DotFaces, dot_features, _upsampled_sqnorm, _query, _match_paper, _match_paper_reference)

TMPL = torch.tensor([[30., 38], [66, 38], [48, 56], [34, 72], [62, 72]])


@pytest.fixture(scope='module')
def prof():
    return load_profile('smoke')


@pytest.fixture(scope='module')
def dviews(prof):
    "Views of 16 DotFaces frames (136 px, cropped to 96 like DVE), computed once for the module."
    return matching_views(DotFaces(16), prof)


@pytest.mark.parametrize('hw', [(12, 12), (24, 24), (7, 10)])
def test_fast_paper_matcher_is_the_literal_one(hw):
    "Upsampled norms, reference descriptors and matches equal the literal upsample-then-cosine computation."
    g = torch.Generator().manual_seed(sum(hw))
    fa, fb = torch.randn(5, 16, *hw, generator=g), torch.randn(5, 16, *hw, generator=g)
    q = torch.rand(5, 30, 2, generator=g) * 98 - 1                      # borders and a little outside included
    up = F.interpolate(fb, size=(96, 96), mode='bilinear', align_corners=False)
    torch.testing.assert_close(_upsampled_sqnorm(fb, 96), up.pow(2).sum(1), atol=1e-4, rtol=1e-5)
    ua = F.interpolate(fa, size=(96, 96), mode='bilinear', align_corners=False)
    ref_q = F.grid_sample(ua, ((q + 0.5) / 48 - 1)[:, :, None], padding_mode='border', align_corners=False)[..., 0]
    torch.testing.assert_close(_query(fa, q, 96), ref_q, atol=1e-5, rtol=1e-5)
    fast, slow = _match_paper(fa, fb, q, 96), _match_paper_reference(fa, fb, q, 96)
    assert (fast == slow).all(-1).float().mean() >= 0.99


def test_protocol_end_to_end_on_dots(dviews):
    "Images that carry their landmarks as coloured dots: the whole protocol matches them with sub-pixel error."
    r = matching_eval(dot_features(1), views=dviews, matcher=('paper', 'dve'), return_points=True, progress=False)
    ref, oth = dviews['pairs'][:, 0], dviews['pairs'][:, 1]
    for m in MATCHERS:
        assert r[m]['same'] < 0.5 and r[m]['different'] < 0.5, (m, r[m])
        e = torch.cat([match_errors(r['points'][m]['same'], dviews['lms2'][ref], 96),
                       match_errors(r['points'][m]['different'], dviews['lms2'][oth], 96)])
        assert e.max() < 2 ** 0.5 * 70 / 96
    # the same-location baseline on the same views is far worse, different identity especially
    base = same_location_baseline(views=dviews)['same_location']
    assert base['different'] > 5 * r['paper']['different'] and base['same'] > 2 * r['paper']['same']


@pytest.mark.parametrize('s', [4, 8])
def test_strided_maps_are_unbiased(dviews, s):
    r = matching_eval(dot_features(s, blur=s / 2), views=dviews, matcher=('paper', 'dve'), return_points=True, progress=False)
    gt = torch.cat([dviews['lms2'][dviews['pairs'][:, 0]], dviews['lms2'][dviews['pairs'][:, 1]]])
    for m in MATCHERS:
        off = torch.cat([r['points'][m]['same'], r['points'][m]['different']]) - gt
        assert off.reshape(-1, 2).mean(0).abs().max() < s / 8 + 0.25      # a corner-for-centre error: (s - 1) / 2
        assert max(r[m]['same'], r[m]['different']) < s / 2 * 70 / 96 + 0.3
    assert r['stride'] == s and r['map'] == [6, 96 // s, 96 // s]


def test_same_location_baseline_is_warp_displacement(prof):
    "Computed independently from tps_pair: mean distance between the reference landmark and the target's."
    ds = DotFaces(8, seed=3)
    recs = [ds[i] for i in range(8)]
    v = tps_pair(torch.stack([r['img'] for r in recs]), torch.stack([r['lms'] for r in recs]), prof, 0,
                 crop=20, index=torch.arange(8))
    same = float((v['lms1'][0::2] - v['lms2'][0::2]).norm(dim=-1).mean() * 70 / 96)
    diff = float((v['lms1'][0::2] - v['lms2'][1::2]).norm(dim=-1).mean() * 70 / 96)
    b = same_location_baseline(matching_views(ds, prof, n=8))
    assert b['matchers'] == ['same_location'] and b['n_pairs'] == 4
    assert b['same_location']['same'] == pytest.approx(same, abs=1e-5)
    assert b['same_location']['different'] == pytest.approx(diff, abs=1e-5)
    per = (v['lms1'][0::2] - v['lms2'][0::2]).norm(dim=-1).mean(0) * 70 / 96
    assert b['same_location']['same_per_landmark'] == pytest.approx(per.tolist(), abs=1e-5)


def test_errors_in_the_70_frame(dviews):
    # constant features: every match is the first pixel (paper) or the first cell's centre (dve); scaled by 70/96
    const = lambda imgs: torch.ones(len(imgs), 4, 24, 24)
    r = matching_eval(const, views=dviews, matcher=('paper', 'dve'), progress=False)
    ref, oth = dviews['pairs'][:, 0], dviews['pairs'][:, 1]
    for m, corner in (('paper', 0.), ('dve', 1.5)):
        exp_same = ((dviews['lms2'][ref] - corner).norm(dim=-1) * 70 / 96).mean()
        exp_diff = ((dviews['lms2'][oth] - corner).norm(dim=-1) * 70 / 96).mean()
        assert r[m]['same'] == pytest.approx(float(exp_same), abs=1e-4)
        assert r[m]['different'] == pytest.approx(float(exp_diff), abs=1e-4)


def test_result_layout_and_batch_independence(dviews):
    f = dot_features(4, blur=2)
    a = matching_eval(f, views=dviews, matcher=('paper', 'dve'), batch=64, progress=False)
    b = matching_eval(f, views=dviews, matcher=('dve', 'paper'), batch=3, progress=False)
    json.dumps(a)
    assert a['matchers'] == ['paper', 'dve'] and b['matchers'] == ['dve', 'paper']
    for m in MATCHERS:
        assert a[m] == b[m]
        assert set(a[m]) == {'same', 'different', 'same_per_landmark', 'different_per_landmark'}
        assert len(a[m]['same_per_landmark']) == 5
        assert sum(a[m]['different_per_landmark']) / 5 == pytest.approx(a[m]['different'], abs=1e-5)
    assert (a['n_images'], a['n_pairs'], a['size'], a['frame'], a['seed']) == (16, 8, 96, 70, 0)
    assert set(a['seconds']) == {'features', 'match', 'total'}
    only = matching_eval(f, views=dviews, matcher='dve', progress=False)
    assert only['matchers'] == ['dve'] and 'paper' not in only and only['dve'] == a['dve']


def test_views(prof, tmp_path):
    assert make_pairs(5).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match='at least 2 images'): make_pairs(1)
    ds = DotFaces(7)
    v = matching_views(ds, prof, n=7, path=tmp_path / 'v.pt')
    assert v['n'] == 6 and v['img1'].shape == (6, 3, 96, 96) and v['lms2'].shape == (6, 5, 2)
    w = matching_views(ds, prof, n=7, path=tmp_path / 'v.pt')       # read back from the file
    assert torch.equal(w['img1'], v['img1']) and torch.equal(w['lms2'], v['lms2'])
    with pytest.raises(ValueError, match='holds n=6'):
        matching_views(ds, prof, n=4, path=tmp_path / 'v.pt')
    # the views of an image depend on its position only: the first 4 of 6 are the views of n = 4
    u = matching_views(ds, prof, n=4)
    torch.testing.assert_close(u['lms1'], v['lms1'][:4]); torch.testing.assert_close(u['img2'], v['img2'][:4])
    # 96 px crops work too (the crop itself is warped)
    assert matching_views(DotFaces(4, size=96), prof)['img1'].shape == (4, 3, 96, 96)
    with pytest.raises(ValueError, match='cannot be cropped'):
        matching_views(DotFaces(2, size=97), prof)


def test_bad_input(dviews):
    f = torch.zeros(1, 4, 12, 12)
    with pytest.raises(ValueError, match=r'pts_a must be \(B, P, 2\)'): match_points(f, f, torch.zeros(5, 2), 'paper', 96)
    with pytest.raises(ValueError, match='choose from'): matching_eval(dot_features(), views=dviews, matcher='nope')
    with pytest.raises(ValueError, match=r'feat_fn must return \(B, C, h, w\)'):
        matching_eval(lambda x: x.mean(1), views=dviews, progress=False)


def test_show_matches(dviews):
    fig = show_matches(dot_features(8, blur=4), views=dviews, pairs=[0, 2, 3], matcher='dve', identity='same')
    assert type(fig).__name__ == 'Figure' and len([a for a in fig.axes if a.images]) == 3
    with pytest.raises(ValueError, match="'same' or 'different'"): show_matches(dot_features(), views=dviews, identity='x')
