#!/usr/bin/env bash
# The kit's GPU checks in one run that fits a short lease of one CUDA GPU (about 10 minutes):
# the speed figures README's GPU table asks for, then the #| gpu cells of every chapter that holds one,
# their outputs kept. Nothing is fetched on the GPU machine: what it lacks travels as wheels.
#
#   bash tools/gpu_session.sh prepare      # here, with PyPI: the wheels the GPU image lacks, into .whl/ (git-ignored)
#   bash tools/gpu_session.sh plan         # anywhere: the chapters whose #| gpu cells the run executes
#   bash tools/gpu_session.sh run [OUT]    # on the GPU machine, from the repository root (OUT: $OUT, else gpu_out/)
#
# `run` writes OUT/gpu_session.log (everything printed), OUT/gpu_bench.json (the measurements) and
# OUT/gpu_notebooks.tar.gz (the chapters as they ran: CPU cells on the CPU, #| gpu cells on CUDA). Back on
# the development machine, `python tools/course.py --gpu-outputs DIR` copies the #| gpu cells' outputs from
# the unpacked notebooks of DIR into nbs/ (the CPU cells keep the reference machine's outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-plan}

# The GPU image's Python (3.12) has torch, timm, numpy, scipy, scikit-learn, matplotlib, pillow and tqdm;
# it lacks nbdev (and fastcore, execnb, IPython and what they need). These it has already: skip them.
PRESENT='anyio build h11 idna packaging psutil pygments pyyaml setuptools six typing_extensions wheel'
NBDEV='nbdev==3.3.26'

gpu_chapters() { python3 tools/course.py --gpu-chapters; }

case "$what" in
prepare)
  rm -rf .whl && mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$NBDEV" matplotlib-inline
  for p in $PRESENT; do rm -f .whl/"$p"-*.whl .whl/"${p//_/-}"-*.whl; done
  echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/: carry .whl and run 'bash tools/gpu_session.sh run'"
  ;;
plan)
  gpu_chapters
  ;;
run)
  out=${2:-${OUT:-gpu_out}}; mkdir -p "$out"; out=$(cd "$out" && pwd)
  exec > >(tee "$out/gpu_session.log") 2>&1
  t0=$SECONDS
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PATH="/tmp/site/bin:$PATH"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__, torch.cuda.get_device_name())"

  echo "== measurements ($((SECONDS - t0)) s)"
  timeout 240 python3 - "$out/gpu_bench.json" <<'EOF' || echo "measurements: FAILED or timed out (rc $?)"
import json, sys
from sce_mae.pretrain import bench_pretrain
from sce_mae.refine import bench_refine
from sce_mae.evaluate import bench_matching
res, path = {}, sys.argv[1]
def keep(k, v): res[k] = v; open(path, 'w').write(json.dumps(res, indent=1, default=str))
for w in ('deit_tiny', 'deit_small', 'deit_base'):       # stage 1, bf16 autocast; compile on DeiT-T
    keep(f'pretrain_{w}', bench_pretrain(w, steps=12, batch=256, device='cuda', compile=w == 'deit_tiny'))
r = res['pretrain_deit_tiny']
print(f"the paper's 400 CelebA epochs (162,770 faces) of DeiT-T at {r['ours']:.0f} img/s: {400 * 162770 / r['ours'] / 3600:.2f} h "
      f"(compiled {r['compiled']:.0f} img/s: {400 * 162770 / r['compiled'] / 3600:.2f} h)")
keep('refine_deit_tiny', bench_refine('deit_tiny', steps=10, batch=256, device='cuda'))
for amp in (False, True):                                  # stride-4 matching, 1,000 SynthFaces test images, views included
    b = bench_matching('deit_tiny', 'synth', n=1000, stride=4, device='cuda', amp=amp, batch=250)
    keep(f'matching_deit_tiny_amp{int(amp)}', b)
    print(f"matching, stride 4, amp={amp}: {b['total_s']:.1f} s (views {b['data_and_views_s']:.1f} s, features {b['features_s']:.1f} s "
          f"= {b['pct_peak']:.0f} % of the {'bf16' if amp else 'float32'} peak, matching {b['match_s']:.1f} s)")
EOF

  echo "== the #| gpu cells ($((SECONDS - t0)) s)"
  chapters=$(gpu_chapters | xargs -n1 basename | sed 's/\.ipynb$//')
  # CPU cells run on the CPU, as on the reference machine; the #| gpu cells name CUDA themselves
  SCE_MAE_DEVICE=cpu timeout 330 python3 tools/course.py $chapters --flags gpu --threads 8 || echo "gpu cells: FAILED or timed out (rc $?)"
  tar czf "$out/gpu_notebooks.tar.gz" $(gpu_chapters)
  echo "== done in $((SECONDS - t0)) s"
  ;;
*)
  echo "usage: bash tools/gpu_session.sh prepare | plan | run [OUT]" >&2; exit 2
  ;;
esac
