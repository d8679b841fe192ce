"Stage 2 refinement: the CLI on a smoke backbone, resume == uninterrupted, every mode learns, backbone identity, DVE loss by hand."
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
from sce_mae.config import load_profile
from sce_mae.runtime import load_checkpoint, seed_everything
from sce_mae.pretrain import pretrain
from sce_mae.training import load_frames, augment, step_draws
from sce_mae.carb import Projector
from sce_mae.mae import cell_centres
from sce_mae.refine import (mode_names, stage2_batch, refine_step, make_refine_optimizer, refine, load_refined, dve_loss,
                            file_sha256, main)


@pytest.fixture(scope='module')
def p():
    return load_profile('smoke')


@pytest.fixture(scope='module')
def frames(p):
    return load_frames(p, progress=False)


@pytest.fixture(scope='module')
def backbone(p, frames, tmp_path_factory):
    "A smoke backbone: the smoke pretraining on the smoke frames (one epoch of it, to keep the test short)."
    return pretrain(p.replace(pre_epochs=1), tmp_path_factory.mktemp('pre'), frames=frames, progress=False)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_smoke_run(p, backbone, frames, tmp_path, capsys):
    "`sce-mae-refine --profile smoke --backbone mae.pt --out DIR` runs, writes its three files, refuses to overwrite them."
    out = tmp_path / 'cli'
    exe = shutil.which('sce-mae-refine') or str(Path(sys.executable).parent / 'sce-mae-refine')
    r = subprocess.run([exe, '--profile', 'smoke', '--backbone', str(backbone), '--out', str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(out / 'refined.pt')
    assert sorted(x.name for x in out.iterdir()) == ['checkpoint.pt', 'log.json', 'refined.pt']
    log = json.loads((out / 'log.json').read_text())
    assert (log['mode'], len(log['steps'])) == ('sce', p.ref_epochs * (p.n_train // p.ref_batch))
    ck = load_checkpoint(out / 'refined.pt')
    assert ck['backbone_sha256'] == file_sha256(backbone) and ck['profile'] == p.to_dict()
    mae, proj = load_refined(out / 'refined.pt')
    assert (proj.fc1.in_features, proj.fc2.out_features, proj.training) == (p.embed_dim, p.proj_dim, False)
    with pytest.raises(SystemExit) as e:
        main(['--profile', 'smoke', '--backbone', str(backbone), '--out', str(out)])
    assert e.value.code == 2 and 'pass resume=True (--resume)' in capsys.readouterr().err


@pytest.mark.parametrize('mode', mode_names())
def test_each_mode_learns_on_a_fixed_batch(p, backbone, frames, mode):
    from sce_mae.mae import load_mae
    mae = load_mae(backbone).requires_grad_(False)
    imgs = augment(frames[:8], step_draws(0, 0, 0, 8, p)['off'], torch.ones(8, 3), p.img_size)
    batch = stage2_batch(mae, imgs, p, mode, pair_seed=0)
    seed_everything(0)
    proj = Projector(p.embed_dim, p.proj_dim)
    opt = make_refine_optimizer(proj, p)
    losses = [refine_step(proj, opt, batch, 3e-3, p).item() for _ in range(8)]
    assert losses[-1] < losses[0] and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize('mode', mode_names())
def test_resume_equals_uninterrupted(p, backbone, frames, tmp_path, mode):
    tiny = p.replace(n_train=16, ref_batch=8, ref_epochs=2, ref_warmup_epochs=1)
    fr = frames[:16]
    a = load_refined(refine(tiny, backbone, tmp_path / 'a', mode=mode, frames=fr, progress=False))[1]
    ck = refine(tiny, backbone, tmp_path / 'b', mode=mode, frames=fr, stop_after=1, progress=False)
    assert ck.name == 'checkpoint.pt' and load_checkpoint(ck)['epoch'] == 1
    assert not (tmp_path / 'b' / 'refined.pt').exists()
    b = load_refined(refine(tiny, backbone, tmp_path / 'b', mode=mode, frames=fr, resume=True, progress=False))[1]
    assert _same(a, b)
    la, lb = (json.loads((tmp_path / x / 'log.json').read_text()) for x in 'ab')
    assert la['steps'] == lb['steps'] and len(la['steps']) == 4
    with pytest.raises(ValueError, match='is a finished run of another profile'):
        refine(tiny.replace(tau=0.2), backbone, tmp_path / 'b', mode=mode, frames=fr, resume=True, progress=False)
    (tmp_path / 'b' / 'refined.pt').unlink()                 # unfinished: the checkpoint is checked
    with pytest.raises(ValueError, match='belongs to another run'):
        refine(tiny.replace(tau=0.2), backbone, tmp_path / 'b', mode=mode, frames=fr, resume=True, progress=False)


def test_backbone_identity(p, backbone, frames, tmp_path):
    tiny = p.replace(n_train=16, ref_batch=16)
    run = tmp_path / 'runs'
    shutil.copytree(backbone.parent, run / 'pre')
    f = refine(tiny, run / 'pre' / 'mae.pt', run / 'ref', frames=frames[:16], progress=False)
    moved = tmp_path / 'moved'
    shutil.move(run, moved)                                # the stored absolute path is gone, the relative one works
    mae, proj = load_refined(moved / 'ref' / 'refined.pt')
    other = pretrain(p.replace(n_train=16, pre_batch=16, pre_epochs=1), tmp_path / 'other', frames=frames[:16], progress=False)
    with pytest.raises(ValueError, match='is not the one this projector was trained on'):
        load_refined(moved / 'ref' / 'refined.pt', backbone=other)
    (moved / 'pre' / 'mae.pt').unlink()
    with pytest.raises(FileNotFoundError, match='pass backbone=PATH'):
        load_refined(moved / 'ref' / 'refined.pt')
    with pytest.raises(ValueError, match="does not match profile 'demo'"):
        refine('demo', backbone, tmp_path / 'x', frames=frames)
    with pytest.raises(ValueError, match="unknown mode 'lcr'"):
        refine(p, backbone, tmp_path / 'y', mode='lcr', frames=frames)


def test_dve_loss_by_hand():
    cc = cell_centres(12, 8)
    N = len(cc)
    onehot = torch.eye(N).expand(3, N, N)
    assert dve_loss(onehot, onehot, cc.expand(3, N, 2), cc).item() == pytest.approx(0, abs=1e-6)
    assert dve_loss(onehot, onehot, cc.expand(3, N, 2) + torch.tensor([0., 8]), cc).item() == pytest.approx(8 ** 0.5, abs=1e-5)
    # exchange routes the match through the next image of the batch: an uninformative (constant) neighbour ruins it
    const = torch.full((N, N), 1.0)
    phi1, phi2 = torch.stack([onehot[0], const]), onehot[:2]
    t = cc.expand(2, N, 2)
    no_ex, ex = dve_loss(phi1, phi2, t, cc, exchange=False).item(), dve_loss(phi1, phi2, t, cc, exchange=True).item()
    assert ex > no_ex + 1 and no_ex > 1
    phi = torch.randn(2, N, 8, requires_grad=True)
    dve_loss(phi, phi.detach().flip(1), cc.expand(2, N, 2), cc).backward()
    assert phi.grad is not None and torch.isfinite(phi.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('mode', mode_names())
def test_refine_on_cuda(p, backbone, frames, tmp_path, mode):
    f = refine(p.replace(n_train=32, ref_batch=16), backbone, tmp_path, mode=mode, frames=frames[:32], device='cuda', progress=False)
    log = json.loads((tmp_path / 'log.json').read_text())
    assert len(log['steps']) == 2 and all(torch.isfinite(torch.tensor([s['loss'] for s in log['steps']])))
    mae, proj = load_refined(f, map_location='cuda')
    assert next(proj.parameters()).device.type == 'cuda' and next(mae.parameters()).device.type == 'cuda'
