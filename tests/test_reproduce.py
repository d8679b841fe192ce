"""`sce-mae-reproduce --profile smoke` end to end (what CI runs): a run that resumes a killed pretraining, the report
folder, a rerun that skips every stage, a partial redo, the refusal of another profile, examples/api_match.py and examples/diagnose_run.py."""
import json, re, shutil, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from sce_mae.config import load_profile
from sce_mae.runtime import load_checkpoint
from sce_mae.pretrain import pretrain
from sce_mae.runs import stages, REPORT, run_status, check_run, paper_point
from sce_mae.reproduce import main

REPO = Path(__file__).resolve().parent.parent
EXE = shutil.which('sce-mae-reproduce') or str(Path(sys.executable).parent / 'sce-mae-reproduce')
NAMES = [s.name for s in stages()]


def _cli(*args, timeout=1200):
    r = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"rc {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def _banner(stdout: str, name: str) -> str:
    "The banner line of stage `name` in the output of a run."
    lines = [l for l in stdout.splitlines() if re.match(rf'\[\d+/\d+\] {name}:', l)]
    assert len(lines) == 1, f"no single banner for {name} in:\n{stdout}"
    return lines[0]


def _mtimes(run: Path) -> dict:
    return {s.name: (run / s.folder / s.artefact).stat().st_mtime_ns for s in stages()}


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "A smoke run whose pretraining was killed after its first epoch, then completed by `sce-mae-reproduce`."
    out = tmp_path_factory.mktemp('reproduce') / 'run'
    p = load_profile('smoke')
    assert p.pre_epochs >= 2
    ck = pretrain(p, out / 'pretrain', stop_after=1, progress=False)          # as if killed after epoch 1
    assert ck.name == 'checkpoint.pt' and not (out / 'pretrain' / 'mae.pt').exists()
    t0 = time.time()
    r = _cli('--profile', 'smoke', '--out', str(out), '--no-progress')
    return dict(out=out, stdout=r.stdout, stderr=r.stderr, seconds=time.time() - t0, profile=p)


