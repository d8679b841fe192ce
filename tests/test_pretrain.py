"Pretraining: schedule, optimiser groups, exact resume (also after a SIGKILL), DDP on 2 CPU processes = 1 process, the CLI."
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from sce_mae.config import load_profile
from sce_mae.runtime import load_checkpoint, seed_everything
from conftest import write_settings
from sce_mae.mae import MAE, load_mae
from sce_mae.pretrain import pretrain_lr, make_optimizer, pretrain, bench_pretrain, official_step
from sce_mae.training import warmup_cosine, param_groups, load_frames, step_draws, epoch_order, augment

# a profile small enough for subprocess tests: smoke's keys with a 2-block, 32-wide ViT on 16 faces
TINY = dict(n_train=16, embed_dim=32, depth=2, num_heads=2, dec_embed_dim=16, dec_depth=1, dec_num_heads=2,
            pre_epochs=2, pre_batch=8, pre_warmup_epochs=1, split_block=2)


@pytest.fixture(scope='module')
def settings(tmp_path_factory):
    "A settings.ini with an extra [tiny] profile (smoke's values with TINY's), for the command-line tests."
    return write_settings(tmp_path_factory.mktemp('settings'), tiny=('smoke', TINY), tiny_long=('smoke', {**TINY, 'pre_epochs': 30}))


def _env(settings, **kw):
    return {**os.environ, 'SCE_MAE_SETTINGS': str(settings), 'PYTHONUNBUFFERED': '1', **kw}


def _cli():
    exe = shutil.which('sce-mae-pretrain')
    assert exe, 'sce-mae-pretrain is not installed: pip install -e . --no-deps'
    return exe


def _tiny(**kw):
    return load_profile('smoke', **{**TINY, **kw})


