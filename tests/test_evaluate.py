"Evaluation of a run folder: the CLI on a smoke run, every row in every table, the paper's numbers kept apart, seeds."
import json, re, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
import torch.nn.functional as F
from sce_mae.config import load_profile
from sce_mae.runtime import seed_everything
from sce_mae.synth import SynthFaces
from sce_mae.mae import MAE
from sce_mae.carb import Projector
from sce_mae.dense import DenseFeatures
from sce_mae.refine import load_refined
from sce_mae.datasets import get_dataset
from sce_mae.matching import matching_views, matching_eval, same_location_baseline, MATCHERS
from sce_mae.results import (eval_rows, feature_rows, PAPER_MATCHING, PAPER_DETECTION, PAPER_ABLATION, PAPER_LIMITED,
                             head, TokenMemo, limited_draws, limited_epochs, silhouette, landmark_descriptors, results_markdown)
from sce_mae.evaluate import evaluate_run, find_run, threads_limit, main

STRIP = ('timings', 'machine', 'out')


@pytest.fixture(scope='module')
def p():
    return load_profile('smoke')


@pytest.fixture(scope='module')
def run(p, tmp_path_factory):
    "A real run folder in miniature: the smoke pretraining and the three refinements, on 32 frames (one batch)."
    from sce_mae.pretrain import pretrain
    from sce_mae.refine import refine
    frames = (torch.stack([r['img'] for r in SynthFaces(32, 'train', full=True)]) * 255).round().to(torch.uint8)
    d = tmp_path_factory.mktemp('run')
    bb = pretrain(p, d / 'pretrain', frames=frames, progress=False)
    for mode in ('sce', 'no_cluster', 'dve'):
        refine(p, bb, d / f'refine_{mode}', mode=mode, frames=frames, progress=False)
    (d / 'profile.json').write_text(json.dumps(p.to_dict()))
    return d