def test_first_run_resumes_the_killed_stage_and_finishes(run):
    out, so = run['out'], run['stdout']
    assert 'resuming after epoch 1' in _banner(so, 'pretrain')
    for name in NAMES[1:]: assert 'skipped' not in _banner(so, name)
    assert run_status(out) == {n: 'done' for n in NAMES}
    assert so.strip().splitlines()[-1] == str(out / REPORT / 'report.md')
    log = json.loads((out / 'pretrain' / 'log.json').read_text())
    p = run['profile']
    assert [e['epoch'] for e in log['epochs']] == list(range(1, p.pre_epochs + 1))    # epoch 1 kept, the rest resumed
    assert [s['step'] for s in log['steps']] == list(range(p.pre_epochs * (p.n_train // p.pre_batch)))
    rl = json.loads((out / 'run.json').read_text())
    st = rl['invocations'][-1]['stages']
    assert rl['invocations'][-1]['status'] == 'finished'
    own = [n for n in NAMES if n != 'refine_no_cluster']                       # no_cluster trains in the loop of sce
    assert st['pretrain']['action'] == 'resumed' and all(st[n]['action'] == 'ran' for n in own[1:])
    assert st['refine_no_cluster']['action'] == 'ran with refine_sce' and 'in the loop of refine_sce' in _banner(so, 'refine_no_cluster')
    assert all(st[n]['wall_s'] > 0 and st[n]['cpu_s'] > 0 for n in own)


def test_report_folder(run):
    out = run['out']; rep = out / REPORT
    for f in ('report.md', 'results.json', 'results.md', 'profile.json', 'environment.json', 'timings.json'):
        assert (rep / f).is_file(), f
    assert json.loads((rep / 'profile.json').read_text()) == json.loads(json.dumps(run['profile'].to_dict()))
    env = json.loads((rep / 'environment.json').read_text())
    assert env['versions']['torch'] == torch.__version__ and env['machine']['cores'] >= 1
    res = json.loads((rep / 'results.json').read_text())
    assert res == json.loads((out / 'eval' / 'results.json').read_text())
    text = json.dumps(res).lower()
    for row in ('same_location', 'raw', 'dve', 'no_cluster', 'sce', 'paper'):     # every baseline row, and the paper's numbers
        assert row in text, f"results.json has no {row!r} row"
    md = (rep / 'report.md').read_text()
    figs = re.findall(r'!\[[^\]]*\]\((figures/[^)]+)\)', md)
    assert 'figures/pipeline.png' in figs and 'figures/training.png' in figs and len(figs) >= 3
    for f in figs: assert (rep / f).is_file(), f
    for word in ("## The paper's point", 'Ours: landmark matching', 'Paper (not this run)', '## Time per stage',
                 'git commit', 'torch', 'seed', 'claim'):
        assert word in md, word
    timings = json.loads((rep / 'timings.json').read_text())
    assert set(NAMES) <= set(timings['stages'])
    checks = paper_point(res)
    assert len(checks) >= 3 and all(set(c) >= {'claim', 'ours', 'other', 'holds'} for c in checks)


def test_rerun_skips_every_finished_stage(run):
    out = run['out']
    before = _mtimes(out)
    t0 = time.time()
    r = _cli('--profile', 'smoke', '--out', str(out), '--no-progress')
    secs = time.time() - t0
    for name in NAMES: assert 'skipped' in _banner(r.stdout, name)
    assert _mtimes(out) == before
    st = json.loads((out / 'run.json').read_text())['invocations'][-1]['stages']
    assert {n: st[n]['action'] for n in NAMES} == {n: 'skipped' for n in NAMES}
    assert secs < max(60, run['seconds'] / 3), (secs, run['seconds'])


def test_only_deleted_stages_are_redone(run):
    out = run['out']
    old = load_checkpoint(out / 'refine_sce' / 'refined.pt')['projector']
    before = _mtimes(out)
    shutil.rmtree(out / 'eval'); (out / 'refine_sce' / 'refined.pt').unlink()
    assert run_status(out)['refine_sce'] == 'partial' and run_status(out)['evaluate'] == 'todo'
    r = _cli('--profile', 'smoke', '--out', str(out), '--no-progress')
    for name in ('pretrain', 'refine_no_cluster', 'refine_dve'): assert 'skipped' in _banner(r.stdout, name)
    assert 'resuming' in _banner(r.stdout, 'refine_sce') and 'skipped' not in _banner(r.stdout, 'evaluate')
    after = _mtimes(out)
    assert all(after[n] == before[n] for n in ('pretrain', 'refine_no_cluster', 'refine_dve'))
    new = load_checkpoint(out / 'refine_sce' / 'refined.pt')['projector']
    assert all(torch.equal(old[k], new[k]) for k in old)        # resumed from its final checkpoint: the same projector
    assert run_status(out) == {n: 'done' for n in NAMES} and (out / REPORT / 'results.json').is_file()


def test_another_profile_is_refused(run, capsys, tmp_path):
    out = run['out']
    with pytest.raises(SystemExit) as e:
        main(['--profile', 'demo', '--out', str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "holds a run of profile 'smoke'" in err and '--force' in err
    with pytest.raises(SystemExit):
        main(['--profile', 'smoke', '--seed', '1', '--out', str(out)])
    assert 'seed (0 there, 1 asked)' in capsys.readouterr().err
    (tmp_path / 'pretrain').mkdir(); (tmp_path / 'profile.json').write_text((out / 'profile.json').read_text())
    (tmp_path / 'keep.txt').write_text('not the run')
    check_run(tmp_path, load_profile('demo'), force=True, say=lambda s: None)
    assert sorted(x.name for x in tmp_path.iterdir()) == ['keep.txt']


def test_example_script(run):
    "examples/api_match.py (README's Python-API example) loads the run, matches a landmark, prints predicted and true."
    r = subprocess.run([sys.executable, str(REPO / 'examples' / 'api_match.py'), str(run['out']), '--landmark', '1'],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    num = r'\(([-\d.]+), ([-\d.]+)\)'
    pred = [float(x) for x in re.search(r'predicted in test image 1: ' + num, r.stdout).groups()]
    true = [float(x) for x in re.search(r'true: +' + num, r.stdout).groups()]
    err = float(re.search(r'error: ([\d.]+) px', r.stdout).group(1))
    assert all(-1 <= v <= 96 for v in pred + true)
    assert abs(err - ((pred[0] - true[0]) ** 2 + (pred[1] - true[1]) ** 2) ** 0.5) < 0.2


def test_diagnose_script(run, tmp_path):
    "examples/diagnose_run.py scores every row of the run on a validation split and refuses the training seed."
    ex, j = str(REPO / 'examples' / 'diagnose_run.py'), tmp_path / 'diag.json'
    r = subprocess.run([sys.executable, ex, str(run['out']), '--n', '8', '--json', str(j)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(j.read_text())
    assert {k.split(':')[-1] for k in d} == {'same_location', 'raw MAE', 'sce', 'no_cluster', 'dve'}
    assert d['same_location']['followed'] == 0.0 and all(0 <= v['different'] < 100 for v in d.values())
    assert all(v['position_r2'] <= 1 and -1 <= v['silhouette'] <= 1 for k, v in d.items() if k != 'same_location')
    r = subprocess.run([sys.executable, ex, str(run['out']), '--seed', '0'], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and 'training faces' in r.stderr


def _toy_shipped(src: Path, root: Path, name='toy') -> Path:
    "A shipped-backbone folder `root/name` made of a run's stage-1 files, as `sce_mae/backbones/course/` is laid out."
    from sce_mae.runtime import file_sha256
    d = root / name; d.mkdir(parents=True)
    for f in ('mae.pt', 'log.json'): shutil.copyfile(src / f, d / f)
    (d / 'SHA256SUMS').write_text(''.join(f"{file_sha256(d / f)}  {f}\n" for f in ('mae.pt', 'log.json')))
    return d


def test_a_shipped_backbone_is_copied_not_trained(run, tmp_path, monkeypatch):
    "A profile naming a shipped backbone starts stage 2 from it: stage 1 is copied (same bytes), the report names it."
    import sce_mae.pretrain as P
    from sce_mae.runtime import file_sha256
    from sce_mae.reproduce import reproduce
    src = _toy_shipped(run['out'] / 'pretrain', tmp_path / 'shipped')
    monkeypatch.setattr(P, 'backbones_dir', lambda: tmp_path / 'shipped')
    out, said = tmp_path / 'run', []
    reproduce(load_profile('smoke').replace(backbone='toy'), out, progress=False, say=said.append)
    assert "shipped 'toy' backbone" in _banner('\n'.join(said), 'pretrain')
    assert file_sha256(out / 'pretrain' / 'mae.pt') == file_sha256(src / 'mae.pt')
    st = json.loads((out / 'run.json').read_text())['invocations'][-1]['stages']
    assert st['pretrain']['action'] == 'copied' and 'data' in st          # frames rendered for stage 2 only
    assert run_status(out) == {n: 'done' for n in NAMES}
    md = (out / REPORT / 'report.md').read_text()
    assert "shipped `toy` backbone" in md and '--from-scratch' in md


def test_a_damaged_or_unfit_shipped_backbone_fails_before_any_work(run, tmp_path, monkeypatch, capsys):
    import sce_mae.pretrain as P
    src = _toy_shipped(run['out'] / 'pretrain', tmp_path / 'shipped')
    monkeypatch.setattr(P, 'backbones_dir', lambda: tmp_path / 'shipped')
    from sce_mae.reproduce import reproduce
    with pytest.raises(ValueError, match='does not match profile'):                 # smoke weights, demo widths
        reproduce(load_profile('demo').replace(backbone='toy'), tmp_path / 'r1', progress=False, say=lambda s: None)
    with open(src / 'mae.pt', 'r+b') as f: f.truncate(100)
    with pytest.raises(P.BackboneError, match='does not match its SHA-256'):
        reproduce(load_profile('smoke').replace(backbone='toy'), tmp_path / 'r2', progress=False, say=lambda s: None)
    assert not (tmp_path / 'r2' / 'pretrain').exists()
    with pytest.raises(P.BackboneError, match="no shipped backbone 'nope'"):
        reproduce(load_profile('smoke').replace(backbone='nope'), tmp_path / 'r3', progress=False, say=lambda s: None)


def test_from_scratch_gets_its_own_run_folder():
    from sce_mae.reproduce import default_run, run_profile_for
    p = run_profile_for('demo', backbone='scratch')
    assert p.backbone == 'scratch' and load_profile('demo').backbone == 'course'
    assert default_run(p, 'scratch') == Path('runs') / 'demo-scratch' and default_run(load_profile('demo')) == Path('runs') / 'demo'
