"""The stage-1 study: what makes the backbone's features follow the landmarks? Trials on validation data only.

    python examples/study.py stage1 NAME [--profile demo] [--set KEY=VALUE ...] [--eval-at 2,4] [--save-at 4]
                                         [--enc-pos 1.0] [--rope 0] [--target pix|hog] [--data synth|mtfl --root PATH]
    python examples/study.py stage2 MAE_PT [--profile demo] [--set ...] [--modes sce,dve] [same variant flags]
    python examples/study.py detection MAE_PT --data mtfl --root PATH [--refined DIR] [--det-at 5,10,15,20]
    python examples/study.py report runs/study [--figure docs/figures/study_scaling.png]

`stage1` pretrains a backbone with the profile's recipe (plus `--set` overrides) into `--out/NAME`
(default runs/study) and, after the epochs of `--eval-at` (default: the last), prints one JSON line of
raw-feature matching on the validation views: different- and same-identity error (paper matcher, px of
the 70x70 frame, stride 4), the fraction of the true displacement the matches follow, and the position R2
of the features; `b0` is the last block after the final norm, `b3` block 3. `--save-at` keeps a `mae_eK.pt`.
`stage2` refines projectors on such a `mae_eK.pt` (the profile's stage-2 recipe) and prints the same
numbers for raw and refined features. `detection` reads the landmark regressor's schedule: a regressor
trained on the profile's `det_train` faces drawn from the rows before `--holdout`, its error (% of the
inter-ocular distance) on the held-out rows after each epoch of `--det-at`. Everything lands in `NAME/res.json` too. `report` gathers the
`res.json` files of a study folder into one JSON (stdout) and draws the scaling figure.

Validation views, never the test split:
- synth: SynthFaces' train split drawn with seed 1 (training uses seed 0), its first `--nv` images;
- mtfl: MTFL's LFW/web training rows from `--holdout` on (default 9000); the backbone must train on fewer
  rows (`--set n_train=9000`), so the validation faces are never seen in training.
Both get DVE's two TPS views (seed 0), as in the matching protocol.

Study-only variants (not part of the kit's model; they patch `sce_mae.mae.MAE` inside this process):
`--enc-pos S` scales the encoder's position embedding (0 = none), `--rope BASE` adds 2-D rotary position
codes to the encoder's attention, `--target hog` regresses per-patch HOG (MaskFeat) instead of pixels.
"""
import argparse, json, math, time
from pathlib import Path
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from sce_mae.config import load_profile
from sce_mae.runtime import load_checkpoint, cache_dir
from sce_mae import mae as M
from sce_mae.mae import MAE, load_mae, save_mae
from sce_mae.pretrain import pretrain
from sce_mae.training import load_frames
from sce_mae.refine import refine, load_refined
from sce_mae.dense import DenseFeatures
from sce_mae.matching import matching_views, match_points, match_errors, displacement_followed, same_location_baseline
from sce_mae.results import position_r2


def variants(a):
    "Patch MAE for the study-only variants of `a` (encoder position scale, 2-D RoPE, HOG target)."
    if a.enc_pos != 1.0:
        def _embed(self, imgs):
            x = self.patch_embed(self.normalise(imgs)) + a.enc_pos * self.pos_embed[:, 1:]
            return x, self.cls_token + self.pos_embed[:, :1]
        MAE._embed = _embed
    if a.rope: _rope(a.rope)
    if a.target == 'hog': _hog()