@pytest.fixture(scope='module')
def cli_result(run):
    "`sce-mae-evaluate --profile smoke --ckpt RUN` in a subprocess (as CI runs it)."
    exe = shutil.which('sce-mae-evaluate') or str(Path(sys.executable).parent / 'sce-mae-evaluate')
    r = subprocess.run([exe, '--profile', 'smoke', '--ckpt', str(run), '--quiet'], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, json.loads((run / 'eval' / 'results.json').read_text())


def test_cli_writes_every_table_and_figure(run, cli_result, p):
    r, res = cli_result
    out = run / 'eval'
    assert r.stdout.strip().splitlines()[-1] == str(out / 'results.json')
    assert (res['profile'], res['seed'], res['dataset'], res['stride']) == ('smoke', 0, p.eval_dataset, p.eval_stride)
    assert set(res['matching']['rows']) == {'same_location', *feature_rows()}
    assert set(res['detection']['rows']) == {'mean_shape', *feature_rows()}
    assert set(res['feature_quality']['rows']) == set(feature_rows()) and set(res['limited']['rows']) == {'sce', 'mae'}
    for k in ('same_location', *feature_rows()):
        for m in MATCHERS:
            e = res['matching']['rows'][k][m]
            assert isinstance(e['same'], float) and len(e['different_per_landmark']) == 5
    for k in feature_rows():
        d = res['detection']['rows'][k]
        assert 0 < d['error'] < 200 and d['n_train'] == p.det_train
        assert d['dim'] == (p.embed_dim if k == 'mae' else p.embed_dim + p.proj_dim)
        assert -1 <= res['feature_quality']['rows'][k]['silhouette'] <= 1
        assert res['feature_quality']['rows'][k]['position_r2'] <= 1.0
        assert len(res['feature_quality']['rows'][k]['tsne']) == 5 * min(p.tsne_images, res['detection']['n_test'])
    assert set(res['timings']) >= {'views', 'matching', 'detection', 'limited', 'feature_quality', 'total'}
    figs = {'tsne.png', 'limited.png', 'detection_sce.png', *[f'matching_{k}.png' for k in feature_rows()]}
    assert set(res['figures']) == figs and all((out / f).stat().st_size > 5000 for f in figs)
    md = (out / 'results.md').read_text()
    assert md in r.stdout                                                   # the CLI prints the report
    for k in ('same_location', *feature_rows()): assert eval_rows()[k]['label'] in md


def _sections(md: str) -> dict:
    "{heading: [first cells of its table rows]} of the '## ' sections of results.md."
    out = {}
    for block in re.split(r'\n(?=##+ )', md):
        head_line = block.splitlines()[0]
        cells = [ln.split('|')[1].strip() for ln in block.splitlines() if ln.startswith('| ') ]
        out[head_line] = cells[1:]                                          # drop the header row
    return out


def test_paper_numbers_only_in_labelled_tables(cli_result):
    _, res = cli_result
    assert res['paper']['matching'] == PAPER_MATCHING and res['paper']['detection'] == PAPER_DETECTION
    assert res['paper']['ablation'] == PAPER_ABLATION
    assert {int(k): v for k, v in res['paper']['limited']['errors'].items()} == PAPER_LIMITED['errors']
    assert 'paper' in res['paper']['source'].lower() or 'CVPR' in res['paper']['source']
    ours = json.dumps({k: res[k] for k in ('matching', 'detection', 'limited', 'feature_quality')})
    assert 'SCE-MAE DeiT' not in ours and 'ContrastLandmark' not in ours     # no paper row inside our results
    secs = _sections(results_markdown(res))
    our_labels = {v['label'] for v in eval_rows().values()} | {'mean training shape (no features)'}
    paper_labels = {r['method'] for r in PAPER_MATCHING} | {r['variant'] for r in PAPER_ABLATION} | {'error %'}
    n_ours = n_paper = 0
    for h, cells in secs.items():
        if h.startswith('## Ours') or h.startswith('### Ours'):
            n_ours += 1
            assert cells and set(cells) <= our_labels, (h, cells)
        elif h.startswith('## Paper'):
            n_paper += 1
            assert 'not this run' in h and cells and set(cells) <= paper_labels, (h, cells)
        else:
            assert not cells or h.startswith('## Timings'), (h, cells)
    assert (n_ours, n_paper) == (5, 4)
    # every paper table is labelled as the paper's in its header row too
    for block in re.split(r'\n(?=## Paper)', results_markdown(res))[1:]:
        header = [ln for ln in block.splitlines() if ln.startswith('| ')][0]
        assert 'paper' in header


def test_same_seed_same_numbers_and_missing_row(run, cli_result, tmp_path, capsys):
    "In-process, without the cache and without refine_dve: the other rows' numbers equal the CLI's (same seed)."
    _, res = cli_result
    run2 = tmp_path / 'run'
    shutil.copytree(run, run2, ignore=shutil.ignore_patterns('refine_dve', 'eval'))
    res2 = evaluate_run(run2, 'smoke', seed=0, progress=False, cache=False)
    assert "refine_dve/refined.pt does not exist" in capsys.readouterr().out
    assert res2['rows']['dve']['available'] is False
    assert res2['matching']['rows']['dve'] is None and res2['detection']['rows']['dve'] is None
    assert 'matching_dve.png' not in res2['figures']
    assert 'not in this run: missing refine_dve/refined.pt' in (run2 / 'eval' / 'results.md').read_text()
    for part in ('matching', 'detection', 'feature_quality', 'limited'):
        a, b = res[part]['rows'], res2[part]['rows']
        for k in b:
            if k != 'dve': assert a[k] == b[k], (part, k)
    # the limited-annotation repeats use different images, and the same ones for the same seed
    for n in map(str, res['limited']['sizes']):
        draws = res['limited']['rows']['sce'][n]['draws']
        assert len({tuple(d) for d in draws}) == len(draws) == res['limited']['repeats']
        assert draws == res2['limited']['rows']['sce'][n]['draws']


def test_rows_equal_the_protocols_run_directly(run, cli_result, p):
    "The shared-backbone shortcut (TokenMemo + head) gives exactly what matching_eval of DenseFeatures gives."
    _, res = cli_result
    ds = get_dataset(p.eval_dataset, 'test', n=p.match_images, full=True)
    views = matching_views(ds, p, seed=0)
    mae, proj = load_refined(run / 'refine_sce' / 'refined.pt')
    for k, fn in (('sce', DenseFeatures(mae, proj, which='stage2')), ('mae', DenseFeatures(mae, which='stage1'))):
        r = matching_eval(fn, views=views, matcher=MATCHERS, progress=False)
        for m in MATCHERS:
            for key in ('same', 'different'):
                assert r[m][key] == pytest.approx(res['matching']['rows'][k][m][key], abs=1e-4), (k, m, key)
    sl = same_location_baseline(views=views)['same_location']
    for key, v in sl.items(): assert res['matching']['rows']['same_location']['paper'][key] == pytest.approx(v)


def test_no_backbone_is_a_clear_error(tmp_path, capsys):
    "The command's usage error (exit 2, one line, no traceback) names the missing file."
    with pytest.raises(SystemExit) as e: main(['--profile', 'smoke', '--ckpt', str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'has no stage-1 backbone' in err and str(tmp_path / 'pretrain' / 'mae.pt') in err
    with pytest.raises(FileNotFoundError, match='pretrain/mae.pt'): find_run(tmp_path)


def test_head_is_dense_features(p):
    seed_everything(0)
    mae, proj = MAE(p).eval(), Projector(p.embed_dim, p.proj_dim).eval()
    imgs = torch.stack([SynthFaces(2, 'test')[i]['img'] for i in range(2)])
    for s in (4,):
        raw = DenseFeatures(mae, stride=s, which='stage1', l2=False)
        memo = TokenMemo(raw)
        for w in ('stage1', 'stage2', 'both'):
            torch.testing.assert_close(head(memo(imgs), proj, w), DenseFeatures(mae, proj, stride=s, which=w)(imgs),
                                       atol=1e-5, rtol=1e-5)
        assert (memo.computed, memo.looked_up) == (2, 6)


def test_limited_draws():
    a = limited_draws(100, 5, 4, seed=3)
    assert len({tuple(d.tolist()) for d in a}) == 4 and all(len(d) == 5 for d in a)
    assert [d.tolist() for d in a] == [d.tolist() for d in limited_draws(100, 5, 4, seed=3)]
    assert [d.tolist() for d in a] != [d.tolist() for d in limited_draws(100, 5, 4, seed=4)]
    one = limited_draws(3, 1, 3, seed=0)                                    # only 3 single images: all of them
    assert sorted(int(d) for d in one) == [0, 1, 2]
    q = load_profile('smoke')
    assert limited_epochs(1, q) * 1 >= q.det_epochs * q.det_batch and limited_epochs(10 ** 6, q) == q.det_epochs


def test_silhouette_of_constructed_descriptors():
    g = torch.Generator().manual_seed(0)
    lab = torch.arange(5).repeat(60)
    sep = F.one_hot(lab, 8).float() + 0.01 * torch.randn(300, 8, generator=g)
    assert silhouette(sep, lab) > 0.95
    assert abs(silhouette(torch.randn(300, 8, generator=g), lab)) < 0.05
    # maps that hold a landmark's identity at its position give separated descriptors
    from sce_mae.matching import bump_features
    lms = torch.tensor([[20., 30], [70, 30], [48, 50], [30, 75], [66, 75]]) + torch.randn(6, 5, 2, generator=g)
    desc, labels = landmark_descriptors(bump_features(lms, 96, 4, sigma=6), lms, 96)
    assert torch.equal(desc.argmax(1), labels) and silhouette(desc, labels) > 0.9


def test_threads_limit_restores():
    n = torch.get_num_threads()
    with threads_limit(1): assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
