"""Stage 2 pieces: token split, DPC-KNN (plain loop == batched, ties included), CARB substitution, LCR gradcheck and properties
(the hand-worked DPC and LCR cases are tested where they are worked out, in notebooks 07 and 09)."""
import pytest
import torch
from sce_mae.config import load_profile
from sce_mae.split import split_tokens, n_attentive, attentive_mask
from sce_mae.dpc import dpc_knn, dpc_knn_reference, dpc_quantities, check_dpc_agreement, tie_cases
from sce_mae.carb import carb_select, complete_map, cluster_proxies, carb_inputs, Projector, TensorMemoryMeter, bench_memory
from sce_mae.lcr import lcr_loss, lcr_from_profile, lcr_pair_weights


@pytest.fixture(scope='module')
def p():
    return load_profile('smoke')


# --- split -------------------------------------------------------------------------------------------------
def test_split_counts_partition_and_ties(p):
    assert n_attentive(144, load_profile('deit_tiny').eta) == 14 and n_attentive(144, load_profile('deit_base').eta) == 36
    attn = torch.rand(4, p.n_tokens, generator=torch.Generator().manual_seed(0))
    att, inatt = split_tokens(attn, p.eta)
    assert torch.equal(torch.cat([att, inatt], 1).sort(1).values, torch.arange(p.n_tokens).expand(4, -1))
    assert (attn.gather(1, att).amin(1) >= attn.gather(1, inatt).amax(1)).all()
    assert attentive_mask(att, p.n_tokens).sum().item() == 4 * n_attentive(p.n_tokens, p.eta)
    a, i = split_tokens(torch.tensor([[0.1, 0.5, 0.2, 0.5, 0.5, 0.0]]), 0.34)
    assert a.tolist() == [[1, 3]] and i.tolist() == [[0, 2, 4, 5]]
    with pytest.raises(ValueError, match=r'\(B, N\)'): split_tokens(attn[0], 0.1)
    with pytest.raises(ValueError, match='eta'): split_tokens(attn, 1.2)


# --- DPC-KNN -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_dpc_agree_random(p, seed):
    g = torch.Generator().manual_seed(seed)
    for n, c in [(1, 3), (2, 5), (3, 8), (5, 4), (6, 16), (17, 7), (60, 32)]:
        x = torch.randn(3, n, c, generator=g)
        for k, kc in [(p.dpc_k, p.k_c), (1, 1), (3, 7), (12, 2)]:
            assert check_dpc_agreement(x, k, kc), (seed, n, c, k, kc)


def test_dpc_agree_deit_tiny_shape():
    pt = load_profile('deit_tiny')
    n = pt.n_tokens - n_attentive(pt.n_tokens, pt.eta)
    x = torch.randn(2, n, pt.embed_dim, generator=torch.Generator().manual_seed(3))
    assert check_dpc_agreement(x, pt.dpc_k, pt.k_c)


@pytest.mark.parametrize('case', range(len(tie_cases())))
def test_dpc_agree_ties_and_small_n(p, case):
    name, x = tie_cases(0)[case]
    for k, kc in [(p.dpc_k, p.k_c), (1, 2), (3, 5), (20, 30)]:
        assert check_dpc_agreement(x, k, kc), (name, k, kc)


