"Profiles: the DeiT-T values of method.md, errors that name file, section and choices, and lookup from anywhere."
import os, subprocess, sys, textwrap
from pathlib import Path
import pytest
from sce_mae.config import load_profile, profile_names, settings_path, ProfileError, Profile


def test_packaged_settings_identical_to_top_level(repo):
    top, pkg = repo / 'settings.ini', repo / 'sce_mae' / 'settings.ini'
    assert pkg.read_text() == top.read_text(), 'sce_mae/settings.ini differs: run `cp settings.ini sce_mae/settings.ini`'


def test_deit_tiny_matches_method_md():
    p = load_profile('deit_tiny')
    assert (p.embed_dim, p.depth, p.num_heads, p.patch_size, p.img_size) == (192, 12, 3, 8, 96)
    assert (p.pre_epochs, p.pre_batch, p.pre_warmup_epochs, p.mask_ratio) == (400, 512, 40, 0.75)
    assert (p.pre_beta1, p.pre_beta2, p.pre_weight_decay) == (0.9, 0.95, 0.05)
    assert (p.dec_embed_dim, p.dec_depth, p.dec_num_heads) == (512, 8, 16)
    assert (p.eta, p.k_c, p.dpc_k, p.tau, p.split_block, p.proj_dim) == (0.1, 4, 5, 0.1, 3, 64)
    assert (p.lambda_aa, p.lambda_ap, p.lambda_pp) == (5.0, 5.0, 2.0)
    assert (p.dataset, p.eval_dataset) == ('celeba', 'mafl')
    assert (p.tps_global, p.tps_local, p.tps_trans, p.tps_scale, p.tps_rot, p.tps_grid) == (0.0005, 0.005, 0.05, 0.05, 2.5, 10)
    assert (p.det_lr, p.det_wd, p.det_n_kp) == (1e-3, 5e-4, 50)


def test_paper_backbones():
    s, b = load_profile('deit_small'), load_profile('deit_base')
    assert (s.embed_dim, s.num_heads, s.eta, s.proj_dim) == (384, 6, 0.1, 128)
    assert (b.embed_dim, b.num_heads, b.eta, b.proj_dim) == (768, 12, 0.25, 256)


def test_every_profile_loads_and_is_consistent():
    names = profile_names()
    assert {'smoke', 'demo', 'cpu_real', 'deit_tiny', 'deit_small', 'deit_base'} <= set(names)
    for n in names:
        p = load_profile(n)
        assert p.embed_dim % p.num_heads == 0 and p.dec_embed_dim % p.dec_num_heads == 0, n
        assert p.img_size % p.patch_size == 0 and p.frame_size >= p.img_size, n
        assert 1 <= p.split_block <= p.depth, n
        assert p.patch_size % p.eval_stride == 0, n
        assert p.match_images % 2 == 0, n


def test_unknown_profile_lists_choices():
    with pytest.raises(ProfileError) as e: load_profile('nope')
    msg = str(e.value)
    assert 'nope' in msg and str(settings_path()) in msg
    for n in ('smoke', 'demo', 'cpu_real', 'deit_tiny', 'deit_small', 'deit_base'): assert n in msg


def _variant(tmp_path, extra):
    f = tmp_path / 'settings.ini'
    f.write_text(settings_path().read_text().replace('[demo]\n', f'[demo]\n{extra}\n', 1))
    return f


def test_wrong_type_names_file_section_and_key(tmp_path):
    f = _variant(tmp_path, 'seed = 1.5')
    with pytest.raises(ProfileError, match=r'\[demo\]: seed = \'1.5\' is not a valid int') as e:
        load_profile('demo', path=f)
    assert str(f) in str(e.value)


def test_unknown_key_lists_known_keys(tmp_path):
    f = _variant(tmp_path, 'pre_epoch = 3')
    with pytest.raises(ProfileError, match='unknown key.*pre_epoch;.*known keys:.*pre_epochs'):
        load_profile('demo', path=f)


def test_bool_and_list_types(tmp_path):
    with pytest.raises(ProfileError, match='norm_pix_loss'): load_profile('demo', path=_variant(tmp_path, 'norm_pix_loss = maybe'))
    with pytest.raises(ProfileError, match='limited_sizes'): load_profile('demo', path=_variant(tmp_path, 'limited_sizes = 1, two'))
    assert load_profile('demo', path=_variant(tmp_path, 'norm_pix_loss = no')).norm_pix_loss is False


def test_env_profile(monkeypatch):
    monkeypatch.setenv('SCE_MAE_PROFILE', 'smoke')
    assert load_profile().name == 'smoke'
    monkeypatch.delenv('SCE_MAE_PROFILE')
    assert load_profile().name == 'demo'


CHECK = "from sce_mae.config import load_profile, settings_path; print(load_profile('deit_tiny').embed_dim, settings_path())"


@pytest.mark.parametrize('where', ['.', 'nbs', 'tests', '/'])
def test_found_from_any_working_directory(repo, where):
    cwd = repo / where if where != '/' else Path('/')
    out = subprocess.run([sys.executable, '-c', CHECK], cwd=cwd, capture_output=True, text=True, check=True).stdout
    assert out.startswith('192 ')


def test_cli_prints_deit_tiny(repo):
    out = subprocess.run([sys.executable, '-c', "from sce_mae.config import load_profile; print(load_profile('deit_tiny'))"],
                         capture_output=True, text=True, check=True).stdout
    assert "Profile 'deit_tiny'" in out and 'embed_dim' in out and '= 192' in out


def test_non_editable_wheel_ships_profiles(repo, tmp_path):
    "Build the wheel, install it (not editable) into a private folder, and load a profile from it."
    wheels, site = tmp_path / 'wheels', tmp_path / 'site'
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '-q', '-w', str(wheels), str(repo)],
                   check=True, cwd=tmp_path, capture_output=True)
    whl = next(wheels.glob('sce_mae-*.whl'))
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '-q', '--target', str(site), str(whl)],
                   check=True, cwd=tmp_path, capture_output=True)
    env = {**os.environ, 'PYTHONPATH': str(site)}
    env.pop('SCE_MAE_SETTINGS', None)
    out = subprocess.run([sys.executable, '-c', CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == '192'
    assert Path(out.split()[1]).resolve() == (site / 'sce_mae' / 'settings.ini').resolve()


def test_runtime_dependencies_import():
    "torch, torchvision and timm must import together (a CPU-only torch with PyPI's torchvision does not)."
    out = subprocess.run([sys.executable, '-c', 'import torch, torchvision, timm, sklearn, matplotlib, tqdm; print("ok")'],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == 'ok', out.stderr[-2000:]