def _rope(base: float):
    "2-D rotary position codes on the encoder's patch queries and keys (y on one half of each head, x on the other)."
    from timm.models.vision_transformer import Attention
    state = {}
    def rot(t, cos, sin):
        t1, t2 = t.chunk(2, -1)
        return t * cos + torch.cat([-t2, t1], -1) * sin
    def set_pos(pos, hd, g):                                   # pos (B, L): grid indices of the tokens
        q = hd // 4
        fr = base ** (-torch.arange(q) / q)
        ang = torch.cat([(pos // g)[..., None] * fr, (pos % g)[..., None] * fr], -1)
        ang = torch.cat([ang, ang], -1)[:, None]                # (B, 1, L, hd)
        state['cs'] = (ang.cos(), ang.sin())
    def att_fwd(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        cs = state.get('cs') if getattr(self, '_rope', False) else None
        if cs is not None:
            cos, sin, h = *cs, self.head_dim // 2
            def r2(t):
                p = t[:, :, 1:]
                p = torch.cat([rot(p[..., :h], cos[..., :h], sin[..., :h]), rot(p[..., h:], cos[..., h:], sin[..., h:])], -1)
                return torch.cat([t[:, :, :1], p], 2)
            q, k = r2(q), r2(k)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
    Attention.forward = att_fwd
    init0, encode0 = MAE.__init__, MAE.encode
    def init(self, *aa, **kk):
        init0(self, *aa, **kk)
        for b in self.blocks: b.attn._rope = True
    def forward_encoder(self, imgs, mask_ratio, generator=None, noise=None):
        x, cls = self._embed(imgs)
        x, mask, ids_restore = M.random_masking(x, mask_ratio, generator, noise)
        set_pos(torch.argsort(ids_restore, 1)[:, :x.shape[1]], self.blocks[0].attn.head_dim, self.profile.grid)
        x = torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1)
        try:
            for blk in self.blocks: x = blk(x)
        finally: state['cs'] = None
        return self.norm(x), mask, ids_restore
    def encode(self, imgs, *aa, **kk):
        set_pos(torch.arange(self.profile.n_tokens)[None].expand(len(imgs), -1), self.blocks[0].attn.head_dim, self.profile.grid)
        try: return encode0(self, imgs, *aa, **kk)
        finally: state['cs'] = None
    MAE.__init__, MAE.forward_encoder, MAE.encode = init, forward_encoder, encode


def _hog(bins: int = 9, cell: int = 4):
    "MaskFeat's target: per-patch histograms of oriented gradients (per colour channel, 4x4-pixel cells), L2-normalised."
    def target(self, imgs):
        B, C, S, _ = imgs.shape
        x = F.pad(imgs, (1, 1, 1, 1), mode='replicate')
        gx, gy = x[..., 1:-1, 2:] - x[..., 1:-1, :-2], x[..., 2:, 1:-1] - x[..., :-2, 1:-1]
        mag, ang = (gx ** 2 + gy ** 2).sqrt(), torch.atan2(gy, gx) % math.pi
        b = (ang / math.pi * bins).long().clamp_(0, bins - 1)
        h = torch.zeros(B, C, bins, S, S).scatter_(2, b[:, :, None], mag[:, :, None])
        h = F.avg_pool2d(h.flatten(1, 2), cell) * cell * cell
        g, r = S // self.patch, self.patch // cell
        h = h.view(B, C * bins, g, r, g, r).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)
        return h / (h.norm(dim=-1, keepdim=True) + 1e-6) * h.shape[-1] ** 0.5
    init0 = MAE.__init__
    def init(self, *aa, **kk):
        init0(self, *aa, **kk)
        self.decoder_pred = torch.nn.Linear(self.profile.dec_embed_dim, 3 * bins * (self.profile.patch_size // cell) ** 2)
    MAE.target, MAE.__init__ = target, init


def validation_views(a, p) -> dict:
    "DVE's TPS views of the validation faces (cached in the kit's cache folder)."
    path = cache_dir() / f'study-views-{a.data}-{a.holdout}-{a.nv}.pt'
    if path.is_file(): return load_checkpoint(path)
    if a.data == 'synth':
        from sce_mae.synth import SynthFaces
        ds = SynthFaces(a.nv, split='train', seed=1, size=p.img_size)
    else:
        from sce_mae.datasets import get_dataset
        train = get_dataset(a.data, 'train', a.root, size=p.img_size, full=True)
        ds = Subset(train, range(a.holdout, len(train)))          # the held-out rows
    return matching_views(ds, p, n=a.nv, seed=0, path=path)


def match_row(fn, views, prefix='', r2: bool = False) -> dict:
    "Different / same-identity errors and the followed fraction of `fn`'s features on the views (`r2`: and the position R2 of the first 100 maps)."
    pr, ot, S = views['pairs'][:, 0], views['pairs'][:, 1], views['size']
    with torch.no_grad(): f1, f2 = fn(views['img1']), fn(views['img2'])
    pd = match_points(f1[pr], f2[ot], views['lms1'][pr], 'paper', S)
    ps = match_points(f1[pr], f2[pr], views['lms1'][pr], 'paper', S)
    row = {f'{prefix}different': round(float(match_errors(pd, views['lms2'][ot], S).mean()), 3),
           f'{prefix}same': round(float(match_errors(ps, views['lms2'][pr], S).mean()), 3),
           f'{prefix}followed': round(displacement_followed(pd, views['lms1'][pr], views['lms2'][ot]), 3)}
    if r2: row['pos_r2'] = round(position_r2(f1[:100]), 3)
    return row


class BlockFeatures(DenseFeatures):
    "Raw stage-1 features of block `block` (before the final norm), L2-normalised, by cover-and-stride."
    def __init__(self, mae, block: int, stride: int = 4):
        super().__init__(mae, None, stride=stride); self.block = block
    def token_maps(self, imgs):
        return F.normalize(self.mae.encode(imgs, blocks=(self.block,)).blocks[self.block].float(), dim=-1)


def stage1(a, p, views, out):
    res = dict(kind='stage1', name=a.name, profile=p.name, set=a.kw, variants=dict(enc_pos=a.enc_pos, rope=a.rope, target=a.target),
               data=a.data, threads=a.threads, same_location=_same_loc(views), date=time.strftime('%Y-%m-%d'), evals=[])
    frames = load_frames(p, root=a.root, progress=False)
    spe, t0, evals = len(frames) // p.pre_batch, time.time(), [int(x) for x in a.eval_at.split(',') if x] or [p.pre_epochs]
    def callback(epoch, model):
        if str(epoch) in a.save_at.split(','): save_mae(model, out / f'mae_e{epoch}.pt', epoch=epoch)
        if epoch not in evals: return
        te = time.time(); model.eval()
        row = dict(epoch=epoch, presentations=epoch * spe * p.pre_batch,
                   train_s=round(te - t0 - sum(e['eval_s'] for e in res['evals']), 1))
        row.update(match_row(DenseFeatures(model, None, stride=4), views, 'b0_', r2=True))   # the last block: the paper's raw features
        row.update(match_row(BlockFeatures(model, 3), views, 'b3_'))
        row['eval_s'] = round(time.time() - te, 1); model.train()
        res['evals'].append(row); print(json.dumps(row), flush=True)
        (out / 'res.json').write_text(json.dumps(res, indent=1))
    pretrain(p, out / 'pretrain', frames=frames, callback=callback, progress=False, resume=True)
    res['total_s'] = round(time.time() - t0, 1); (out / 'res.json').write_text(json.dumps(res, indent=1))


def stage2(a, p, views, out):
    mae = load_mae(a.name)
    res = dict(kind='stage2', mae=a.name, set=a.kw, variants=dict(enc_pos=a.enc_pos, rope=a.rope, target=a.target), lcr='two crops', data=a.data,
               same_location=_same_loc(views), date=time.strftime('%Y-%m-%d'), raw=match_row(DenseFeatures(mae, None, stride=4), views))
    print('raw', json.dumps(res['raw']), flush=True)
    frames = load_frames(p, root=a.root, progress=False)
    for mode in a.modes.split(','):
        t = time.time()
        m2, proj = load_refined(refine(p, a.name, out / f'refine_{mode}', mode=mode, frames=frames, progress=False, resume=True))
        res[mode] = dict(match_row(DenseFeatures(m2, proj, stride=4, which='stage2'), views), train_s=round(time.time() - t, 1))
        print(mode, json.dumps(res[mode]), flush=True)
    (out / 'res.json').write_text(json.dumps(res, indent=1))


def detection(a, p, views, out):
    "Regressor schedule on held-out training faces, for raw features and each refined mode of `--refined` (DIR/refine_MODE/refined.pt)."
    from sce_mae.datasets import get_dataset
    from sce_mae.detection import extract_features, train_regressor, predict, interocular_errors, draw_subset
    from sce_mae.results import head
    from sce_mae.evaluate import row_features
    if a.data == 'synth': raise SystemExit('study.py detection: real data only (--data mtfl --root PATH)')
    at = sorted(int(x) for x in a.det_at.split(','))
    crops = get_dataset(a.data, 'train', a.root, size=p.img_size)
    tr_ds = Subset(crops, draw_subset(a.holdout, p.det_train, 0).tolist())      # drawn from the rows before the held-out ones
    va_ds = Subset(crops, range(a.holdout, len(crops)))
    mae = load_mae(a.name)
    raw = DenseFeatures(mae, stride=p.eval_stride, which='stage1', l2=False)
    tr, va = (extract_features(raw, ds, p.det_batch, dtype=torch.float16, progress=False) for ds in (tr_ds, va_ds))
    rows = {'mae': None} | {m: load_refined(Path(a.refined) / f'refine_{m}' / 'refined.pt')[1] for m in (a.modes.split(',') if a.refined else [])}
    res = dict(kind='detection', mae=a.name, refined=a.refined, set=a.kw, data=a.data, n_train=len(tr_ds), n_val=len(va_ds),
               date=time.strftime('%Y-%m-%d'), threads=a.threads, rows={})
    for k, proj in rows.items():
        f_tr, f_va = (head(d['feats'], proj, row_features(k, 'detection'), dtype=torch.float16) for d in (tr, va))
        curve, t0 = {}, time.time()
        def read(epoch, reg):
            if epoch in at:
                curve[epoch] = round(float(interocular_errors(predict(reg, f_va, p.img_size), va['lms'], va['eyes']).mean()), 3)
        train_regressor(f_tr, tr['lms'], p, seed=0, epochs=at[-1], progress=False, callback=read)
        res['rows'][k] = dict(val_error=curve, train_s=round(time.time() - t0, 1))
        print(k, json.dumps(res['rows'][k]), flush=True)
        (out / 'res.json').write_text(json.dumps(res, indent=1))


def _same_loc(views) -> float:
    return round(same_location_baseline(views=views)['same_location']['different'], 3)


def collect(folder) -> list[dict]:
    "Every res.json of a study folder and of its groups (GROUP/NAME), stage-1 trials first, by name."
    fs = sorted(Path(folder).glob('*/res.json')) + sorted(Path(folder).glob('*/*/res.json'))   # trials, then trial groups
    rs = [json.loads(f.read_text()) | {'folder': f.parent.relative_to(folder).as_posix()} for f in fs]
    return sorted(rs, key=lambda r: (r['kind'] != 'stage1', r['folder']))


def plot_scaling(results: list[dict], curves: dict, title: str = 'stage-1 image presentations against matching'):
    """Different-identity matching error against stage-1 image presentations (log axis), one panel per dataset:
    raw MAE (last block) of the stage-1 runs named in `curves` {data: [folder, ...]}, SCE-MAE on their saved
    backbones, and the same-location answer."""
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 3.4), squeeze=False)
    by = {r['folder']: r for r in results}
    for ax, (data, names) in zip(axs[0], curves.items()):
        sl = None
        for name in names:
            r = by[name]; sl = r['same_location']
            ev = r['evals']
            ax.plot([e['presentations'] for e in ev], [e['b0_different'] for e in ev], 'o-', ms=3, label=f'raw MAE: {name}')
            s2 = [(int(x['mae'].split('_e')[-1].split('.')[0]), x) for x in results
                  if x['kind'] == 'stage2' and x.get('folder', '').startswith(name + '-') and 'sce' in x]
            if s2:
                spe = ev[0]['presentations'] // ev[0]['epoch']
                s2.sort(key=lambda t: t[0])
                lcr = s2[0][1].get('lcr', 'one crop')
                ax.plot([spe * e for e, _ in s2], [x['sce']['different'] for _, x in s2], 's--', ms=4, label=f'SCE-MAE ({lcr}): {name}')
        if sl is not None:
            ax.axhline(sl, color='k', ls=':', lw=1, label=f'same-location ({sl:.2f})')
            ax.axhline(0.7 * sl, color='gray', ls='--', lw=0.8, label='30 % below same-location')
        ax.set_xscale('log'); ax.set_xlabel('stage-1 image presentations'); ax.set_ylabel('different identity, px (70x70)')
        ax.set_title(f'{data} (validation)', fontsize=10); ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10); fig.tight_layout()
    return fig


def main(argv=None):
    ap = argparse.ArgumentParser(description='Stage-1 study trials on validation data (see the module docstring).')
    ap.add_argument('what', choices=('stage1', 'stage2', 'detection', 'report'))
    ap.add_argument('name', help='stage1: the trial name (its folder under --out); stage2: a mae_eK.pt; report: the study folder')
    ap.add_argument('--figure', default=None, help='report: write the scaling figure here')
    ap.add_argument('--curves', default='synth=L_synth,mtfl=L_mtfl', help='report: DATA=RUN[+RUN] panels of the figure')
    ap.add_argument('--profile', default='demo'); ap.add_argument('--set', nargs='*', default=[], metavar='KEY=VALUE')
    ap.add_argument('--out', default='runs/study'); ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--data', default='synth', help='synth or a real dataset (mtfl)'); ap.add_argument('--root', default=None)
    ap.add_argument('--holdout', type=int, default=9000, help='real data: first held-out training row')
    ap.add_argument('--nv', type=int, default=300, help='validation images (pairs of 2)')
    ap.add_argument('--eval-at', default='', help='epochs to evaluate after (default: the last)')
    ap.add_argument('--save-at', default='', help='epochs to keep a mae_eK.pt of')
    ap.add_argument('--modes', default='sce', help='stage2: refine modes; detection: the modes of --refined')
    ap.add_argument('--refined', default=None, help='detection: a folder with refine_MODE/refined.pt of the backbone')
    ap.add_argument('--det-at', default='5,10,15,20', help='detection: epochs to read the regressor after')
    ap.add_argument('--enc-pos', type=float, default=1.0); ap.add_argument('--rope', type=float, default=0.0)
    ap.add_argument('--target', default='pix', choices=('pix', 'hog'))
    a = ap.parse_args(argv)
    if a.what == 'report':
        res = collect(a.name)
        print(json.dumps(res, indent=1))
        if a.figure:
            curves = {k: v.split('+') for k, v in (c.split('=') for c in a.curves.split(','))}
            plot_scaling(res, curves).savefig(a.figure, dpi=110)
        return
    torch.set_num_threads(a.threads)
    p = load_profile(a.profile)
    a.kw = {}
    for s in a.set:
        k, _, v = s.partition('=')
        if not hasattr(p, k): ap.error(f'--set {s}: {a.profile} has no key {k!r}')
        a.kw[k] = v
    p = p.replace(**a.kw, dataset=a.data)
    if a.data != 'synth' and not 0 < (p.n_train or 10 ** 9) <= a.holdout:
        ap.error(f'--data {a.data}: train on rows before the held-out ones: --set n_train=N with N <= --holdout {a.holdout}')
    variants(a)
    views = validation_views(a, p)
    out = Path(a.out) / (a.name if a.what == 'stage1' else f'{Path(a.name).parent.name}-{Path(a.name).stem}-{a.what}')
    out.mkdir(parents=True, exist_ok=True)
    dict(stage1=stage1, stage2=stage2, detection=detection)[a.what](a, p, views, out)


if __name__ == '__main__':
    main()