def test_warmup_cosine():
    lrs = [warmup_cosine(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and max(lrs) == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3
    assert warmup_cosine(100, 100, 10, 1.0, min_lr=0.1) == pytest.approx(0.1)
    assert warmup_cosine(0, 10, 0, 2.0) == pytest.approx(2.0)
    assert pretrain_lr(load_profile('deit_tiny')) == pytest.approx(3e-4)


def test_no_decay_on_norms_biases_tokens():
    m = MAE('smoke')
    opt = make_optimizer(m, load_profile('smoke'))
    name = {id(w): n for n, w in m.named_parameters()}
    dec, nodec = ({name[id(w)] for w in g['params']} for g in opt.param_groups)
    assert opt.param_groups[0]['weight_decay'] == 0.05 and opt.param_groups[1]['weight_decay'] == 0.0
    assert {'cls_token', 'mask_token', 'norm.weight', 'norm.bias', 'blocks.1.norm2.weight', 'decoder_pred.bias'} <= nodec
    assert {'blocks.0.attn.qkv.weight', 'patch_embed.proj.weight', 'decoder_pred.weight'} <= dec
    assert 'pos_embed' not in dec | nodec and 'decoder_pos_embed' not in dec | nodec  # frozen
    assert opt.param_groups[0]['betas'] == (0.9, 0.95)


def test_step_randomness_is_a_function_of_seed_epoch_step():
    p = _tiny()
    a, b = step_draws(3, 1, 2, 8, p), step_draws(3, 1, 2, 8, p)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['noise'], step_draws(3, 1, 3, 8, p)['noise'])
    assert not torch.equal(a['noise'], step_draws(4, 1, 2, 8, p)['noise'])
    assert torch.equal(epoch_order(0, 2, 50), epoch_order(0, 2, 50)) and not torch.equal(epoch_order(0, 2, 50), epoch_order(0, 3, 50))
    fr = torch.randint(0, 256, (8, 3, 136, 136), dtype=torch.uint8)
    x = augment(fr, a['off'], a['fac'], 96)
    assert x.shape == (8, 3, 96, 96) and x.min() >= 0 and x.max() <= 1


def test_frames_are_uint8_full_frames():
    p = _tiny()
    fr = load_frames(p, progress=False)
    assert fr.shape == (16, 3, 136, 136) and fr.dtype == torch.uint8
    from sce_mae.synth import SynthFaces
    want = (SynthFaces(16, 'train', seed=0, full=True)[5]['img'] * 255).round().to(torch.uint8)
    assert torch.equal(fr[5], want)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_equals_uninterrupted(tmp_path):
    p = _tiny()
    fr = load_frames(p, progress=False)
    straight = load_mae(pretrain(p, tmp_path / 'a', frames=fr, progress=False))
    ck = pretrain(p, tmp_path / 'b', frames=fr, stop_after=1, progress=False)
    c = load_checkpoint(ck)
    assert (c['epoch'], c['step']) == (1, 2) and not (tmp_path / 'b' / 'mae.pt').exists()
    assert set(c) >= {'model', 'optimizer', 'epoch', 'step', 'rng', 'profile', 'seed', 'log'}
    with pytest.raises(FileExistsError, match='pass resume=True'): pretrain(p, tmp_path / 'b', frames=fr, progress=False)
    with pytest.raises(ValueError, match='belongs to another run'): pretrain(p, tmp_path / 'b', frames=fr, seed=5, resume=True, progress=False)
    resumed = load_mae(pretrain(p, tmp_path / 'b', frames=fr, resume=True, progress=False))
    assert _same_weights(straight, resumed)
    la, lb = (json.loads((tmp_path / d / 'log.json').read_text()) for d in 'ab')
    assert la['steps'] == lb['steps'] and len(la['steps']) == 4 and len(la['epochs']) == 2
    other = load_mae(pretrain(p, tmp_path / 'c', frames=fr, seed=1, progress=False))
    assert not _same_weights(straight, other)


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, settings):
    "SIGKILL a real run once its first checkpoint is written, resume it: the same weights as a run never killed."
    env = _env(settings, OMP_NUM_THREADS='1')
    epochs = 30  # tiny_long: 30 epochs of 2 steps
    args = [_cli(), '--profile', 'tiny_long', '--device', 'cpu', '--out']
    proc = subprocess.Popen(args + [str(tmp_path / 'killed')], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ck = tmp_path / 'killed' / 'checkpoint.pt'
    t0 = time.time()
    while not ck.exists() and proc.poll() is None and time.time() - t0 < 300: time.sleep(0.02)
    proc.send_signal(signal.SIGKILL); out = proc.communicate()[0].decode()
    assert ck.exists(), out
    assert not (tmp_path / 'killed' / 'mae.pt').exists(), 'the run finished before it could be killed'
    killed_at = load_checkpoint(ck)['epoch']
    assert 1 <= killed_at < epochs
    r = subprocess.run(args + [str(tmp_path / 'killed'), '--resume'], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(args + [str(tmp_path / 'straight')], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    a, b = load_mae(tmp_path / 'straight' / 'mae.pt'), load_mae(tmp_path / 'killed' / 'mae.pt')
    assert a.profile.pre_epochs == epochs and _same_weights(a, b)


def test_ddp_two_cpu_processes_match_one(tmp_path, settings):
    "torchrun, gloo, 2 processes x 4 images vs 1 process x 8 images: the same loss at every step."
    env = _env(settings, OMP_NUM_THREADS='1')
    base = ['--profile', 'tiny', '--device', 'cpu', '--out']
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
                        _cli()] + base + [str(tmp_path / 'ddp')], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([_cli()] + base + [str(tmp_path / 'one')], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ddp, one = (json.loads((tmp_path / d / 'log.json').read_text()) for d in ('ddp', 'one'))
    assert (ddp['world_size'], one['world_size']) == (2, 1)
    ld, lo = [s['loss'] for s in ddp['steps']], [s['loss'] for s in one['steps']]
    assert len(ld) == len(lo) == 4
    assert ld == pytest.approx(lo, rel=1e-4, abs=1e-5)
    a, b = load_mae(tmp_path / 'ddp' / 'mae.pt'), load_mae(tmp_path / 'one' / 'mae.pt')
    for (k, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(wa, wb, atol=1e-4), k


def test_cli_smoke_run(tmp_path):
    "README's CI command: the smoke profile end to end."
    t0 = time.time()
    r = subprocess.run([_cli(), '--profile', 'smoke', '--out', str(tmp_path / 'run')], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith('mae.pt')
    p = load_profile('smoke')
    log = json.loads((tmp_path / 'run' / 'log.json').read_text())
    assert len(log['steps']) == p.pre_epochs * (p.n_train // p.pre_batch) and len(log['epochs']) == p.pre_epochs
    m = load_mae(tmp_path / 'run' / 'mae.pt')
    assert m.profile == p
    with torch.no_grad(): e = m.encode(torch.rand(2, 3, 96, 96), attn_block=p.split_block)
    assert e.tokens.shape == (2, 144, p.embed_dim) and e.attn.shape == (2, 144)
    r = subprocess.run([_cli(), '--profile', 'smoke', '--out', str(tmp_path / 'run')], capture_output=True, text=True)
    assert r.returncode != 0 and '--resume' in r.stderr
    print(f'smoke CLI run: {time.time() - t0:.0f} s')


def test_cli_needs_out():
    r = subprocess.run([_cli(), '--profile', 'smoke'], capture_output=True, text=True)
    assert r.returncode == 2 and '--out DIR is required' in r.stderr


def test_official_step_and_bench_reports():
    p = load_profile('smoke')
    seed_everything(0)
    m = MAE(p)
    opt = torch.optim.AdamW(param_groups(m, p.pre_weight_decay), lr=1e-3)
    x = torch.rand(4, 3, 96, 96)
    losses = [official_step(m, opt, x, p.mask_ratio).item() for _ in range(4)]
    assert losses[-1] < losses[0] and all(q.grad is None for q in m.parameters())
    r = bench_pretrain('smoke', steps=2, batch=4, rounds=1, warmup=1, verbose=False)
    assert r['ours'] > 0 and r['official'] > 0 and r['ratio'] == pytest.approx(r['ours'] / r['official'])
    assert r['peak_gflop_s'] > 0 and 0 < r['pct_peak'] < 100 and len(r['load_average']) == 3
