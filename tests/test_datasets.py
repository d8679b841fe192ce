"Real-face loaders (sce_mae.datasets): fixture trees in the released layouts, errors, the cache, the CLI, the real MTFL."
import json, math, os, shutil, subprocess, sys, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat
from sce_mae.loaders import _face_geometry

from sce_mae.datasets import (CROP, dataset_names, MTFL_ATTRS, MTFL_BOX, W300_DOTS, AFLW_M, AFLW_R, MAFL, MTFL, W300,
                              CachedFaces, CelebA, DataError, REGISTRY, crop_resize,
                              dataset_root, dot_centres, dve_300w_box, find_cache, fit_landmark_box, frame_geometry,
                              get_dataset, input_box, make_fixture, map_points, prepare_cache, read_mtfl, read_pts,
                              show_grid)

SPLITS = [('celeba', 'train', 5), ('mafl', 'train', 5), ('mafl', 'test', 2), ('mtfl', 'train', 6), ('mtfl', 'test', 6),
          ('aflw_m', 'train', 6), ('aflw_m', 'test', 6), ('aflw_r', 'train', 6), ('aflw_r', 'test', 6),
          ('300w', 'train', 6), ('300w', 'test', 6)]


@pytest.fixture(scope='module')
def fx(tmp_path_factory):
    "One fixture tree of every dataset (celeba/, mtfl/ with aflw_cropped/, aflw_r/, 300w/)."
    root = tmp_path_factory.mktemp('fx')
    for name in ('celeba', 'mtfl', 'aflw_r', '300w'): make_fixture(name, root)
    return root


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv('SCE_MAE_CACHE', str(tmp_path / 'cache'))
    return tmp_path / 'cache'


def copy_of(fx, tmp_path, name):
    "A private copy of one fixture tree, to break."
    folder = REGISTRY[name].folder
    shutil.copytree(fx / folder, tmp_path / folder)
    return tmp_path


