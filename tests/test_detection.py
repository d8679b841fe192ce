"DVE's keypoint regressor and the inter-ocular error (sce_mae.detection)."
import json
import pytest
import torch
import matplotlib
matplotlib.use('Agg')
from sce_mae.config import load_profile
from sce_mae.matching import bump_features, DotFaces, random_conv_features
from sce_mae.mae import to_unit, from_unit
from sce_mae.detection import (EYES, eye_indices, interocular_error, interocular_errors, Regressor,
                               extract_features, train_regressor, predict, draw_subset,
                               evaluate_regressor, detection_eval, show_detections)

TMPL = torch.tensor([[30., 38], [66, 38], [48, 56], [34, 72], [62, 72]])


@pytest.fixture(scope='module')
def prof():
    return load_profile('smoke')


def face_lms(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TMPL + (torch.rand(n, 5, 2, generator=g) - 0.5) * 10 + torch.randn(n, 1, 2, generator=g) * 3


def test_interocular_error_by_hand():
    gt = torch.tensor([[[30., 40], [70, 40], [50, 60], [35, 75], [65, 75]]])     # eyes 40 px apart
    assert interocular_error(gt + torch.tensor([2., 0]), gt) == pytest.approx(5.0)   # 2 / 40
    assert interocular_error(gt + torch.tensor([3., 4]), gt) == pytest.approx(12.5)  # 5 / 40
    one = gt.clone(); one[0, 2] += torch.tensor([0., 4])                           # only the nose, 4 px
    assert interocular_error(one, gt) == pytest.approx(100 * 4 / 40 / 5)
    torch.testing.assert_close(interocular_errors(one, gt), torch.tensor([[0., 0, 10, 0, 0]]))
    # per image, then the mean: a face half the size with the same pixel error counts double
    two = torch.cat([gt, (gt - 50) / 2 + 50])
    assert interocular_error(two + torch.tensor([2., 0]), two) == pytest.approx((5 + 10) / 2)
    # eyes given per image, as collated records carry them
    assert interocular_error(two + torch.tensor([2., 0]), two, eyes=torch.tensor([[0, 1], [0, 1]])) == pytest.approx(7.5)
    assert interocular_error(gt + torch.tensor([2., 0]), gt, eyes=(3, 4)) == pytest.approx(100 * 2 / 30)


def test_eye_indices_68():
    assert eye_indices(68) == (36, 45) and eye_indices(5) == (0, 1) and EYES == {5: (0, 1), 68: (36, 45)}
    gt = torch.rand(3, 68, 2) * 10
    gt[:, 36] = torch.tensor([20., 30]); gt[:, 45] = torch.tensor([80., 30])     # outer eye corners 60 px apart
    gt[:, 0] = torch.tensor([0., 0]); gt[:, 1] = torch.tensor([1., 0])            # not the eyes for 68 points
    assert interocular_error(gt + torch.tensor([0., 6]), gt) == pytest.approx(10.0)
    with pytest.raises(ValueError, match=r'pass eyes=\(a, b\)'): eye_indices(19)


def test_interocular_bad_input():
    gt = torch.rand(2, 5, 2)
    with pytest.raises(ValueError, match=r'\(B, P, 2\)'): interocular_error(gt[:, :4], gt)
    with pytest.raises(ValueError, match='indices into 5 landmarks'): interocular_error(gt, gt, eyes=(0, 7))
    gt[1, 1] = gt[1, 0]
    with pytest.raises(ValueError, match=r'zero inter-ocular distance for image\(s\) \[1\]'): interocular_error(gt, gt)


def test_coordinates_and_softargmax_cells():
    x = torch.tensor([0., 47.5, 95.])
    torch.testing.assert_close(to_unit(x, 96), torch.tensor([-1 + 1 / 96, 0., 1 - 1 / 96]))
    torch.testing.assert_close(from_unit(to_unit(x, 96), 96), x)
    for n in (12, 24):                                   # one lit cell -> its centre, (j + 0.5) * 96 / n - 0.5
        f = torch.zeros(1, 1, n, n); f[0, 0, 3, n - 2] = 1.
        r = Regressor(1, n_lms=2, n_kp=3)
        with torch.no_grad(): r.conv.weight.fill_(1.)
        s = 96 / n
        torch.testing.assert_close(predict(r, f, 96), torch.tensor([[[(n - 1.5) * s - 0.5, 3.5 * s - 0.5]] * 2]), atol=1e-3, rtol=0)


def test_regressor_shapes_and_variants():
    f = torch.randn(2, 12, 12, 12)
    r = Regressor(12, n_lms=5, n_kp=50)
    assert r(f).shape == (2, 5, 2) and r.intermediate(f).shape == (2, 5, 50, 2)
    assert r.conv.weight.shape == (250, 12, 1, 1) and r.linear.shape == (5, 2, 100)
    rc = Regressor(12, 68, 50, conv_block=True)
    assert rc(f).shape == (2, 68, 2) and type(rc.block[0]).__name__ == 'Conv2d' and rc.block[0].kernel_size == (3, 3)
    with pytest.raises(ValueError, match=r'expects features \(B, 12, h, w\)'): r(torch.randn(2, 3, 12, 12))


def test_training_is_seeded(prof):
    l = face_lms(32, 3); f = bump_features(l, 96, 8)
    a, b = [train_regressor(f, l, prof, seed=1, epochs=2, progress=False) for _ in range(2)]
    c = train_regressor(f, l, prof, seed=2, epochs=2, progress=False)
    assert torch.equal(a.conv.weight, b.conv.weight) and a.history == b.history
    assert not torch.equal(a.conv.weight, c.conv.weight)
    with pytest.raises(ValueError, match='same N'): train_regressor(f[:3], l, prof)


def test_draw_subset():
    assert torch.equal(draw_subset(10, 0), torch.arange(10)) and torch.equal(draw_subset(10, 20), torch.arange(10))
    d = draw_subset(100, 5, seed=4)
    assert len(d) == 5 and torch.equal(d, draw_subset(100, 5, seed=4)) and not torch.equal(d, draw_subset(100, 5, seed=5))
    assert torch.equal(d, d.sort().values)
    with pytest.raises(ValueError, match='n_train must be >= 0'): draw_subset(10, -1)


def test_extract_features_cache(tmp_path):
    ds, ff = DotFaces(10, size=96), random_conv_features(8)
    a = extract_features(ff, ds, batch=4, path=tmp_path / 'f.pt', progress=False)
    assert a['feats'].shape == (10, 8, 24, 24) and a['lms'].shape == (10, 5, 2) and a['eyes'].shape == (10, 2)
    assert a['index'].tolist() == list(range(10))
    b = extract_features(lambda x: 1 / 0, ds, path=tmp_path / 'f.pt')          # read back, feat_fn not called
    assert torch.equal(a['feats'], b['feats'])
    with pytest.raises(ValueError, match='holds 10 images but the dataset has 3'):
        extract_features(ff, DotFaces(3, size=96), path=tmp_path / 'f.pt')
    h = extract_features(ff, ds, dtype=torch.float16, progress=False)
    assert h['feats'].dtype == torch.float16
    with pytest.raises(ValueError, match=r'feat_fn must return \(B, C, h, w\)'):
        extract_features(lambda x: x.mean(1), ds, progress=False)


def test_protocol_routes_agree_and_results_are_plain(prof, tmp_path):
    tr, te, ff = DotFaces(40, size=96, seed=1), DotFaces(12, size=96, seed=2), random_conv_features(8, stride=8)
    r1 = detection_eval(ff, tr, te, prof, n_train=16, seed=3, epochs=2, progress=False, cache=tmp_path)
    r2 = evaluate_regressor(extract_features(ff, tr, progress=False), extract_features(ff, te, progress=False), prof,
                            n_train=16, seed=3, epochs=2, progress=False)
    assert r1['error'] == pytest.approx(r2['error'], abs=1e-4) and r1['n_train'] == 16 and r1['n_test'] == 12
    json.dumps(r1); json.dumps(r2)
    assert set(r1['seconds']) == {'features', 'regressor', 'total'}
    assert len(r1['per_landmark']) == 5 and r1['map'] == [8, 12, 12] and r1['epochs'] == 2 and r1['n_kp'] == 50
    assert sorted(q.name for q in tmp_path.iterdir()) == ['det_test.pt', 'det_train_n16_seed3.pt']
    r3 = detection_eval(ff, tr, te, prof, n_train=16, seed=3, epochs=2, progress=False, cache=tmp_path)   # from the cache
    assert r3['error'] == r1['error']
    d = evaluate_regressor(extract_features(ff, tr, progress=False), extract_features(ff, te, progress=False), prof,
                           seed=0, epochs=1, progress=False, return_model=True)
    assert d['n_train'] == 40 and isinstance(d['model'], Regressor) and d['pred'].shape == (12, 5, 2)


def test_show_detections():
    ds = DotFaces(4, size=96)
    imgs = torch.stack([ds[i]['img'] for i in range(4)]); gt = torch.stack([ds[i]['lms'] for i in range(4)])
    fig = show_detections(imgs, gt + 1, gt, n=3)
    assert type(fig).__name__ == 'Figure' and len([a for a in fig.axes if a.images]) == 3
    assert type(show_detections(imgs, gt)).__name__ == 'Figure'
