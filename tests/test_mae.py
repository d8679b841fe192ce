"The MAE: parameter counts, masking, the loss, encode() (shapes, attention = brute force, fused path), weight loading."
import math
import pytest
import torch
import torch.nn.functional as F
from sce_mae.config import load_profile, seed_everything
from sce_mae.mae import (MAE, Encoded, encoder_param_count, load_mae, load_vit_state_dict, save_mae, patchify,
                         unpatchify, random_masking, sincos_pos_embed, WeightLoadError)
from timm.models.vision_transformer import VisionTransformer


@pytest.fixture(scope='module')
def smoke():
    seed_everything(0)
    return MAE('smoke').eval()


@pytest.fixture(scope='module')
def imgs():
    return torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def test_paper_encoder_param_counts():
    "DeiT-T/S/B at 96x96, patch 8: 5.4M / 21.4M / 85.3M (the 145xD position table included)."
    got = {}
    for name in ('deit_tiny', 'deit_small', 'deit_base'):
        with torch.device('meta'): got[name] = round(encoder_param_count(MAE(name)) / 1e6, 1)
    assert got == {'deit_tiny': 5.4, 'deit_small': 21.4, 'deit_base': 85.3}


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


def test_patchify_roundtrip(imgs):
    x = patchify(imgs, 8)
    assert x.shape == (4, 144, 192) and torch.equal(unpatchify(x, 8), imgs)


def test_masking_per_image_and_deterministic(smoke, imgs):
    with torch.no_grad():
        l1, pred, m1 = smoke(imgs, generator=torch.Generator().manual_seed(5))
        l2, _, m2 = smoke(imgs, generator=torch.Generator().manual_seed(5))
    assert pred.shape == (4, 144, 192) and torch.equal(m1, m2) and l1.item() == l2.item()
    assert m1.sum(1).tolist() == [108.0] * 4 and not torch.equal(m1[0], m1[1])
    noise = torch.rand(4, 144, generator=torch.Generator().manual_seed(5))
    with torch.no_grad(): l3, _, m3 = smoke(imgs, noise=noise)
    assert torch.equal(m3, m1) and l3.item() == l1.item()  # the generator's draw is the noise
    with pytest.raises(ValueError, match=r'noise must be \(4, 144\)'): smoke(imgs, noise=noise[:, :10])


def test_loss_only_on_masked_patches(smoke, imgs):
    noise = torch.rand(4, 144, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(): _, pred, mask = smoke(imgs, noise=noise)
    t = patchify(imgs, 8).clone()
    vis = (mask == 0)
    t[vis] = torch.rand_like(t[vis])
    with torch.no_grad():
        assert torch.allclose(smoke.forward_loss(unpatchify(t, 8), pred, mask), smoke.forward_loss(imgs, pred, mask))


def test_input_errors(smoke, imgs):
    with pytest.raises(ValueError, match=r'expected images \(B, 3, 96, 96\), got \(4, 3, 64, 64\)'): smoke(imgs[..., :64, :64])
    with pytest.raises(ValueError, match='not normalised'): smoke.encode(smoke.normalise(imgs))
    with pytest.raises(ValueError, match='dtype torch.uint8'): smoke.encode((imgs * 255).to(torch.uint8))


def test_encode_shapes(smoke, imgs):
    with torch.no_grad(): e = smoke.encode(imgs, blocks=(1, 3, 4), attn_block=3)
    assert isinstance(e, Encoded)
    assert e.tokens.shape == (4, 144, 64) and e.cls.shape == (4, 64) and e.attn.shape == (4, 144)
    assert sorted(e.blocks) == [1, 3, 4] and all(v.shape == (4, 144, 64) for v in e.blocks.values())
    assert torch.allclose(smoke.norm(e.blocks[4]), e.tokens, atol=1e-6)  # blocks are before the final norm
    assert smoke.encode(imgs).attn is None and smoke.encode(imgs).blocks == {}
    with pytest.raises(ValueError, match=r'numbered 1\.\.4'): smoke.encode(imgs, blocks=(5,))
    with pytest.raises(ValueError, match=r'numbered 1\.\.4'): smoke.encode(imgs, attn_block=0)


def _brute_force(mae, imgs, b):
    x, cls = mae._embed(imgs)
    x = torch.cat([cls.expand(len(imgs), -1, -1), x], 1)
    for blk in mae.blocks[:b - 1]: x = blk(x)
    a = mae.blocks[b - 1].attn
    B, T, D = x.shape
    H = a.num_heads
    qkv = F.linear(mae.blocks[b - 1].norm1(x), a.qkv.weight, a.qkv.bias).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
    A = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(D // H), dim=-1)
    return A[:, :, 0, 1:].mean(1)


@pytest.mark.parametrize('b', [1, 3, 4])
def test_attention_equals_brute_force(smoke, imgs, b):
    with torch.no_grad():
        got = smoke.encode(imgs, attn_block=b).attn
        want = _brute_force(smoke, imgs, b)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert (got.sum(1) < 1).all()  # softmax over all 145 keys, patch entries kept


def test_tokens_come_from_fused_attention(smoke, imgs, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    with torch.no_grad():
        e0 = smoke.encode(imgs)
        e1 = smoke.encode(imgs, blocks=(3,), attn_block=3)
    assert len(calls) == 2 * len(smoke.blocks)
    assert torch.equal(e0.tokens, e1.tokens)
    assert all(len(blk.attn.qkv._forward_hooks) == 0 for blk in smoke.blocks)  # the hook is removed again


def test_our_checkpoint_roundtrip(smoke, imgs, tmp_path):
    f = save_mae(smoke, tmp_path / 'mae.pt', epoch=2)
    m = load_mae(f)
    assert m.profile == smoke.profile and not m.training
    with torch.no_grad(): assert torch.equal(m.encode(imgs).tokens, smoke.encode(imgs).tokens)
    torch.save({'weights': 1}, tmp_path / 'other.pt')
    with pytest.raises(WeightLoadError, match='not an sce-mae checkpoint'): load_mae(tmp_path / 'other.pt')


def test_timm_state_dict_loads_and_gives_timm_features(imgs):
    p = load_profile('smoke')
    vit = VisionTransformer(img_size=96, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=7).eval()
    m = MAE(p).eval()
    info = load_vit_state_dict(m, vit.state_dict())
    assert info['decoder'] is False and info['ignored'] == ['head.weight', 'head.bias']
    with torch.no_grad():
        assert torch.allclose(m.encode(imgs).tokens, vit.forward_features(m.normalise(imgs))[:, 1:], atol=1e-5)


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
