"""Run the course and keep its outputs: every notebook of nbs/, in order, each top to bottom in a fresh
Python process and IPython shell (the shell nbdev-test runs them in), and its outputs written back into
the notebook, so that a reader on GitHub sees every figure, table and printed shape.

    python tools/course.py                  # every notebook (about 10 minutes on 2 cores)
    python tools/course.py 05 13            # only the notebooks whose names start with 05 or 13
    python tools/course.py --flags slow     # also run the #| slow cells (their outputs are kept too)
    python tools/course.py --gpu-chapters   # list the notebooks that hold #| gpu cells
    python tools/course.py --gpu-outputs D  # copy the #| gpu cells' outputs from the notebooks in D/nbs (a GPU run)

The cells nbdev-test skips stay skipped (`#| slow`, `#| gpu`, `#| notest`, unless --flags names them);
they keep no output. Figures are PNG at 72 dpi. The notebooks seed everything they draw, so a rerun on
the same machine gives the same figures and numbers (printed timings aside). Afterwards the notebooks
are cleaned (`nbdev-clean`: metadata and execution counts go, outputs stay), as `test.sh` expects.
"""
import argparse, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DPI = 72


def run_one(fn: Path, flags: list[str]) -> None:
    "Execute notebook `fn` in this process, the way nbdev-test does, and write its outputs back (only if every cell ran)."
    from execnb.shell import CaptureShell
    from fastcore.nbio import write_nb
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    skip = str(get_config().tst_flags).split()
    nb = NBProcessor(fn, rm_directives=False, process=True).nb
    shell = CaptureShell(fn, mpl_format=None)
    shell.enable_matplotlib('inline')
    shell._run("from matplotlib_inline.backend_inline import set_matplotlib_formats as _f; _f('jpeg', pil_kwargs={'quality': 85}); del _f")
    shell._run(f"import matplotlib as _mpl; _mpl.rcParams['figure.dpi'] = {DPI}; del _mpl")
    os.chdir(fn.parent)
    shell.run_all(nb, exc_stop=True, preproc=_skip_cell(nb, skip, flags))
    write_nb(nb, fn)


def is_gpu_cell(c) -> bool:
    "A code cell carrying nbdev's `#| gpu` directive (a line of its own), the flag the GPU run executes."
    return c['cell_type'] == 'code' and any(l.strip() == '#| gpu' for l in ''.join(c['source']).splitlines())


def gpu_chapters(nbs: Path = ROOT / 'nbs') -> list[Path]:
    "The notebooks of `nbs` that hold `#| gpu` cells: the chapters `tools/gpu_session.sh run` executes."
    import json
    return [f for f in sorted(nbs.glob('*.ipynb')) if any(is_gpu_cell(c) for c in json.loads(f.read_text())['cells'])]


def take_gpu_outputs(src: Path, dst: Path = ROOT / 'nbs') -> list[str]:
    "Copy the outputs of the `#| gpu` cells of the notebooks in `src` (same cell id, same source) into `dst`; -> the cells taken."
    from fastcore.nbio import read_nb, write_nb
    taken = []
    for fn in sorted(src.glob('*.ipynb')):
        mine = Path(dst) / fn.name
        if not mine.is_file(): continue
        theirs = {c.get('id'): c for c in read_nb(fn).cells}
        nb, changed = read_nb(mine), False
        for c in nb.cells:
            t = theirs.get(c.get('id'))
            if is_gpu_cell(c) and t is not None and t.source == c.source and t.get('outputs'):
                c['outputs'] = t['outputs']; changed = True; taken.append(f"{fn.name}#{c['id']}")
        if changed: write_nb(nb, mine)
    return taken


def main(argv=None):
    ap = argparse.ArgumentParser(description="Run every notebook of the course in order and keep its outputs.")
    ap.add_argument('only', nargs='*', help='run only the notebooks whose names start with these (e.g. 05 13)')
    ap.add_argument('--flags', default='', help='space-separated cell flags to run as well (e.g. "slow")')
    ap.add_argument('--threads', type=int, default=1, help='math threads of each notebook (default 1, as test.sh)')
    ap.add_argument('--gpu-outputs', default=None, metavar='DIR',
                    help="copy the #| gpu cells' outputs from DIR/nbs (gpu_session.sh's notebooks, unpacked) into nbs/")
    ap.add_argument('--gpu-chapters', action='store_true', help='list the notebooks that hold #| gpu cells, and stop')
    ap.add_argument('--one', default=None, help=argparse.SUPPRESS)          # internal: run this one notebook here
    a = ap.parse_args(argv)
    if a.gpu_chapters:
        return print('\n'.join(str(f.relative_to(ROOT)) for f in gpu_chapters()))
    if a.gpu_outputs:
        src = Path(a.gpu_outputs) / 'nbs'
        if not src.is_dir(): ap.error(f"--gpu-outputs: no folder {src} (unpack gpu_notebooks.tar.gz into {a.gpu_outputs})")
        taken = take_gpu_outputs(src)
        subprocess.run(['nbdev-clean'], cwd=ROOT, check=True)
        print(f"{len(taken)} #| gpu cell outputs taken: {', '.join(taken) or 'none'}")
        return
    if a.one:
        return run_one(Path(a.one), a.flags.split())
    nbs = sorted((ROOT / 'nbs').glob('*.ipynb'), key=lambda f: (f.name != 'index.ipynb', f.name))
    if a.only:
        nbs = [f for f in nbs if any(f.name.startswith(o) for o in a.only)]
        if not nbs: ap.error(f"no notebook of nbs/ starts with {' or '.join(a.only)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    env.pop('MPLBACKEND', None)                                             # the shell's inline backend draws the figures
    t_all, failed = time.time(), []
    for i, fn in enumerate(nbs, 1):
        t0 = time.time()
        print(f"[{i}/{len(nbs)}] {fn.name} ...", end=' ', flush=True)
        r = subprocess.run([sys.executable, __file__, '--one', str(fn), '--flags', a.flags], env=env, cwd=ROOT)
        print(f"{'ok' if r.returncode == 0 else 'FAILED'} ({time.time() - t0:.0f} s)", flush=True)
        if r.returncode: failed.append(fn.name)
    subprocess.run(['nbdev-clean'], cwd=ROOT, check=True)
    print(f"{len(nbs) - len(failed)} of {len(nbs)} notebooks ran in {(time.time() - t_all) / 60:.1f} min; outputs kept"
          + (f"; FAILED (outputs unchanged): {', '.join(failed)}" if failed else ''))
    if failed: sys.exit(1)


if __name__ == '__main__':
    main()
