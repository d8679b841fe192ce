"""Why does (or doesn't) a SynthFaces run beat the same-location baseline? Diagnostics on a validation split.

    python examples/diagnose_run.py runs/demo [OTHER_RUN ...] [--n 400] [--seed 1]

The validation split is SynthFaces' *train* split drawn with another seed (`--seed`, default 1): faces
that neither training (seed 0) nor the test split ever saw, so nothing here tunes on the test split.
For each run and each feature row (raw MAE, the three projectors) it prints, on `--n` images in
DVE's matching protocol (paper matcher, px of the 70x70 frame):
- same / different: the matching errors;
- followed: how far the different-identity matches move with the true landmarks (0 = they stay at
  the reference position like the same-location baseline, 1 = they follow the landmark);
- position R2: how well a linear map reads each cell's position off its feature;
- silhouette: how well the landmark descriptors cluster by landmark.
"""
import argparse, json
import torch
from sce_mae.mae import load_mae
from sce_mae.refine import load_refined
from sce_mae.dense import DenseFeatures
from sce_mae.synth import SynthFaces
from sce_mae.matching import matching_views, matching_eval, same_location_baseline, displacement_followed
from sce_mae.results import position_r2, landmark_descriptors, silhouette

ap = argparse.ArgumentParser(description='Validation-split diagnostics of SynthFaces runs (never the test split).')
ap.add_argument('runs', nargs='+', help='run folders written by sce-mae-reproduce')
ap.add_argument('--n', type=int, default=400, help='validation images (pairs of 2; default 400)')
ap.add_argument('--seed', type=int, default=1, help='SynthFaces seed of the validation faces (training used 0)')
ap.add_argument('--stride', type=int, default=4, help='cover-and-stride step (default 4)')
ap.add_argument('--json', default=None, help='also write the numbers to this JSON file')
a = ap.parse_args()
if a.seed == 0: ap.error('--seed 0 draws the training faces; use another seed for a validation split')

val = SynthFaces(a.n, split='train', seed=a.seed)
views, out = None, {}
print(f"{'run':24s} {'row':11s} {'same':>6s} {'diff':>6s} {'followed':>8s} {'pos R2':>7s} {'silh.':>6s}")
for run in a.runs:
    mae = load_mae(f'{run}/pretrain/mae.pt')
    if views is None:
        views = matching_views(val, mae.profile, n=a.n, seed=0, progress=False)
        sl = same_location_baseline(views=views)['same_location']
        ref, gt = views['lms1'][views['pairs'][:, 0]], views['lms2'][views['pairs'][:, 1]]   # different identity
        print(f"{'(validation split)':24s} {'same-loc.':11s} {sl['same']:6.2f} {sl['different']:6.2f} {0:8.2f}")
        out['same_location'] = dict(same=sl['same'], different=sl['different'], followed=0.0)
    rows = {'raw MAE': DenseFeatures(mae, None, stride=a.stride)}
    for mode in ('sce', 'no_cluster', 'dve'):
        try: m2, proj = load_refined(f'{run}/refine_{mode}/refined.pt')
        except FileNotFoundError: continue
        rows[mode] = DenseFeatures(m2, proj, stride=a.stride, which='stage2')
    for name, fn in rows.items():
        r = matching_eval(fn, views=views, matcher='paper', progress=False, return_points=True)
        with torch.no_grad(): maps = fn(views['img1'][:min(100, a.n)])
        desc, lab = landmark_descriptors(maps, views['lms1'][:len(maps)], mae.profile.img_size)
        row = dict(same=r['paper']['same'], different=r['paper']['different'],
                   followed=displacement_followed(r['points']['paper']['different'], ref, gt),
                   position_r2=position_r2(maps), silhouette=silhouette(desc, lab))
        out[f'{run}:{name}'] = row
        print(f"{run[-24:]:24s} {name:11s} {row['same']:6.2f} {row['different']:6.2f} {row['followed']:8.2f} "
              f"{row['position_r2']:7.3f} {row['silhouette']:6.3f}", flush=True)
if a.json: open(a.json, 'w').write(json.dumps(out, indent=1))
