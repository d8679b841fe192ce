"The MAE beyond notebook 04: the count against timm, every CPU profile's widths, failure cases, foreign weight layouts."
import pytest
import torch
from sce_mae.config import load_profile
from sce_mae.runtime import seed_everything
from sce_mae.mae import MAE, encoder_param_count, load_mae, load_vit_state_dict, sincos_pos_embed, WeightLoadError
from timm.models.vision_transformer import VisionTransformer


@pytest.fixture(scope='module')
def smoke():
    seed_everything(0)
    return MAE('smoke').eval()


@pytest.fixture(scope='module')
def imgs():
    return torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def test_count_matches_timm_vit():
    p = load_profile('deit_tiny')
    with torch.device('meta'):
        vit = VisionTransformer(img_size=96, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=0)
        mae = MAE(p)
    assert encoder_param_count(mae) == sum(w.numel() for w in vit.parameters())


def test_cpu_profiles_build_with_profile_widths():
    for name in ('smoke', 'demo', 'cpu_real'):
        p = load_profile(name)
        with torch.device('meta'): m = MAE(name)
        assert (len(m.blocks), m.blocks[0].attn.num_heads, m.cls_token.shape[-1]) == (p.depth, p.num_heads, p.embed_dim)
        assert (len(m.decoder_blocks), m.mask_token.shape[-1]) == (p.dec_depth, p.dec_embed_dim)


def test_positions_fixed_sincos(smoke):
    assert not smoke.pos_embed.requires_grad and not smoke.decoder_pos_embed.requires_grad
    assert torch.equal(smoke.pos_embed[0], sincos_pos_embed(64, 12))
    with pytest.raises(ValueError, match='multiple of 4'): sincos_pos_embed(30, 12)


def test_input_errors(smoke, imgs, tmp_path):
    with pytest.raises(ValueError, match=r'expected images \(B, 3, 96, 96\), got \(4, 3, 64, 64\)'): smoke(imgs[..., :64, :64])
    with pytest.raises(ValueError, match='not normalised'): smoke.encode(smoke.normalise(imgs))
    with pytest.raises(ValueError, match='dtype torch.uint8'): smoke.encode((imgs * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r'noise must be \(4, 144\)'): smoke(imgs, noise=torch.rand(4, 10))
    torch.save({'weights': 1}, tmp_path / 'other.pt')
    with pytest.raises(WeightLoadError, match='not an sce-mae checkpoint'): load_mae(tmp_path / 'other.pt')


def test_official_mae_layout_with_decoder(smoke):
    sd = {'model': {k: v.clone() + 1 for k, v in smoke.state_dict().items()}, 'optimizer': {}, 'epoch': 399}
    m = MAE('smoke')
    info = load_vit_state_dict(m, sd)
    assert info['decoder'] is True
    assert torch.equal(m.decoder_pred.weight, smoke.decoder_pred.weight + 1)
    ddp = {'module.' + k: v for k, v in smoke.state_dict().items()}
    assert load_vit_state_dict(MAE('smoke'), ddp)['decoder'] is True


def test_wrong_state_dicts_name_keys_and_shapes(smoke):
    vit16 = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=4, num_heads=2, num_classes=0)
    with pytest.raises(WeightLoadError) as e: load_vit_state_dict(MAE('smoke'), vit16.state_dict(), source='vit16.pth')
    msg = str(e.value)
    assert 'vit16.pth does not fit' in msg
    assert 'shape mismatch patch_embed.proj.weight: given (64, 3, 16, 16) vs model (64, 3, 8, 8)' in msg
    assert 'shape mismatch pos_embed: given (1, 197, 64) vs model (1, 145, 64)' in msg
    sd = {k: v for k, v in smoke.state_dict().items() if k not in ('blocks.2.attn.qkv.weight', 'decoder_norm.bias')}
    sd['reg_token'] = torch.zeros(1, 4, 64)
    with pytest.raises(WeightLoadError) as e: load_vit_state_dict(MAE('smoke'), sd)
    msg = str(e.value)
    assert 'missing keys (2): blocks.2.attn.qkv.weight, decoder_norm.bias' in msg and 'unexpected keys (1): reg_token' in msg
    wide = VisionTransformer(img_size=96, patch_size=8, embed_dim=96, depth=4, num_heads=2, num_classes=0)
    with pytest.raises(WeightLoadError, match=r'blocks\.0\.attn\.qkv\.weight: given \(288, 96\) vs model \(192, 64\)'):
        load_vit_state_dict(MAE('smoke'), wide.state_dict())