def load(name, root, split, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')           # 300W's report of the iBUG entries it leaves out
        return REGISTRY[name].loader(root, split, **kw)


# ---------------------------------------------------------------- geometry primitives
def test_frame_geometry_and_mapping():
    assert frame_geometry(96) == (136, 20) and frame_geometry(48) == (68, 10)
    box, out = input_box((0, 30, 178, 208), 96)
    assert out == 96
    np.testing.assert_allclose(box, (20 * 178 / 136, 30 + 20 * 178 / 136, 178 - 20 * 178 / 136, 208 - 20 * 178 / 136))
    # resizing by s maps x -> (x + .5) s - .5, cropping by b maps x -> x - b (the kit's convention)
    np.testing.assert_allclose(map_points([[10, 20]], (0, 0, 100, 100), 50), [[4.75, 9.75]])
    np.testing.assert_allclose(map_points([[10, 20]], (3, 5, 103, 105), 100), [[7, 15]])


@pytest.mark.parametrize('box,out', [((0, 0, 80, 60), 136), ((-15.5, 7.25, 70.5, 93.25), 96), ((10, -20, 90, 90), (64, 88))])
def test_crop_resize_puts_a_dot_where_map_points_says(box, out):
    a = np.full((60, 80, 3), 60, np.uint8)
    yy, xx = np.mgrid[:60, :80]
    a[(xx - 41) ** 2 + (yy - 27) ** 2 <= 6.25] = (255, 40, 40)
    o = np.asarray(crop_resize(Image.fromarray(a), box, out)).astype(float)
    w = np.clip(o[..., 0] - o[..., 1], 0, None)
    yy, xx = np.mgrid[:o.shape[0], :o.shape[1]]
    got = [(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()]
    np.testing.assert_allclose(got, map_points([[41, 27]], box, out)[0], atol=0.35)


# ---------------------------------------------------------------- every loader on its fixture tree
@pytest.mark.parametrize('name,split,count', SPLITS)
@pytest.mark.parametrize('full', [False, True])
def test_loader_record_and_dots(fx, name, split, count, full):
    ds = load(name, fx, split, full=full)
    assert len(ds) == count
    S = frame_geometry(CROP)[0] if full else CROP
    P = 68 if name == '300w' else 5
    lms_all = ds.frame_landmarks()
    seen = 0
    for i in range(len(ds)):
        r = ds[i]
        assert r['img'].shape == (3, S, S) and r['img'].dtype == torch.float32
        assert 0 <= float(r['img'].min()) and float(r['img'].max()) <= 1
        assert r['lms'].shape == (P, 2) and r['lms'].dtype == torch.float32
        assert r['eyes'].dtype == torch.long and r['eyes'].tolist() == ([36, 45] if name == '300w' else [0, 1])
        assert r['index'] == i and isinstance(r['name'], str) and '\\' not in r['name']
        np.testing.assert_allclose(r['lms'].numpy(), lms_all[i], atol=1e-4)
        if (r['img'][0] - r['img'][1]).abs().max() < 1e-3: continue        # the greyscale AFLW crop has no coloured dots
        dots = W300_DOTS if P == 68 else range(5)
        got = dot_centres(r['img'], r['lms'], W300_DOTS if P == 68 else None)
        err = np.linalg.norm(got - r['lms'][list(dots)].numpy(), axis=1)
        assert np.all(err < 1.0), f'{name} {split} item {i}: dots {err.round(2)} px from their landmarks'
        seen += 1
    assert seen >= count - 1


def test_default_collate_works(fx):
    batch = torch.utils.data.default_collate([load('mtfl', fx, 'test')[i] for i in range(4)])
    assert batch['img'].shape == (4, 3, 96, 96) and batch['lms'].shape == (4, 5, 2) and batch['pose'].shape == (4,)


# ---------------------------------------------------------------- parsing, quirk by quirk
def test_mtfl_quirks_parsed(fx):
    raw = (fx / 'mtfl' / 'training.txt').read_bytes()
    assert raw.startswith(b'lfw_5590\\') and b'\r\n net_7876\\' in raw and raw.endswith(b'\r\n ')
    names, lms, attrs, lines = read_mtfl(fx / 'mtfl' / 'training.txt')
    first = raw.split(b'\r\n')[0].decode().split()
    assert names[0] == first[0].replace('\\', '/') and lines[:2] == [1, 2]
    np.testing.assert_allclose(lms[0, :, 0], np.array(first[1:6], float) - 1, atol=1e-5)   # x1..x5, 1-based
    np.testing.assert_allclose(lms[0, :, 1], np.array(first[6:11], float) - 1, atol=1e-5)  # y1..y5
    assert [attrs[k][0] for k in MTFL_ATTRS] == [int(t) for t in first[11:]]
    r = MTFL(fx, 'train')[0]
    assert [r[k] for k in MTFL_ATTRS] == [int(t) for t in first[11:]]
    grey = MTFL(fx, 'test')[5]                                              # an 'L' image becomes RGB
    assert grey['img'].shape == (3, 96, 96) and torch.equal(grey['img'][0], grey['img'][2])


def test_mtfl_crop_options(fx):
    box, img = MTFL(fx, 'train'), MTFL(fx, 'train', crop='image')
    b = box.frame_box(0, (250, 250))
    c, s = _face_geometry(box.raw_lms[:1])
    np.testing.assert_allclose(b[2] - b[0], MTFL_BOX[0] * s[0], rtol=1e-6)
    assert img.frame_box(0, (250, 250)) == (0, 0, 250, 250)
    with pytest.raises(ValueError, match="crop must be 'box' or 'image'"): MTFL(fx, 'train', crop='tight')


def test_celeba_splits_and_flat_layout(fx, tmp_path):
    cel = CelebA(fx)
    assert cel.names == ['000003.jpg', '000005.jpg', '000006.jpg', '000008.jpg', '000009.jpg']   # partition 0 minus MAFL test
    assert MAFL(fx, 'test').names == ['000002.jpg', '000004.jpg']
    lm = (fx / 'celeba' / 'Anno' / 'list_landmarks_align_celeba.txt').read_text().splitlines()
    row = [l for l in lm if l.startswith('000003.jpg')][0].split()
    np.testing.assert_allclose(cel.raw_lms[0].ravel(), np.array(row[1:], float))                # as written, like DVE
    with pytest.raises(ValueError, match="celeba has splits train; got 'test'"): CelebA(fx, 'test')
    flat = tmp_path / 'celeba'                                              # data/README.md's flat layout
    shutil.copytree(fx / 'celeba' / 'Img' / 'img_align_celeba', flat / 'img_align_celeba')
    shutil.copy(fx / 'celeba' / 'Anno' / 'list_landmarks_align_celeba.txt', flat)
    shutil.copy(fx / 'celeba' / 'Eval' / 'list_eval_partition.txt', flat)
    shutil.copytree(fx / 'celeba' / 'MAFL', flat / 'MAFL')
    assert CelebA(tmp_path).names == cel.names


def test_aflw_r_yx_order_and_hw(fx, tmp_path):
    ds = AFLW_R(fx, 'train')
    gt = loadmat(str(fx / 'aflw_r' / 'aflw_train_keypoints.mat'))['gt']
    np.testing.assert_allclose(ds.raw_lms, gt[:, :, ::-1], atol=1e-5)
    assert ds.frame_box(0, (120, 150)) == (0, 0, 120, 150)
    d = copy_of(fx, tmp_path, 'aflw_r')
    from scipy.io import savemat
    m = loadmat(str(d / 'aflw_r' / 'aflw_train_keypoints.mat'))
    m['hw'][1] = (99, 99)
    savemat(str(d / 'aflw_r' / 'aflw_train_keypoints.mat'), {'gt': m['gt'], 'hw': m['hw']})
    with pytest.raises(DataError, match=r'item 1 \(.*aflw_train_images.txt:2\): hw says 99x99'): AFLW_R(d, 'train')[1]
    savemat(str(d / 'aflw_r' / 'aflw_train_keypoints.mat'), {'gt': m['gt'][:4], 'hw': m['hw'][:4]})
    with pytest.raises(DataError, match='do not match the 6 images'): AFLW_R(d, 'train')


def test_aflw_m_layouts_and_leakage(fx, tmp_path):
    tr, te = AFLW_M(fx, 'train'), AFLW_M(fx, 'test')
    assert len(tr) == 6 and te.names == MTFL(fx, 'test').names            # rows with set == 1 only
    dve = tmp_path / 'aflw-mtfl'                                           # DVE's layout: MTFL/ and aflw_cropped/ side by side
    shutil.copytree(fx / 'mtfl', dve / 'MTFL', ignore=shutil.ignore_patterns('aflw_cropped'))
    shutil.copytree(fx / 'mtfl' / 'aflw_cropped', dve / 'aflw_cropped')
    assert AFLW_M(dve, 'train').names == tr.names and len(AFLW_M(dve, 'test')) == 6
    csvf = dve / 'aflw_cropped' / 'facedata_cropped.csv'
    csvf.write_text(csvf.read_text().replace('image30002.jpg', 'image20003.jpg'))   # an MTFL test image
    with pytest.raises(DataError, match=r'facedata_cropped.csv:4: training image image20003.jpg is also an MTFL test image'):
        AFLW_M(dve, 'train')


def _dve_300w_landmarks(bb, pts1, W, H, imwidth):
    "DVE's ThreeHundredW arithmetic, as published (image resized by int(W * fac), landmarks scaled by fac)."
    xmin, ymin, xmax, ymax = bb
    bw, bh = xmax - xmin + 1, ymax - ymin + 1
    bcy, bcx = ymin + (bh + 1) / 2, xmin + (bw + 1) / 2
    fac = 52 / bw
    bcx_, bcy_ = int(np.floor(fac * bcx)), int(np.floor(fac * bcy))
    bx, by = int(bcx_ - 26 + 1 - 24), int(bcy_ - 26 + 1 - 24 - 2)
    kp = pts1 * fac
    kp[:, 0] -= bx - 1
    kp[:, 1] -= by - 1
    return (kp - 1) * imwidth / 100


def test_300w_frame_follows_dve(fx):
    ds = load('300w', fx, 'train', full=True)
    for i in range(len(ds)):
        bb = None
        folder, img = ds.names[i].rsplit('/', 1)
        pts1 = read_pts(fx / '300w' / folder / (Path(img).stem + '.pts')) + 1
        m = loadmat(str(fx / '300w' / 'Bounding Boxes' / f"bounding_boxes_{folder.replace('/', '_')}.mat"),
                    squeeze_me=True, struct_as_record=False)
        for e in np.atleast_1d(m['bounding_boxes']):
            if e.imgName == img: bb = np.asarray(e.bb_ground_truth, float).ravel()
        b = dve_300w_box(bb)
        np.testing.assert_allclose(b[2] - b[0], 100 * (bb[2] - bb[0] + 1) / 52)   # a 100 px window, box scaled to 52
        dve = _dve_300w_landmarks(bb, pts1.astype(float), *Image.open(ds.paths[i]).size, 136)
        assert np.abs(ds[i]['lms'].numpy() - dve).max() < 1.0                        # DVE's own arithmetic, within a pixel


def test_300w_reports_what_it_leaves_out_and_bad_pts(fx, tmp_path):
    with pytest.warns(UserWarning, match="300w test: left out 1 entries of bounding_boxes_ibug.mat"):
        ds = W300(fx, 'test')
    assert ds.left_out == 1 and len(ds) == 6
    d = copy_of(fx, tmp_path, '300w')
    f = d / '300w' / 'afw' / 'afw_0.pts'
    lines = f.read_text().splitlines()
    f.write_text('\n'.join(lines[:10] + lines[11:]) + '\n')
    with pytest.raises(DataError, match=r'afw_0.pts: expected 68 points, got 67'): W300(d, 'train')
    f.write_text('\n'.join(lines[:10] + ['12.5'] + lines[11:]) + '\n')
    with pytest.raises(DataError, match=r"afw_0.pts:11: expected 'x y'"): W300(d, 'train')
    f.unlink()
    with pytest.raises(FileNotFoundError, match='300W landmarks of afw/afw_0.jpg'): W300(d, 'train')


# ---------------------------------------------------------------- errors name the thing
def test_missing_root_and_files(fx, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match='nowhere'): MTFL(tmp_path / 'nowhere')
    monkeypatch.delenv('SCE_MAE_DATA', raising=False)
    with pytest.raises(FileNotFoundError, match='SCE_MAE_DATA'): MTFL()
    (tmp_path / 'mtfl').mkdir()
    with pytest.raises(FileNotFoundError, match=r'MTFL annotation file: expected .*mtfl/training.txt'): MTFL(tmp_path)
    with pytest.raises(FileNotFoundError, match=r'CelebA aligned images folder: not found; looked for .*Img/img_align_celeba'):
        CelebA(tmp_path)
    with pytest.raises(FileNotFoundError, match='aflw_train_images.txt'): AFLW_R(tmp_path)
    with pytest.raises(FileNotFoundError, match=r'Bounding Boxes/bounding_boxes_afw.mat'): W300(tmp_path)
    m = tmp_path / 'm'
    shutil.copytree(fx / 'mtfl', m / 'mtfl', ignore=shutil.ignore_patterns('aflw_cropped'))
    with pytest.raises(FileNotFoundError, match=r"AFLW_M training crops folder aflw_cropped/ .*: not found; looked for .*m/mtfl/aflw_cropped"):
        AFLW_M(m, 'train')
    assert len(AFLW_M(m, 'test')) == 6


def test_malformed_lines_name_file_and_line(fx, tmp_path):
    d = copy_of(fx, tmp_path, 'mtfl')
    f = d / 'mtfl' / 'training.txt'
    rows = f.read_bytes().split(b'\r\n')
    rows[3] = rows[3].rsplit(b' ', 1)[0]                                   # line 4 loses a field
    f.write_bytes(b'\r\n'.join(rows))
    with pytest.raises(DataError, match=r'training.txt:4: expected 15 fields, got 14'): MTFL(d, 'train')
    rows[3] = rows[3] + b' x'
    f.write_bytes(b'\r\n'.join(rows))
    with pytest.raises(DataError, match=r'training.txt:4: expected numbers'): MTFL(d, 'train')
    f = d / 'mtfl' / 'testing.txt'
    f.write_bytes(f.read_bytes().replace(b' 2 1 2 3\r\n', b' 3 1 2 3\r\n', 1))
    with pytest.raises(DataError, match=r'testing.txt:1: gender must be one of \(1, 2\), got 3'): MTFL(d, 'test')
    c = copy_of(fx, tmp_path / 'c', 'celeba')
    f = c / 'celeba' / 'Anno' / 'list_landmarks_align_celeba.txt'
    lines = f.read_text().splitlines(); lines[5] = lines[5] + ' 7'
    f.write_text('\n'.join(lines) + '\n')
    with pytest.raises(DataError, match=r'list_landmarks_align_celeba.txt:6: expected 11 fields'): CelebA(c)
    lines[5] = lines[5][:-2]; lines[0] = '12'
    f.write_text('\n'.join(lines) + '\n')
    with pytest.raises(DataError, match='line 1 announces 12 images, the file lists 9'): CelebA(c)


def test_split_list_naming_missing_files(fx, tmp_path):
    d = copy_of(fx, tmp_path, 'mafl')
    (d / 'celeba' / 'MAFL' / 'testing.txt').write_text('000002.jpg\n000777.jpg\n')
    with pytest.raises(DataError, match=r'MAFL/testing.txt:2: 000777.jpg is not annotated'): MAFL(d, 'test')
    (d / 'celeba' / 'MAFL' / 'testing.txt').write_text('000002.jpg\n000004.jpg\n')
    (d / 'celeba' / 'Img' / 'img_align_celeba' / '000004.jpg').unlink()
    with pytest.raises(FileNotFoundError, match=r'mafl test: 1 of 2 listed images do not exist, e.g. .*MAFL/testing.txt:2 names .*000004.jpg'):
        MAFL(d, 'test')
    m = copy_of(fx, tmp_path / 'm', 'mtfl')
    (m / 'mtfl' / 'net_7876' / '_1_901_0.jpg').unlink()
    with pytest.raises(FileNotFoundError, match=r'training.txt:2 names .*net_7876/_1_901_0.jpg'): MTFL(m, 'train')


def test_unreadable_image_and_landmark_outside(fx, tmp_path):
    d = copy_of(fx, tmp_path, 'mtfl')
    (d / 'mtfl' / 'AFLW' / '0003-image20002.jpg').write_bytes(b'\xff\xd8 truncated')
    ds = MTFL(d, 'test')
    with pytest.raises(DataError, match=r'mtfl test item 2: cannot read image .*0003-image20002.jpg \(listed at .*testing.txt:3\)'): ds[2]
    assert ds[1]['img'].shape == (3, 96, 96)
    with pytest.raises(DataError, match='item 2: cannot read'): ds.frame_landmarks()
    shutil.copy(fx / 'mtfl' / 'AFLW' / '0003-image20002.jpg', d / 'mtfl' / 'AFLW')
    f = d / 'mtfl' / 'testing.txt'
    rows = f.read_bytes().split(b'\r\n'); t = rows[3].split(b' '); t[7] = b'152.5'; rows[3] = b' '.join(t)   # y1 of line 4
    f.write_bytes(b'\r\n'.join(rows))
    ds = MTFL(d, 'test')
    with pytest.raises(DataError, match=r'mtfl test item 3 \(.*testing.txt:4\): landmark 0 at \(.*, 151.50\) lies outside its 150x150 image'):
        ds[3]
    with pytest.raises(DataError, match='item 3'): ds.frame_landmarks()
    assert MTFL(d, 'test', check_inside=False)[3]['lms'][0, 1] > 95                     # accepted on request, mapped exactly
    c = copy_of(fx, tmp_path / 'c', 'celeba')
    Image.new('RGB', (100, 100)).save(c / 'celeba' / 'Img' / 'img_align_celeba' / '000005.jpg')
    with pytest.raises(DataError, match=r'celeba train item 1: .*000005.jpg is 100x100; CelebA aligned images are 178x218'):
        CelebA(c)[1]


def test_bad_requests(fx):
    with pytest.raises(ValueError, match="mtfl has splits train, test; got 'val'"): MTFL(fx, 'val')
    with pytest.raises(ValueError, match='asked for n=7 items, it has 6'): MTFL(fx, 'test', n=7)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"): get_dataset('imagenet')
    with pytest.raises(ValueError, match='needs n'): get_dataset('synth', cache=False)
    with pytest.raises(ValueError, match='no fixture'): make_fixture('synth', '/tmp')
    assert set(dataset_names()) == {'synth', 'celeba', 'mafl', 'mtfl', 'aflw_m', 'aflw_r', '300w'}


# ---------------------------------------------------------------- get_dataset and the cache
def test_get_dataset_resolves_roots(fx, monkeypatch, cache_env):
    monkeypatch.setenv('SCE_MAE_DATA', str(fx))
    for name, split, count in SPLITS:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            ds = get_dataset(name, split)
        assert type(ds) is REGISTRY[name].loader and len(ds) == count
    assert len(get_dataset('mtfl', 'test', n=3)) == 3 and get_dataset('mtfl', root=fx / 'mtfl').root == fx / 'mtfl'
    assert dataset_root('mafl') == fx / 'celeba'


def test_cache_round_trip(fx, cache_env):
    d = prepare_cache('mtfl', 'test', fx, progress=False)
    assert d == cache_env / 'mtfl-test-96'
    assert sorted(x.name for x in d.iterdir()) == ['images.npy', 'lms.npy', 'meta.json']
    imgs = np.load(d / 'images.npy', mmap_mode='r')
    assert isinstance(imgs, np.memmap) and imgs.dtype == np.uint8 and imgs.shape == (6, 96, 96, 3)
    src, cf = MTFL(fx, 'test'), get_dataset('mtfl', 'test', fx)
    assert isinstance(cf, CachedFaces) and len(cf) == 6 and cf.eyes == (0, 1)
    for i in range(6):
        a, b = src[i], cf[i]
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    assert isinstance(get_dataset('mtfl', 'test', fx, cache=False), MTFL)
    assert find_cache('mtfl', 'test', fx / 'elsewhere') is None                     # a cache of another root is not used
    assert len(get_dataset('mtfl', 'test', fx, n=2)) == 2


@pytest.mark.filterwarnings("ignore:300w")
def test_partial_cache_and_300w_full(fx, cache_env):
    d = prepare_cache('300w', 'test', fx, n=3, full=True, progress=False)
    info = json.loads((d / 'meta.json').read_text())
    assert (info['n'], info['complete'], info['image_size'], info['eyes']) == (3, False, 136, [36, 45])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert isinstance(get_dataset('300w', 'test', fx, full=True), W300)               # the cache is not complete
        assert isinstance(get_dataset('300w', 'test', fx, n=2, full=True), CachedFaces)
        assert get_dataset('300w', 'test', fx, n=2, full=True)[1]['lms'].shape == (68, 2)
    with pytest.raises(FileNotFoundError, match='does not hold'): get_dataset('300w', 'test', fx, n=5, full=True, cache=d)


def test_broken_cache_is_an_error(fx, tmp_path):
    d = prepare_cache('aflw_r', 'test', fx, out=tmp_path / 'c', progress=False)
    (d / 'images.npy').write_bytes((d / 'images.npy').read_bytes()[:300])
    with pytest.raises(DataError, match=r'c/images.npy: cannot be read'): CachedFaces(d)
    with pytest.raises(FileNotFoundError, match='cache metadata'): CachedFaces(tmp_path / 'nothing')


def test_synth_through_get_dataset_and_cache(cache_env):
    pytest.importorskip('sce_mae.synth')
    sy = get_dataset('synth', 'train', n=6, seed=3)
    r = sy[0]
    assert r['img'].shape == (3, 96, 96) and r['lms'].shape == (5, 2) and r['eyes'].tolist() == [0, 1]
    d = prepare_cache('synth', 'train', n=6, seed=3, progress=False)
    assert d.name == 'synth-train-96-seed3'
    cf = get_dataset('synth', 'train', n=4, seed=3)
    assert isinstance(cf, CachedFaces) and len(cf) == 4
    assert (cf[2]['img'] - sy[2]['img']).abs().max() <= 1 / 500 and torch.allclose(cf[2]['lms'], sy[2]['lms'])
    assert 'lms_all' in cf[2] and torch.allclose(cf[2]['lms_all'], sy[2]['lms_all'])
    assert not isinstance(get_dataset('synth', 'train', n=7, seed=3), CachedFaces)


# ---------------------------------------------------------------- the command line
def _cli(*args, env=None):
    exe = shutil.which('sce-mae-data') or str(Path(sys.executable).parent / 'sce-mae-data')
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


def test_cli_prepare_and_show(fx, tmp_path):
    env = {**os.environ, 'SCE_MAE_CACHE': str(tmp_path / 'cache'), 'MPLBACKEND': 'Agg'}
    r = _cli('prepare', '--dataset', 'mtfl', '--root', fx, '--split', 'train', 'test', '--out', tmp_path / 'out', env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(x.name for x in (tmp_path / 'out').iterdir()) == ['mtfl-test-96', 'mtfl-train-96']
    assert 'prepare mtfl train' in r.stderr and 'items/s' in r.stdout                 # a progress bar and a summary
    assert len(CachedFaces(tmp_path / 'out' / 'mtfl-train-96')) == 6
    r = _cli('show', '--dataset', '300w', '--root', fx, '--split', 'test', '--out', tmp_path / 'grid.png', env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'grid.png').stat().st_size > 10_000 and Image.open(tmp_path / 'grid.png').size[0] > 500
    r = _cli('prepare', '--dataset', 'mtfl', '--root', tmp_path / 'nowhere', env=env)
    assert r.returncode == 2 and 'sce-mae-data: error: data root' in r.stderr and 'Traceback' not in r.stderr


def test_cli_synth(tmp_path):
    pytest.importorskip('sce_mae.synth')
    env = {**os.environ, 'SCE_MAE_CACHE': str(tmp_path / 'cache'), 'MPLBACKEND': 'Agg'}
    r = _cli('prepare', '--dataset', 'synth', '--n', 12, '--split', 'train', 'test', env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(x.name for x in (tmp_path / 'cache').iterdir()) == ['synth-test-96-seed0', 'synth-train-96-seed0']
    r = _cli('show', '--dataset', 'synth', '--n', 12, '--out', tmp_path / 's.png', env=env)
    assert r.returncode == 0, r.stderr and (tmp_path / 's.png').stat().st_size > 10_000


# ---------------------------------------------------------------- the real MTFL
def test_real_mtfl(mtfl_root, tmp_path):
    tr, te = MTFL(mtfl_root, 'train'), MTFL(mtfl_root, 'test')
    assert (len(tr), len(te)) == (10000, 2995)
    assert tr.names[0] == 'lfw_5590/Aaron_Eckhart_0001.jpg' and te.names[0] == 'AFLW/0001-image20056.jpg'
    # MATLAB's 1-based coordinates lose 1: the first row of training.txt starts '107.25 147.75 ...'
    np.testing.assert_allclose(tr.raw_lms[0, :2, 0], [106.25, 146.75])
    F = frame_geometry(96)[0]
    for ds in (tr, te, MTFL(mtfl_root, 'train', crop='image')):
        v = ds.frame_landmarks(full=True)                   # also checks every raw landmark lies inside its image
        assert ((v >= -0.5) & (v <= F - 0.5)).all(), f'{ds.label}: a landmark leaves its 136 frame'
    for k, ok in MTFL_ATTRS.items():
        assert set(tr.meta[k]) <= set(ok) and set(te.meta[k]) <= set(ok)
    assert np.bincount(te.meta['pose'])[1:].tolist() == [193, 450, 1825, 401, 126]
    # the landmark-derived box reproduces the test crops' framing
    np.testing.assert_allclose(fit_landmark_box(te.raw_lms, (150, 150)), MTFL_BOX, atol=2e-4)
    np.testing.assert_allclose(tr.frame_landmarks().mean(0), te.frame_landmarks().mean(0), atol=1.0)
    # decode a sample of both splits and plot it
    idx = np.random.default_rng(0).choice(len(tr), 16, replace=False)
    for i in idx[:8]:
        r = tr[int(i)]
        assert r['img'].shape == (3, 96, 96) and 0.05 < float(r['img'].mean()) < 0.95
    import matplotlib
    matplotlib.use('Agg')
    for ds in (tr, te):
        fig = show_grid(ds, 16, seed=0)
        out = tmp_path / f'{ds.split}.png'
        fig.savefig(out, dpi=80)
        assert out.stat().st_size > 50_000


def test_nan_and_inf_landmarks_refused(fx, tmp_path):
    d = copy_of(fx, tmp_path, 'mtfl')
    f = d / 'mtfl' / 'training.txt'
    rows = f.read_bytes().split(b'\r\n')
    good = list(rows)
    for bad in (b'nan', b'inf', b'-Infinity'):
        tok = good[3].split(b' '); tok[2] = bad; rows[3] = b' '.join(tok)
        f.write_bytes(b'\r\n'.join(rows))
        with pytest.raises(DataError, match=r'training.txt:4: expected finite numbers \(no NaN or infinity\)'):
            MTFL(d, 'train')
    env = {**os.environ, 'SCE_MAE_CACHE': str(tmp_path / 'cache')}
    r = _cli('prepare', '--dataset', 'mtfl', '--root', d, '--split', 'train', '--out', tmp_path / 'out', env=env)
    assert r.returncode == 2 and 'training.txt:4' in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path / 'out' / 'mtfl-train-96').exists()


def test_nan_in_a_mat_file_refused(fx, tmp_path):
    from scipy.io import savemat
    d = copy_of(fx, tmp_path, 'aflw_r')
    matf = d / 'aflw_r' / 'aflw_test_keypoints.mat'
    m = loadmat(matf); m['gt'] = m['gt'].astype(float); m['gt'][1, 2, 0] = np.nan
    savemat(matf, {k: v for k, v in m.items() if not k.startswith('__')})
    with pytest.raises(DataError, match=r'aflw_r test item 1 .*: landmark coordinates .* not all finite'): AFLW_R(d, 'test')


def test_cache_with_nan_landmarks_refused(fx, tmp_path):
    c = prepare_cache('mtfl', 'train', fx, out=tmp_path / 'c')
    lms = np.load(c / 'lms.npy'); lms[2, 1, 0] = np.nan; np.save(c / 'lms.npy', lms)
    with pytest.raises(DataError, match=r'cache .* item 2 .* not all finite'): CachedFaces(c)


def test_prepare_removes_leftovers_of_killed_runs(fx, tmp_path):
    dead = tmp_path / 'out' / f'mtfl-test-96.tmp-{2**22 + 777}'
    dead.mkdir(parents=True); (dead / 'images.npy').write_bytes(b'partial')
    prepare_cache('mtfl', 'test', fx, out=tmp_path / 'out' / 'mtfl-test-96')
    assert sorted(x.name for x in (tmp_path / 'out').iterdir()) == ['mtfl-test-96']


def test_prepared_cache_follows_the_data_root_of_the_environment(fx, tmp_path, monkeypatch, cache_env):
    prepare_cache('mtfl', 'test', fx, progress=False)
    other = make_fixture('mtfl', tmp_path / 'other', seed=3).parent      # another tree of other faces
    monkeypatch.setenv('SCE_MAE_DATA', str(fx))
    assert isinstance(get_dataset('mtfl', 'test'), CachedFaces)           # made from this root: served
    monkeypatch.setenv('SCE_MAE_DATA', str(other))
    ds = get_dataset('mtfl', 'test')                                       # another root: read from it, not the cache
    assert type(ds) is MTFL and ds.root == other / 'mtfl'
