"Notebooks run through a real Jupyter kernel (nbclient + ipykernel), as JupyterLab runs them."
from pathlib import Path
import nbformat, pytest
from nbclient import NotebookClient


@pytest.mark.parametrize('name', ['index.ipynb', '00_config.ipynb'])
def test_notebook_runs_in_kernel(repo, name):
    nb = nbformat.read(repo / 'nbs' / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(repo / 'nbs')}}).execute()
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.get('output_type') == 'error']
    assert not errors
    assert any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'the notebook produced no output at all'
