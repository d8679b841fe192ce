"Shared pytest fixtures: the repository root and the real data, which tests skip cleanly without."
import configparser, os
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='session')
def repo() -> Path:
    return REPO


@pytest.fixture(scope='session')
def mtfl_root() -> Path:
    "The real MTFL folder from $SCE_MAE_DATA (the folder itself or its parent); skips when absent."
    env = os.environ.get('SCE_MAE_DATA')
    if not env: pytest.skip('real data: set SCE_MAE_DATA (CI points it at ../shared/data)')
    p = Path(env)
    for cand in (p / 'mtfl', p):
        if (cand / 'testing.txt').is_file() and (cand / 'training.txt').is_file(): return cand
    pytest.skip(f'real data: no MTFL (training.txt, testing.txt) under {p}')


def write_settings(folder: Path, **profiles) -> Path:
    "A copy of the kit's settings.ini in `folder` with extra profiles {name: (base profile, {key: value})}, base values first."
    from sce_mae.config import settings_path
    cp = configparser.ConfigParser()
    cp.read(settings_path())
    for name, (base, values) in profiles.items():
        cp[name] = {**dict(cp[base]), **{k: str(v) for k, v in values.items()}}
    f = Path(folder) / 'my-settings.ini'
    with open(f, 'w') as fh: cp.write(fh)
    return f
