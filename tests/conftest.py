"Shared pytest fixtures: the repository root and the real data, which tests skip cleanly without."
import os
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