def test_dpc_rounded_and_lattice_inputs():
    g = torch.Generator().manual_seed(5)
    for it in range(40):
        n, c = int(torch.randint(1, 25, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        x = torch.randint(0, 3, (2, n, c), generator=g).float() if it % 2 else (torch.randn(2, n, c, generator=g) * 2).round() / 4
        k, kc = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        assert check_dpc_agreement(x, k, kc), (it, n, c, k, kc)


def test_dpc_rules(p):
    c, a = dpc_knn(torch.ones(1, 7, 5), p.dpc_k, p.k_c)             # all identical: lowest indices, everyone to centre 0
    K = min(p.k_c, 7)
    assert c.tolist() == [list(range(K))] and a.tolist() == [list(range(K)) + [0] * (7 - K)]
    c, a = dpc_knn(torch.randn(2, 3, 6), p.dpc_k, 4)                 # N <= K_c: every token a centre
    assert c.shape == (2, 3) and (a.gather(1, c) == torch.arange(3)).all()
    x = torch.randn(2, 30, 8, requires_grad=True)
    c, a = dpc_knn(x, p.dpc_k, p.k_c)
    assert (a.gather(1, c) == torch.arange(p.k_c)).all() and not c.requires_grad
    for bad, msg in [(lambda: dpc_knn(torch.randn(2, 0, 3), 5, 4), 'N = 0'), (lambda: dpc_knn(torch.randn(5, 3), 5, 4), r'\(B, N, C\)'),
                     (lambda: dpc_knn_reference(torch.randn(5, 3), 0, 4), 'k = 0'), (lambda: dpc_knn(torch.randn(1, 5, 3), 5, 0), 'n_clusters')]:
        with pytest.raises(ValueError, match=msg): bad()


# --- CARB --------------------------------------------------------------------------------------------------
def _selection(p, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, D = p.n_tokens, p.embed_dim
    tokens, feats, attn = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g), torch.rand(B, N, generator=g)
    return tokens, carb_inputs(tokens, feats, attn, p.eta, p.dpc_k, p.k_c, p.grid)


def test_carb_select_and_complete_map(p):
    tokens, r = _selection(p)
    B, N, D = tokens.shape
    na = n_attentive(N, p.eta)
    sel, pos, is_att = r['sel'], r['pos'], r['is_att']
    assert sel.shape == (B, na + p.k_c, D) and pos.shape == (B, na + p.k_c, 2) and is_att.sum().item() == B * na
    full = complete_map(tokens, r['att_idx'], r['inatt_idx'], r['centres'], r['assign'])
    for b in range(B):
        assert torch.equal(sel[b, :na], tokens[b, r['att_idx'][b]])
        assert torch.equal(full[b, r['att_idx'][b]], tokens[b, r['att_idx'][b]])        # attentive unchanged
        for k in range(p.k_c):
            members = r['inatt_idx'][b][r['assign'][b] == k]
            torch.testing.assert_close(sel[b, na + k], tokens[b, members].mean(0))     # exact mean
            assert (full[b, members] == sel[b, na + k]).all()                            # substituted by its proxy
            c = int(r['inatt_idx'][b, r['centres'][b, k]])
            assert pos[b, na + k].tolist() == [c // p.grid, c % p.grid]                 # at its centre
    proj = Projector(D, p.proj_dim)
    phi = proj(sel)
    torch.testing.assert_close(phi.norm(dim=-1), torch.ones(B, na + p.k_c))
    torch.testing.assert_close(proj(full)[0, r['inatt_idx'][0]], phi[0, na + r['assign'][0]])
    with pytest.raises(ValueError, match='grid'): carb_select(tokens, r['att_idx'], r['inatt_idx'], r['centres'], r['assign'], p.grid + 1)


def test_memory_meter_counts_storages():
    with TensorMemoryMeter() as mm:
        a = torch.empty(1000)
        b = a.view(10, 100)[2:]
        c = torch.zeros(500, dtype=torch.float64) + 1
        del c
        d = torch.ones(250)
    assert (mm.peak, mm.live) == (12_000, 5_000)
    r = bench_memory(batch=2, dim=16, proj_dim=8, hyper_channels=(16, 16))
    assert r['kit_mib'] > 0 and r['ratio'] > 1


# --- LCR ---------------------------------------------------------------------------------------------------
def test_lcr_gradcheck_and_properties(p):
    g = torch.Generator().manual_seed(0)
    B, T = 2, 6
    pos = torch.randint(0, p.grid, (B, T, 2), generator=g).float()
    is_att = torch.tensor([[True, True, False, True, False, False], [False, True, True, False, False, True]])
    lam = (p.lambda_aa, p.lambda_ap, p.lambda_pp)
    phi = torch.randn(B, T, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: lcr_loss(f, pos, is_att, p.tau, lam), (phi,))
    w = lcr_pair_weights(pos, is_att, lam)
    assert torch.equal(w, w.transpose(1, 2)) and (w.diagonal(dim1=1, dim2=2) == 0).all()
    same = torch.ones(B, T, 3, dtype=torch.float64)
    torch.testing.assert_close(lcr_loss(same, pos, is_att, p.tau, lam), (w.double().sum((1, 2)) / T / T).mean())
    with pytest.raises(ValueError, match='bool'): lcr_loss(phi, pos, is_att.float(), p.tau, lam)
