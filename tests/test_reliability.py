"""What a demanding user runs into, case by case (README, "Reliability"): finished stages are not rewritten, caches are
keyed by their inputs, bad values are refused early with one line naming file and key, damaged files are named, copied
runs use their own files, leftovers of killed runs are cleaned, `--settings` works in every command."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
from conftest import write_settings
from sce_mae.datasets import make_fixture
from sce_mae.refine import load_refined

BIN = Path(sys.executable).parent
TINY = dict(n_train=16, embed_dim=32, depth=2, num_heads=2, dec_embed_dim=16, dec_depth=1, dec_num_heads=2,
            pre_epochs=2, pre_batch=8, pre_warmup_epochs=1, split_block=2, proj_dim=16, ref_batch=8,
            match_images=8, det_train=16, det_epochs=1, det_batch=8, limited_sizes='1', limited_repeats=1, tsne_images=8)
DEAD = 2 ** 22 + 4321                                      # above Linux's default pid_max: no such process


def cli(tool, *args, settings=None, timeout=900):
    "Run `sce-mae-TOOL ARGS` (with `--settings` when given) -> CompletedProcess."
    extra = ['--settings', str(settings)] if settings is not None else []
    env = {**os.environ, 'MPLBACKEND': 'Agg'}
    env.pop('SCE_MAE_SETTINGS', None)
    return subprocess.run([str(BIN / f'sce-mae-{tool}'), *map(str, args), *extra], capture_output=True, text=True,
                          env=env, timeout=timeout)


def one_line_error(r, tool, *words):
    "Exit status 2, one line `sce-mae-TOOL: error: ...` holding `words`, no traceback."
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert 'Traceback' not in r.stderr and err and err[-1].startswith(f'sce-mae-{tool}: error: '), r.stderr[-2000:]
    for w in words: assert w in err[-1], (w, err[-1])


@pytest.fixture(scope='module')
def settings(tmp_path_factory):
    "A settings file of its own (not the kit's) with a [tiny] profile: `--settings` is how every command reads it."
    return write_settings(tmp_path_factory.mktemp('settings'), tiny=('smoke', TINY), bad=('smoke', {**TINY, 'pre_epochs': -1}))


@pytest.fixture(scope='module')
def run(settings, tmp_path_factory):
    "A whole tiny run made by `sce-mae-reproduce --settings FILE --profile tiny`."
    out = tmp_path_factory.mktemp('rel') / 'run'
    r = cli('reproduce', '--profile', 'tiny', '--out', out, '--no-progress', settings=settings)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def copy_run(run, dst):
    shutil.copytree(run, dst)
    return dst


def test_settings_option_in_every_command(settings, run, tmp_path):
    assert json.loads((run / 'profile.json').read_text())['name'] == 'tiny'
    for tool in ('pretrain', 'refine', 'evaluate', 'reproduce'):
        assert '--settings FILE' in cli(tool, '--help').stdout, tool
    r = cli('pretrain', '--profile', 'tiny', '--out', tmp_path / 'p', settings=settings)
    assert r.returncode == 0 and (tmp_path / 'p' / 'mae.pt').is_file(), r.stderr[-2000:]
    one_line_error(cli('pretrain', '--profile', 'tiny', '--out', tmp_path / 'q', settings=tmp_path / 'none.ini'),
                   'pretrain', 'none.ini does not exist')


def test_resume_of_a_finished_stage_rewrites_nothing(settings, run, tmp_path):
    r2 = copy_run(run, tmp_path / 'run')
    files = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in r2.rglob('*.pt')}
    assert cli('pretrain', '--profile', 'tiny', '--out', r2 / 'pretrain', '--resume', settings=settings).returncode == 0
    assert cli('refine', '--profile', 'tiny', '--backbone', r2 / 'pretrain' / 'mae.pt', '--out', r2 / 'refine_sce',
               '--resume', settings=settings).returncode == 0
    assert {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in r2.rglob('*.pt')} == files
    r = cli('reproduce', '--profile', 'tiny', '--out', r2, '--no-progress', settings=settings)
    assert r.returncode == 0 and r.stdout.count('done already') == 5, r.stdout[-2000:] + r.stderr[-2000:]


def test_profile_values_are_range_checked_before_any_work(settings, tmp_path):
    r = cli('pretrain', '--profile', 'bad', '--out', tmp_path / 'x', settings=settings)
    one_line_error(r, 'pretrain', f'{settings} [bad]: pre_epochs = -1 is out of range')
    assert not (tmp_path / 'x').exists()


@pytest.mark.parametrize('tool', ['pretrain', 'refine', 'evaluate', 'reproduce'])
def test_bad_device_is_one_line_before_loading_data(tool, run, tmp_path):
    args = dict(pretrain=['--out', tmp_path / 'x'], refine=['--backbone', run / 'pretrain' / 'mae.pt', '--out', tmp_path / 'x'],
                evaluate=['--ckpt', run], reproduce=['--out', tmp_path / 'x'])[tool]
    one_line_error(cli(tool, '--profile', 'smoke', '--device', 'nonsense', *args, timeout=60), tool, "unknown device 'nonsense'")
    import torch
    if not torch.cuda.is_available():
        one_line_error(cli(tool, '--profile', 'smoke', '--device', 'cuda', *args, timeout=60), tool, 'CUDA is not available')
    one_line_error(cli(tool, '--profile', 'nope', *args, timeout=60), tool, "unknown profile 'nope'")
    assert not (tmp_path / 'x').exists()


def test_damaged_checkpoints_are_named_not_blamed_on_the_backbone(settings, run, tmp_path):
    r2 = copy_run(run, tmp_path / 'run')
    mae = r2 / 'pretrain' / 'mae.pt'
    mae.write_bytes(mae.read_bytes()[:1000])
    r = cli('reproduce', '--profile', 'tiny', '--out', r2, '--no-progress', settings=settings)
    one_line_error(r, 'reproduce', f'{mae} is damaged', 'delete it and rerun')
    assert 'another backbone' not in r.stderr and (r2 / 'refine_sce' / 'refined.pt').is_file()
    one_line_error(cli('refine', '--profile', 'tiny', '--backbone', mae, '--out', tmp_path / 'y', settings=settings),
                   'refine', f'{mae} is damaged')
    mae.unlink()                                          # as advised: the stage is recomputed from its checkpoint
    r = cli('reproduce', '--profile', 'tiny', '--out', r2, '--no-progress', settings=settings)
    assert r.returncode == 0 and mae.read_bytes() == (run / 'pretrain' / 'mae.pt').read_bytes(), r.stderr[-2000:]
    (r2 / 'refine_dve' / 'refined.pt').write_bytes(b'')
    one_line_error(cli('evaluate', '--ckpt', r2, '--out', tmp_path / 'ev', settings=settings), 'evaluate', 'is damaged')


def test_broken_data_root_and_readonly_out_fail_before_the_first_step(settings, tmp_path):
    broken = make_fixture('mtfl', tmp_path / 'data').parent
    (broken / 'mtfl' / 'testing.txt').unlink()             # the training faces are there, the test annotation is not
    r = cli('reproduce', '--profile', 'tiny', '--dataset', 'mtfl', '--root', broken, '--out', tmp_path / 'r',
            '--no-progress', settings=settings, timeout=120)
    one_line_error(r, 'reproduce', 'testing.txt')
    assert not (tmp_path / 'r' / 'pretrain').exists()
    if os.geteuid() != 0:
        ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o500)
        for tool, extra in (('reproduce', ['--no-progress']), ('pretrain', [])):
            one_line_error(cli(tool, '--profile', 'tiny', '--out', ro / 'run', *extra, settings=settings, timeout=120),
                           tool, f'output folder {ro / "run"} cannot be written')
        ro.chmod(0o700)


def test_evaluation_caches_follow_the_data_root(settings, run, tmp_path):
    r2 = copy_run(run, tmp_path / 'run')
    roots = [make_fixture('mtfl', tmp_path / f'fx{s}', n=8, seed=s).parent for s in (0, 1)]
    out = tmp_path / 'ev'
    res = []
    for i, root in enumerate(roots):
        r = cli('evaluate', '--ckpt', r2, '--dataset', 'mtfl', '--root', root, '--out', out, '--quiet',
                *(['--overwrite'] if i else []), settings=settings)
        assert r.returncode == 0, r.stderr[-3000:]
        res.append(json.loads((out / 'results.json').read_text()))
    assert len(list((out / 'cache').glob('views-*.pt'))) == 2              # one set of views per root, none reused
    a, b = (x['matching']['rows']['same_location']['paper']['different'] for x in res)
    assert a != b
    r = cli('evaluate', '--ckpt', r2, '--dataset', 'mtfl', '--root', roots[0], '--out', out, settings=settings)
    one_line_error(r, 'evaluate', 'holds an evaluation already', '--overwrite')


def test_copied_run_uses_its_own_backbone(run, tmp_path):
    r2 = copy_run(run, tmp_path / 'copy')
    (run / 'pretrain' / 'mae.pt').rename(run / 'pretrain' / 'mae.pt.away')  # the original's backbone is gone
    try:
        mae, proj = load_refined(r2 / 'refine_sce' / 'refined.pt')
        assert proj is not None
    finally:
        (run / 'pretrain' / 'mae.pt.away').rename(run / 'pretrain' / 'mae.pt')


def test_leftovers_of_killed_runs_are_removed(settings, tmp_path):
    out = tmp_path / 'p'; out.mkdir()
    (out / f'.checkpoint.pt.{DEAD}.tmp').write_bytes(b'partial')
    r = cli('pretrain', '--profile', 'tiny', '--out', out, settings=settings)
    assert r.returncode == 0 and sorted(f.name for f in out.iterdir()) == ['checkpoint.pt', 'log.json', 'mae.pt']
