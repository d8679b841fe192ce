"The prepared GPU run: which chapters it executes, and how their #| gpu outputs come back into nbs/."
import importlib.util, json, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the chapters whose code runs on CUDA (models, bf16 autocast and DDP, refinement, dense features, matching,
# detection, evaluation): each must hold #| gpu cells for the GPU run to check
CUDA_CHAPTERS = {'04_mae', '05_pretrain', '10_refine', '11_dense', '12_matching', '13_detection', '14_evaluate'}


def _course():
    spec = importlib.util.spec_from_file_location('course', ROOT / 'tools' / 'course.py')
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m


def test_plan_runs_every_chapter_with_gpu_cells():
    out = subprocess.run(['bash', 'tools/gpu_session.sh', 'plan'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    planned = {Path(l).stem for l in out.split()}
    with_gpu = {p.stem for p in (ROOT / 'nbs').glob('*.ipynb')
                if any('#| gpu' in ''.join(c['source']) for c in json.loads(p.read_text())['cells'] if c['cell_type'] == 'code')}
    assert planned == with_gpu
    assert CUDA_CHAPTERS <= planned, f'CUDA chapters without #| gpu cells: {sorted(CUDA_CHAPTERS - planned)}'


def test_bad_verb_is_one_line_usage():
    r = subprocess.run(['bash', 'tools/gpu_session.sh', 'launch'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith('usage:') and len(r.stderr.strip().splitlines()) == 1


def test_gpu_outputs_taken_only_for_gpu_cells_with_the_same_source(tmp_path):
    src, dst = tmp_path / 'gpu', tmp_path / 'nbs'
    src.mkdir(); dst.mkdir()
    shutil.copy(ROOT / 'nbs' / '12_matching.ipynb', dst / '12_matching.ipynb')
    nb = json.loads((dst / '12_matching.ipynb').read_text())
    out = [dict(output_type='stream', name='stdout', text=['from the GPU\n'])]
    gpu = [c for c in nb['cells'] if c['cell_type'] == 'code' and '#| gpu' in ''.join(c['source'])]
    cpu = next(c for c in nb['cells'] if c['cell_type'] == 'code' and '#| gpu' not in ''.join(c['source']))
    assert gpu and all(not c.get('outputs') for c in gpu)
    theirs = json.loads(json.dumps(nb))
    for c in theirs['cells']:
        if c['id'] in {g['id'] for g in gpu} or c['id'] == cpu['id']: c['outputs'] = out
    (src / '12_matching.ipynb').write_text(json.dumps(theirs))
    taken = _course().take_gpu_outputs(src, dst)
    assert taken == [f"12_matching.ipynb#{g['id']}" for g in gpu]
    got = {c['id']: c for c in json.loads((dst / '12_matching.ipynb').read_text())['cells']}
    assert all(got[g['id']]['outputs'][0]['text'] == ['from the GPU\n'] for g in gpu)
    assert got[cpu['id']].get('outputs') == cpu.get('outputs')           # a CPU cell keeps the reference machine's output
    theirs['cells'] = [dict(c, source=c['source'] + ['\n# edited']) if c['id'] == gpu[0]['id'] else c for c in theirs['cells']]
    (src / '12_matching.ipynb').write_text(json.dumps(theirs))
    shutil.copy(ROOT / 'nbs' / '12_matching.ipynb', dst / '12_matching.ipynb')
    assert f"12_matching.ipynb#{gpu[0]['id']}" not in _course().take_gpu_outputs(src, dst)   # another source: not taken
