"""Match one landmark of one face into another face with a trained SCE-MAE run, through the Python API.

    python examples/api_match.py runs/demo                   # a run folder written by sce-mae-reproduce
    python examples/api_match.py runs/demo --landmark 2 --pair 5
"""
import argparse
from pathlib import Path
from sce_mae.datasets import get_dataset
from sce_mae.dense import dense_from_checkpoint
from sce_mae.matching import match_points, FRAME

ap = argparse.ArgumentParser(description='Match one landmark between two faces with an SCE-MAE checkpoint.')
ap.add_argument('run', type=Path, help='run folder (refine_sce/refined.pt, pretrain/mae.pt)')
ap.add_argument('--landmark', type=int, default=0, help='landmark index (5-point order: 0 = left eye)')
ap.add_argument('--pair', type=int, default=0, help='match test image 2k into test image 2k+1 (a different face)')
ap.add_argument('--root', default=None, help='data root, for a real evaluation dataset')
a = ap.parse_args()

# 1. The checkpoint as a dense feature extractor: the frozen MAE encoder and the SCE-MAE projector,
#    every token through the projector, cover-and-stride for a denser map.
feats = dense_from_checkpoint(a.run / 'refine_sce' / 'refined.pt', device='cpu')
prof = feats.mae.profile

# 2. Two faces of the evaluation set: records with 'img' (3, 96, 96) in [0, 1] and 'lms' (5, 2) pixels (x, y).
test = get_dataset(prof.eval_dataset, 'test', root=a.root, n=2 * a.pair + 2, size=prof.img_size)
src, dst = test[2 * a.pair], test[2 * a.pair + 1]

# 3. Dense features of each image: (1, C, 96/stride, 96/stride).
fa, fb = feats(src['img'][None]), feats(dst['img'][None])

# 4. Match: the source landmark's descriptor against every position of the target (bilinear
#    upsampling, cosine similarity, best position), as the paper's matching protocol does.
query = src['lms'][None, a.landmark:a.landmark + 1]                # (1, 1, 2)
pred = match_points(fa, fb, query, matcher='paper', size=prof.img_size)[0, 0]
true = dst['lms'][a.landmark]
err = float((pred - true).norm())

names = getattr(test, 'landmark_names', None)
name = f' ({names[a.landmark]})' if names is not None and a.landmark < len(names) else ''
print(f"run {a.run}: profile {prof.name!r}, features {tuple(fa.shape[1:])} per image")
print(f"landmark {a.landmark}{name} of test image {2 * a.pair} at ({query[0, 0, 0]:.1f}, {query[0, 0, 1]:.1f})")
print(f"predicted in test image {2 * a.pair + 1}: ({pred[0]:.1f}, {pred[1]:.1f})")
print(f"true:                       ({true[0]:.1f}, {true[1]:.1f})")
print(f"error: {err:.2f} px of the {prof.img_size} px image ({err * FRAME / prof.img_size:.2f} px in DVE's 70x70 frame)")
