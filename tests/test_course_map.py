"The course map: README.md and nbs/index.ipynb list the same notebooks with the same words, and every notebook of nbs/."
import json, re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def course_rows(text: str) -> list[tuple[str, str, str]]:
    "(notebook, module, what it teaches) of every row of the course table in `text`."
    return [tuple(c.strip() for c in m) for m in re.findall(r'^\| `(\w+)` \| *`?(\w*)`? *\| (.+?) \|$', text, re.M)]


def test_readme_and_index_agree_with_the_notebooks():
    readme = [r for r in course_rows((ROOT / 'README.md').read_text()) if r[0] != 'index']
    index = course_rows(''.join(''.join(c['source']) for c in json.loads((ROOT / 'nbs' / 'index.ipynb').read_text())['cells']))
    assert readme == index, 'README.md and nbs/index.ipynb list different course tables'
    assert [r[0] for r in readme] == sorted(p.stem for p in (ROOT / 'nbs').glob('*.ipynb') if p.stem != 'index')
    for nb, module, _ in readme:
        if module:
            assert (ROOT / 'sce_mae' / f'{module}.py').is_file(), f'{nb}: no module sce_mae/{module}.py'
            exp = json.loads((ROOT / 'nbs' / f'{nb}.ipynb').read_text())['cells']
            assert any(f'#| default_exp {module}' in ''.join(c['source']) for c in exp), f'{nb} does not export {module}'
