"""examples/study.py: a stage-1 trial with a variant, stage 2 on its saved backbone, and the guard that keeps the
validation faces out of training."""
import json, os, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EX = str(REPO / 'examples' / 'study.py')


def _run(*args, env_cache, timeout=600):
    env = dict(os.environ, SCE_MAE_CACHE=str(env_cache), OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, EX, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_study_stage1_stage2(tmp_path):
    "A smoke-sized trial prints and stores one row per evaluated epoch; stage 2 on its backbone scores raw and refined."
    small = ['--profile', 'smoke', '--set', 'n_train=64', 'pre_epochs=2', '--nv', '12', '--out', str(tmp_path)]
    r = _run('stage1', 'tiny', *small, '--eval-at', '1,2', '--save-at', '2', '--rope', '100', '--enc-pos', '0',
             env_cache=tmp_path / 'cache')
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / 'tiny' / 'res.json').read_text())
    assert [e['epoch'] for e in res['evals']] == [1, 2] and res['variants']['rope'] == 100
    assert all(0 < e['b0_different'] < 100 and e['pos_r2'] <= 1 for e in res['evals'])
    assert res['same_location'] > 0 and (tmp_path / 'tiny' / 'mae_e2.pt').is_file()
    r = _run('stage2', str(tmp_path / 'tiny' / 'mae_e2.pt'), *small, '--rope', '100', '--enc-pos', '0',
             env_cache=tmp_path / 'cache')
    assert r.returncode == 0, r.stderr[-3000:]
    s2 = json.loads((tmp_path / 'tiny-mae_e2-stage2' / 'res.json').read_text())
    assert s2['raw'] == {k[3:]: v for k, v in res['evals'][-1].items() if k.startswith('b0_')}  # same backbone, same numbers
    assert 0 < s2['sce']['different'] < 100


def test_study_refuses_training_on_validation_rows(tmp_path):
    "On real data the backbone must train on rows before the held-out validation rows."
    r = _run('stage1', 'bad', '--profile', 'smoke', '--set', 'n_train=0', '--data', 'mtfl', '--root', str(tmp_path), '--out', str(tmp_path),
             env_cache=tmp_path / 'cache')
    assert r.returncode == 2 and 'held-out' in r.stderr


def test_study_detection_needs_real_data(tmp_path):
    "The regressor-schedule study reads held-out training faces of a real dataset: on SynthFaces it says so and stops."
    r = _run('detection', str(tmp_path / 'mae_e1.pt'), '--profile', 'smoke', '--nv', '12', '--out', str(tmp_path),
             env_cache=tmp_path / 'cache')
    assert r.returncode == 1 and 'real data only' in r.stderr
