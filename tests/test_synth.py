"""SynthFaces: pure function of (seed, split, index), disjoint identities, landmarks in order, in the frame and on the drawn pixels
(the full frame as the crop with a border is tested in notebook 01)."""
from dataclasses import replace
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from sce_mae.synth import (SynthFaces, FaceParams, render, landmarks, sample_params, identity_id,
                           pixel_to_canon, canon_landmarks, LANDMARK_NAMES, ALL_LANDMARK_NAMES)

LUM = np.array([0.299, 0.587, 0.114], np.float32)[:, None, None]
IDENTITY = ('face_w', 'face_top', 'skin', 'eye_dx', 'eye_w', 'nose_w', 'mouth_w', 'hair_col', 'iris')


def _ident(p): return tuple(getattr(p, k) for k in IDENTITY)


def _pixel(Y, pt): return float(Y[int(round(float(pt[1]))), int(round(float(pt[0])))])


def test_pure_function_of_seed_split_index():
    a, b = SynthFaces(20, seed=3), SynthFaces(20, seed=3)
    for i in (0, 5, 19):
        ra, rb = a[i], b[i]
        assert torch.equal(ra['img'], rb['img']) and torch.equal(ra['lms_all'], rb['lms_all'])
    assert not torch.equal(a[5]['img'], a[6]['img'])
    assert not torch.equal(a[5]['img'], SynthFaces(20, seed=4)[5]['img'])
    assert not torch.equal(a[5]['img'], SynthFaces(20, seed=3, split='test')[5]['img'])
    assert b[7]['index'] == 7 and len(b) == 20


def test_train_and_test_never_share_an_identity():
    train = {_ident(sample_params(0, 'train', i)) for i in range(300)}
    test = {_ident(sample_params(0, 'test', i)) for i in range(300)}
    assert len(train) == 300 and len(test) == 300 and not (train & test)
    assert not ({identity_id('train', i, 3) for i in range(300)} & {identity_id('test', i, 3) for i in range(300)})
    ds = SynthFaces(8, per_identity=4)
    assert [ds[i]['identity'] for i in range(8)] == [0, 0, 0, 0, 2, 2, 2, 2]
    p0, p3, p4 = ds.params(0), ds.params(3), ds.params(4)
    assert _ident(p0) == _ident(p3) != _ident(p4) and p0.rot != p3.rot


def test_record_fields_and_default_collate():
    ds = SynthFaces(6, seed=1)
    r = ds[2]
    assert sorted(r) == ['eyes', 'identity', 'img', 'index', 'lms', 'lms_all']
    assert r['img'].shape == (3, 96, 96) and r['img'].dtype == torch.float32
    assert 0 <= float(r['img'].min()) and float(r['img'].max()) <= 1
    assert r['lms'].shape == (5, 2) and r['lms_all'].shape == (len(ALL_LANDMARK_NAMES), 2) and len(ALL_LANDMARK_NAMES) >= 15
    assert torch.equal(r['lms'], r['lms_all'][:5]) and r['eyes'].tolist() == [0, 1] and r['index'] == 2
    assert SynthFaces.landmark_names == LANDMARK_NAMES == ('left_eye', 'right_eye', 'nose', 'left_mouth', 'right_mouth')
    b = next(iter(DataLoader(ds, batch_size=4)))
    assert b['img'].shape == (4, 3, 96, 96) and b['lms'].shape == (4, 5, 2) and b['lms_all'].shape == (4, 18, 2)
    assert b['eyes'].shape == (4, 2) and b['index'].tolist() == [0, 1, 2, 3]


def test_landmark_order_and_inside_the_frame():
    front = FaceParams()
    l = landmarks(front)
    assert l[0, 0] < l[1, 0] and l[3, 0] < l[4, 0]                  # image left before image right
    assert l[0, 1] < l[2, 1] < l[3, 1] and l[2, 1] < l[4, 1]        # eyes above the nose above the mouth
    ds = SynthFaces(300, seed=7, fixed=dict(rot=0.0, yaw=0.0))
    P = np.stack([landmarks(ds.params(i)) for i in range(0, 300, 3)])
    assert (P[:, 0, 0] < P[:, 1, 0]).all() and (P[:, 2, 1] < P[:, 3, 1]).all() and (P[:, 1, 1] < P[:, 2, 1]).all()
    P = np.stack([landmarks(sample_params(2, split, i)) for split in ('train', 'test') for i in range(300)])
    assert (P >= 2 - 1e-6).all() and (P <= 93 + 1e-6).all()
    assert (P[:, 0, 0] < P[:, 1, 0]).all() and (P[:, 3, 0] < P[:, 4, 0]).all()   # rotations up to 30 degrees keep the order
    assert (P[:, :5].std(0) > 3).all()                                 # not fixed positions


def test_pose_knobs_move_landmarks_as_documented():
    l = landmarks(replace(FaceParams(), rot=20.0))
    assert abs(np.degrees(np.arctan2(l[1, 1] - l[0, 1], l[1, 0] - l[0, 0])) - 20) < 1e-6
    l = landmarks(replace(FaceParams(), yaw=25.0))
    assert l[2, 0] > (l[0, 0] + l[1, 0]) / 2 + 3                         # the nose moves to the image right
    assert (l[4, 0] - l[2, 0]) < (l[2, 0] - l[3, 0])                     # the far half narrows
    q = replace(FaceParams(), yaw=-18.0, rot=-11.0, scale=1.1, tx=2.0)
    np.testing.assert_allclose(pixel_to_canon(landmarks(q, 72), q, 72), canon_landmarks(q), atol=1e-9)


def test_landmarks_sit_on_the_drawn_features():
    clean = dict(blink_l=0.0, blink_r=0.0, blur=0.0, noise=0.0, grad=0.0, light=(0.0, 0.0), glasses=0, beard=0.0, moustache=0.0)
    eye96 = []
    for i in range(60):
        q = sample_params(5, 'test', i, fixed=clean)
        img, l = render(q, 192)                                        # a pixel is smaller than the pupil here
        Y = (img.numpy() * LUM).sum(0)
        for e, m in ((0, 3), (1, 4)):
            cheek = _pixel(Y, (l[e] + l[m]) / 2)
            assert _pixel(Y, l[e]) < min(0.06, 0.2 * cheek), (i, e)   # the pupil's colour
        img, l = render(q, 96)
        Y = (img.numpy() * LUM).sum(0)
        for e, m in ((0, 3), (1, 4)):
            cheek = _pixel(Y, (l[e] + l[m]) / 2)
            assert _pixel(Y, l[m]) < 0.85 * cheek, (i, m)              # the mouth corner is the lips' dark end
            eye96.append(_pixel(Y, l[e]) < cheek)
    assert np.mean(eye96) >= 0.95
    # a closed eye has no pupil: its landmark pixel is the lid line, not white and not the open eye's pupil
    q = replace(sample_params(5, 'test', 0, fixed=clean), blink_l=1.0)
    img, l = render(q, 192)
    assert _pixel((img.numpy() * LUM).sum(0), l[0]) < 0.3


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="split must be one of"): SynthFaces(3, split='val')
    with pytest.raises(ValueError, match="multiple of 24"): SynthFaces(3, size=100, full=True)
    with pytest.raises(ValueError, match=r"unknown knob\(s\) yawn"): SynthFaces(3, fixed={'yawn': 1})
    with pytest.raises(ValueError, match="n must be"): SynthFaces(-1)
    with pytest.raises(IndexError, match="index 3 out of range for 3 images"): SynthFaces(3)[3]
    with pytest.raises(TypeError, match="needs a FaceParams"): render({'yaw': 3})
