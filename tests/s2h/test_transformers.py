"""S2H on vision Transformers: heads (ViT), head dimensions (Swin), MLP channels.

References independent of s2h's slicing, export and FLOPs code:
* the hard branch equals the ORIGINAL model with the pruned units zeroed where zeroing removes them
  exactly: a pruned ViT head's value rows (its output is then 0), a pruned Swin head dim's query
  and value rows (its share of q·k and of the output is then 0), a pruned MLP channel's fc1 row
  and bias (GELU(0) = 0);
* the soft branch equals the original model with its WEIGHTS scaled by the soft mask (proj's
  input columns per head, q and v rows per head dim, fc1 rows and bias), where s2h scales
  activations;
* FLOPs: FlopCounterMode/2 on the original and on the exported model, and hand formulas;
* ``S2HPruner.step`` against ``S2HReference`` (Algorithm 1 written literally, masked full width);
* ``vit.WindowAttention`` against torchvision's ``ShiftedWindowAttention``.
Models are tiny (widths 16-32, 2 blocks per stage), except one native-size (224x224) conversion each of
torchvision's vit_b_16 and swin_t (about 10 s each, 2 GB).
"""
import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention

import s2h
from s2h.structured import attention as tr
from s2h.models import vit
from s2h_reference import macs, random_u


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(**kw):
    cfg = dict(num_classes=10, dim=32, depth=2, num_heads=4, head_dim=8, qkv_bias=True)
    cfg.update(kw)
    return vit.vit_cifar(**cfg)


def tiny_swin(**kw):
    cfg = dict(num_classes=10, embed_dim=16, depths=(2, 2), num_heads=(2, 4), head_dim=8)
    cfg.update(kw)
    return vit.swin_cifar(**cfg)


def tv_vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=4,
                                                hidden_dim=32, mlp_dim=64, num_classes=10)


def tv_swin():
    # window 3 on 8x8 and 4x4 token maps: padding to whole windows, and a shift in the first stage
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                              window_size=[3, 3], num_classes=10)


class SeqFirstMHA(nn.Module):
    """A pre-norm encoder on nn.MultiheadAttention with batch_first=False (sequence-first layout)."""

    def __init__(self, dim=24, heads=3, classes=5):
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, bias=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # x: [B, N, 12]
        h = self.embed(x).transpose(0, 1)  # [N, B, dim]
        n = self.norm(h)
        h = h + self.attn(n, n, n, need_weights=False)[0]
        return self.head(h.mean(0))


def randomized(net: nn.Module, seed: int = 0) -> nn.Module:
    """Weights that make every output O(1) and every affine non-trivial (torchvision's ViT starts with a
    zero classifier, and the 0.02-std initialisations give outputs too small to compare tightly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5, generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, nn.MultiheadAttention):
                m.in_proj_weight.normal_(0, m.embed_dim ** -0.5, generator=g)
                m.in_proj_bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, (vit.WindowAttention, ShiftedWindowAttention)):
                m.relative_position_bias_table.normal_(0, 0.5, generator=g)
        for n, p in net.named_parameters():
            if n.endswith(("pos_embed", "cls_token", "pos_embedding", "class_token")):
                p.normal_(0, 0.5, generator=g)
    return net


_BUILDERS = {"vit": tiny_vit, "swin": tiny_swin, "tv_vit": tv_vit, "tv_swin": tv_swin, "mha_seq": SeqFirstMHA}
FACTORIES = {k: (lambda f=f, **kw: randomized(f(**kw))) for k, f in _BUILDERS.items()}


def inputs_for(name, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "mha_seq":
        return torch.randn(n, 7, 12, generator=g)
    return torch.randn(n, 3, 32, 32, generator=g)


@pytest.fixture(scope="module", params=list(FACTORIES))
def case(request):
    """(name, original net, converted without reorder (eval, random u), input batch)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = FACTORIES[request.param]().eval()
    x = inputs_for(request.param)
    model = s2h.convert(net, x[:1], target_flops=0.3, reorder=False).eval()
    random_u(model, seed=1)
    return request.param, net, model, x


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


# ------------------------------------------------------------------------------------------ references


def _heads_view(w: torch.Tensor, heads: int):
    """qkv weight/bias as [3, heads, head_dim, ...]."""
    return w.view(3, heads, -1, *w.shape[1:])


def zero_pruned(net, model, keep):
    """The original net with the pruned heads / head dims / MLP channels zeroed (see module doc)."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for g in model.groups:
            k, mod = keep[g.name], net.get_submodule(g.name)
            if isinstance(mod, nn.Linear):  # an MLP group, named by fc1
                mod.weight[k:] = 0
                mod.bias[k:] = 0
            elif isinstance(mod, nn.MultiheadAttention):  # heads >= k: value rows
                for t in (mod.in_proj_weight, mod.in_proj_bias):
                    _heads_view(t, mod.num_heads)[2, k:] = 0
            elif isinstance(mod, (vit.WindowAttention, ShiftedWindowAttention)):  # dims >= k of every head: q and v
                for t in (mod.qkv.weight, mod.qkv.bias):
                    v = _heads_view(t, mod.num_heads)
                    v[0, :, k:] = 0
                    v[2, :, k:] = 0
            else:  # vit.Attention: heads >= k: value rows
                assert isinstance(mod, vit.Attention)
                for t in (mod.qkv.weight, mod.qkv.bias):
                    if t is not None:
                        _heads_view(t, mod.num_heads)[2, k:] = 0
    return net


def scaled_by_soft_mask(net, model, w):
    """The original net with its weights scaled by the soft masks ``w`` (per group name)."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        for g in model.groups:
            m, mod = w[g.name], net.get_submodule(g.name)
            if isinstance(mod, nn.Linear):  # fc1: theta (.) w on rows and bias
                mod.weight.mul_(m[:, None])
                mod.bias.mul_(m)
            elif isinstance(mod, nn.MultiheadAttention):  # head h's output x w_h = out_proj's columns of h x w_h
                d = mod.embed_dim // mod.num_heads
                mod.out_proj.weight.mul_(m.repeat_interleave(d)[None])
            elif isinstance(mod, (vit.WindowAttention, ShiftedWindowAttention)):  # q and v dims x w_j
                for t in (mod.qkv.weight, mod.qkv.bias):
                    v = _heads_view(t, mod.num_heads)
                    shape = (1, -1) + (1,) * (v.dim() - 3)
                    v[0].mul_(m.view(shape))
                    v[2].mul_(m.view(shape))
            else:
                mod.proj.weight.mul_(m.repeat_interleave(mod.head_dim)[None])
    return net


def soft_masks(model):
    w, _, _ = model.update_masks()
    offs = model.mask_state.channel_offsets
    return {g.name: w[offs[i]:offs[i] + g.channels].detach() for i, g in enumerate(model.groups)}


# ------------------------------------------------------------------------------------------ models


def test_vit_cifar_is_the_papers_vit():
    """dim 192, 9 blocks, 12 heads x 16, MLP 384 (Fig. 4(d)), 65 tokens; FLOPs by hand = FlopCounterMode."""
    m = vit.vit_cifar()
    assert len(m.blocks) == 9
    a = m.blocks[0].attn
    assert (a.num_heads, a.head_dim, a.qkv.in_features) == (12, 16, 192)
    assert m.blocks[0].mlp.fc1.out_features == 384
    n, c = 65, 192
    block = n * c * 3 * c + n * c * c + 2 * n * n * c + 2 * n * c * 384
    hand = 9 * block + 64 * (3 * 16) * c + c * 100
    assert macs(m, torch.randn(1, 3, 32, 32)) == hand
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_swin_cifar_stages():
    m = vit.swin_cifar()
    attn = [mod for mod in m.modules() if isinstance(mod, vit.WindowAttention)]
    assert [a.num_heads for a in attn] == [3] * 2 + [6] * 6 + [12] * 4
    assert {a.head_dim for a in attn} == {32}
    # 8x8 tokens: windows of 4, shifted every other block; 4x4 and 2x2 maps: one window, no shift
    assert [a.shift_size[0] for a in attn[:2]] == [0, 2]
    assert [a.window_size[0] for a in attn] == [4] * 8 + [2] * 4
    assert all(a.shift_size == [0, 0] for a in attn[2:])
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("shift,size", [((0, 0), (8, 8)), ((2, 2), (8, 8)), ((1, 1), (5, 7))])
def test_window_attention_equals_torchvision(shift, size):
    torch.manual_seed(0)
    ref = ShiftedWindowAttention(24, [3, 3] if size == (5, 7) else [4, 4], list(shift), 3)
    mine = vit.WindowAttention(24, ref.window_size, ref.shift_size, 3)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, *size, 24)
    with torch.no_grad():
        close(mine(x), ref(x), 1e-6)


# ------------------------------------------------------------------------------------------ convert


def test_groups_heads_head_dims_and_mlp_channels(case):
    name, net, model, x = case
    kinds = {}
    for g in model.groups:
        mod = model.model.get_submodule(g.name)
        if isinstance(mod, tr.S2HWindowAttention):
            kinds[g.name] = "head_dims"
            assert (g.channels, g.divisor) == (mod.head_dim, 1)
        elif isinstance(mod, tr.S2HAttention):
            kinds[g.name] = "heads"
            assert (g.channels, g.divisor) == (mod.num_heads, 1)
        else:
            kinds[g.name] = "mlp"
            assert isinstance(mod, s2h.S2HLinear)
    attn = [m for m in net.modules() if isinstance(m, (vit.Attention, vit.WindowAttention, ShiftedWindowAttention,
                                                         nn.MultiheadAttention))]
    expect = "head_dims" if name in ("swin", "tv_swin") else "heads"
    assert list(kinds.values()).count(expect) == len(attn)
    mlps = list(kinds.values()).count("mlp")
    assert mlps == (0 if name == "mha_seq" else len(attn))
    # the residual stream is never grouped: no LayerNorm is converted, no qkv input / proj output is sliced
    assert not any(isinstance(m, s2h.S2HLayerNorm) for m in model.modules())
    for m in model.modules():
        if isinstance(m, tr.S2H_ATTENTION_TYPES):
            assert m.qkv.in_spec is None and m.proj.out_spec is None and not m.qkv.soft_out


def test_dense_branch_equals_original(case):
    name, net, model, x = case
    with torch.no_grad(), model.branch("dense"):
        close(model(x), net(x))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_reorder_preserves_function(name):
    torch.manual_seed(0)
    net = FACTORIES[name]().eval()
    x = inputs_for(name)
    model = s2h.convert(net, x[:1]).eval()
    moved = 0
    for m in model.modules():
        if isinstance(m, tr.S2H_ATTENTION_TYPES):
            orig = net.get_submodule(m.mask_group)
            w = orig.in_proj_weight if isinstance(orig, nn.MultiheadAttention) else orig.qkv.weight
            moved += not torch.equal(m.qkv.weight, w)
    assert moved  # the importance order is not the original one
    with torch.no_grad(), model.branch("dense"):
        close(model(x), net(x), 1e-5)


def test_hard_branch_equals_zeroed_original(case):
    name, net, model, x = case
    keep = model.keep_counts()
    assert any(k < g.channels for k, g in zip(keep.values(), model.groups))
    with torch.no_grad(), model.branch("hard"):
        close(model(x), zero_pruned(net, model, keep)(x))


def test_soft_branch_equals_weight_scaled_original(case):
    name, net, model, x = case
    with torch.no_grad():
        w = soft_masks(model)
        assert all(float(v.min()) < 1 for v in w.values())
        with model.branch("soft"):
            close(model(x), scaled_by_soft_mask(net, model, w)(x))


def test_export_plain_modules_equal_hard_branch(case):
    name, net, model, x = case
    keep = model.keep_counts()
    exported = model.export().eval()
    types = {type(m) for m in exported.modules()}
    assert not types & (set(s2h.structured.S2H_LAYER_TYPES) | set(tr.S2H_ATTENTION_TYPES))
    for g in model.groups:
        mod = exported.get_submodule(g.name)
        if isinstance(mod, vit.WindowAttention):
            assert mod.head_dim == keep[g.name] and mod.qkv.out_features == 3 * mod.num_heads * keep[g.name]
        elif isinstance(mod, vit.Attention):
            assert mod.num_heads == keep[g.name] and mod.proj.in_features == keep[g.name] * mod.head_dim
        else:
            assert isinstance(mod, nn.Linear) and mod.out_features == keep[g.name]
    assert sum(p.numel() for p in exported.parameters()) < sum(p.numel() for p in net.parameters())
    with torch.no_grad(), model.branch("hard"):
        close(exported(x), model(x))
    assert macs(exported, x[:1]) == pytest.approx(model.hard_flops(), rel=1e-9)


def test_dense_flops_match_flop_counter(case):
    name, net, model, x = case
    ref = macs(copy.deepcopy(net).train(), x[:1])  # train mode: nn.MultiheadAttention's eval fast path is not counted
    if name in ("tv_vit", "mha_seq"):
        # nn.MultiheadAttention runs QK^T and AV in scaled_dot_product_attention, which FlopCounterMode does not
        # count on the CPU (torch 2.14): add them by hand, 2 N^2 E per layer
        n = x.shape[1] if name == "mha_seq" else 65
        layers = [m for m in net.modules() if isinstance(m, nn.MultiheadAttention)]
        ref += sum(2 * n * n * m.embed_dim for m in layers)
    assert model.dense_flops() == pytest.approx(ref, rel=1e-9)


def test_full_width_export_has_the_dense_flops(case):
    name, net, model, x = case
    full = model.export(widths={g.name: g.channels for g in model.groups})
    assert macs(full, x[:1]) == pytest.approx(model.dense_flops(), rel=1e-9)


def _hand_vit(e_heads, e_mlp, n=65, c=32, d=8, classes=10):
    f = 64 * 48 * c + c * classes
    for h, m in zip(e_heads, e_mlp):
        f += n * c * 3 * d * h + n * d * h * c + 2 * n * n * d * h + 2 * n * c * m
    return f


def _hand_swin(e_dims, e_mlp, classes=10):
    # stage 1: 8x8 tokens, C 16, 2 heads, 4 windows of 16; merge 64 -> 32 on 16 tokens; stage 2: 4x4, C 32, 4 heads
    f = 64 * 48 * 16 + 16 * 64 * 32 + 32 * classes
    stages = [(64, 16, 2, 4, 16)] * 2 + [(16, 32, 4, 1, 16)] * 2
    for (n, c, h, nw, nt), dd, m in zip(stages, e_dims, e_mlp):
        f += n * c * 3 * h * dd + n * h * dd * c + 2 * nw * h * nt * nt * dd + 2 * n * c * m
    return f


@pytest.mark.parametrize("name", ["vit", "swin"])
def test_soft_and_hard_flops_match_hand_formula(name):
    torch.manual_seed(0)
    net = FACTORIES[name]()
    model = s2h.convert(net, inputs_for(name, 1))
    random_u(model, seed=3)
    att = [g.name for g in model.groups if g.name.endswith("attn")]
    mlp = [g.name for g in model.groups if g.name.endswith("fc1")]
    hand = _hand_vit if name == "vit" else _hand_swin
    e = model.expected_widths()
    assert float(model.soft_flops().detach()) == pytest.approx(hand([e[a] for a in att], [e[m] for m in mlp]), rel=1e-6)
    k = model.keep_counts()
    assert model.hard_flops() == pytest.approx(hand([k[a] for a in att], [k[m] for m in mlp]), rel=1e-9)
    assert model.dense_flops() == pytest.approx(macs(net, inputs_for(name, 1)), rel=1e-9)
    # the resource loss reaches every group's logits, the attention groups included
    model.u.grad = None
    model.resource_loss().backward()
    offs = model.group_offsets.tolist()
    for i, g in enumerate(model.groups):
        assert float(model.u.grad[offs[i]:offs[i + 1]].abs().sum()) > 0, g.name


def test_paired_forward_equals_separate_calls():
    torch.manual_seed(0)
    for name in ("vit", "swin"):
        x = inputs_for(name)
        model = s2h.convert(FACTORIES[name](), x[:1]).eval()
        random_u(model, seed=2)
        with torch.no_grad():
            ys, yh = model.forward_pair(x)
            assert model.pair_mode == "graph"
            with model.branch("soft"):
                close(ys, model(x))
            with model.branch("hard"):
                close(yh, model(x))


def test_multihead_attention_call_convention():
    """need_weights, batch_first=False and the refusals of the nn.MultiheadAttention stand-in."""
    torch.manual_seed(0)
    net = FACTORIES["mha_seq"]().eval()
    x = inputs_for("mha_seq")
    model = s2h.convert(net, x[:1], reorder=False).eval()
    attn = model.model.attn
    assert isinstance(attn, tr.S2HMultiheadAttention) and not attn.batch_first
    q = torch.randn(7, 2, 24)
    with torch.no_grad(), model.branch("dense"):
        out, w = attn(q, q, q)
        ref_out, ref_w = net.attn(q, q, q)
        close(out, ref_out)
        close(w, ref_w)
        out, w = attn(q, q, q, average_attn_weights=False)
        assert w.shape == (2, 3, 7, 7)
        with pytest.raises(RuntimeError, match="self-attention"):
            attn(q, q.clone(), q)
        with pytest.raises(RuntimeError, match="masks"):
            attn(q, q, q, attn_mask=torch.zeros(7, 7))
    exported = model.export().eval()
    assert isinstance(exported.attn, tr.MultiheadSelfAttention) and not exported.attn.batch_first
    with torch.no_grad(), model.branch("hard"):
        close(exported(x), model(x))


def test_ignored_attention_keeps_its_heads():
    torch.manual_seed(0)
    net = FACTORIES["vit"]()
    x = inputs_for("vit")
    model = s2h.convert(net, x[:1], ignored_layers=["blocks.0.attn", "blocks.1.mlp.fc1"])
    names = [g.name for g in model.groups]
    assert names == ["blocks.0.mlp.fc1", "blocks.1.attn"]
    a0 = model.model.blocks[0].attn
    assert isinstance(a0, tr.S2HAttention) and a0.group is None
    assert model.dense_flops() == macs(net, x[:1])
    random_u(model, seed=0)
    exported = model.export().eval()
    assert exported.blocks[0].attn.num_heads == 4
    assert macs(exported, x[:1]) == pytest.approx(model.hard_flops(), rel=1e-9)
    with torch.no_grad(), model.branch("hard"):
        close(exported(x), model.eval()(x))


def test_divisor_buckets_head_dims_not_heads():
    torch.manual_seed(0)
    m = s2h.convert(tiny_swin(), inputs_for("swin", 1), divisor=4)
    att = [g for g in m.groups if g.name.endswith("attn")]
    assert {(g.channels, g.divisor) for g in att} == {(8, 4)}
    random_u(m, seed=0)
    assert all(m.keep_counts()[g.name] % 4 == 0 for g in att)
    v = s2h.convert(tiny_vit(), inputs_for("vit", 1), divisor=4)
    assert {g.divisor for g in v.groups if g.name.endswith("attn")} == {1}


def test_unsupported_attention_is_refused():
    net = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2],
                                             window_size=[4, 4], block=torchvision.models.swin_transformer.SwinTransformerBlockV2,
                                             downsample_layer=torchvision.models.swin_transformer.PatchMergingV2)
    with pytest.raises(ValueError, match=r"features\.1\.0\.attn.*V2"):
        s2h.convert(net, torch.randn(1, 3, 32, 32))

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x, y):
            return self.head(self.attn(x, y, y)[0].mean(1))

    with pytest.raises(ValueError, match="'attn'.*separate key/value"):
        s2h.convert(Cross(), (torch.randn(1, 3, 8), torch.randn(1, 5, 4)))


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    x = inputs_for("vit")
    model = s2h.convert(FACTORIES["vit"](), x[:1]).eval()
    random_u(model, seed=4)
    s2h.save(model, tmp_path / "m.pt")
    exported = model.export().eval()
    s2h.save(exported, tmp_path / "e.pt")
    back = s2h.load(tmp_path / "m.pt", tiny_vit).eval()
    back_e = s2h.load(tmp_path / "e.pt", tiny_vit).eval()
    with torch.no_grad(), model.branch("hard"), back.branch("hard"):
        close(back(x), model(x), 1e-6)
        close(back_e(x), exported(x), 1e-6)
    assert back_e.blocks[0].attn.num_heads == exported.blocks[0].attn.num_heads


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("name", ["vit", "swin", "tv_vit"])
def test_fused_step_matches_reference(name):
    """5 steps of S2HPruner.step vs S2HReference (AdamW, θ coefficients 1 and 1, Appendix A4): rtol 1e-4."""
    from s2h.structured.reference import S2HReference
    from s2h.structured.step import S2HPruner

    torch.manual_seed(0)
    net = FACTORIES[name](qkv_bias=False) if name == "vit" else FACTORIES[name]()
    model = s2h.convert(net, inputs_for(name, 1), target_flops=0.3)
    random_u(model, seed=0, scale=1.0)
    runs = []
    for cls in (S2HPruner, S2HReference):
        m = copy.deepcopy(model).train()
        opt = torch.optim.AdamW(m.weight_parameters(), lr=1e-3, weight_decay=0.05)
        pruner = cls(m, opt, mask_lr=0.05, ce_coef=1.0, gap_coef=1.0)
        g = torch.Generator().manual_seed(0)
        stats = []
        for _ in range(5):
            x = torch.randn(4, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (4,), generator=g)
            stats.append(pruner.step(x, y))
        runs.append((m, stats))
    (a, sa), (b, sb) = runs
    for s, t in zip(sa, sb):
        assert s["keep"] == t["keep"]
        assert s["loss"] == pytest.approx(t["loss"], rel=1e-5)
    assert not torch.equal(a.u, model.u)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if n.endswith("qkv.bias"):
            # the key bias adds q·b_k to all logits of a query, which softmax ignores: its gradient is 0 up to
            # rounding, and AdamW turns rounding into steps of size lr. Its q and v parts are compared.
            p, q = _heads_view(p, 1)[[0, 2]], _heads_view(q, 1)[[0, 2]]
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_prune_steps_reduce_flops_and_export():
    """A short S2H run on a tiny ViT drives the soft FLOPs toward the target; the export runs."""
    from s2h.structured.step import S2HPruner

    torch.manual_seed(0)
    model = s2h.convert(tiny_vit(), inputs_for("vit", 1), target_flops=0.4).train()
    opt = torch.optim.AdamW(model.weight_parameters(), lr=1e-3, weight_decay=0.05)
    pruner = S2HPruner(model, opt, mask_lr=0.5, ce_coef=1.0, gap_coef=1.0)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(15):
        st = pruner.step(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
        first = first or st["soft_flops"]
    assert st["soft_flops"] < first
    exported = model.eval().export().eval()
    x = inputs_for("vit")
    with torch.no_grad(), model.branch("hard"):
        close(exported(x), model(x))


# ------------------------------------------------------------------------------------------ native size


@pytest.mark.parametrize("arch,gmacs", [("vit_b_16", 17.5638), ("swin_t", 4.4906)])
def test_torchvision_native_size(arch, gmacs):
    """vit_b_16 and swin_t convert at 224x224 (no weights); FLOPs and export checked at about half width."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)().eval()
    x = torch.randn(1, 3, 224, 224)
    model = s2h.convert(net, x, inplace=True).eval()
    kind = tr.S2HMultiheadAttention if arch == "vit_b_16" else tr.S2HWindowAttention
    att = [m for m in model.modules() if isinstance(m, kind)]
    assert len(att) == 12 and len(model.groups) == 24
    assert model.dense_flops() / 1e9 == pytest.approx(gmacs, rel=1e-4)
    with torch.no_grad():
        model.u.fill_(-40.0)
        offs = model.group_offsets.tolist()
        for i, g in enumerate(model.groups):
            model.u[offs[i] + g.buckets // 2 - 1] = 40.0
    assert model.hard_flops() / model.dense_flops() == pytest.approx(0.5, abs=0.05)
    exported = model.export().eval()
    assert macs(exported, x) == pytest.approx(model.hard_flops(), rel=0.01)
    with torch.no_grad(), model.branch("hard"):
        close(exported(x), model(x), 1e-4)


def test_digits_upscaled_train_a_tiny_vit():
    """The digits data upscaled to 32x32 (1 channel) through build_model('vit_cifar', ...), S2H steps, export."""
    from s2h.data import get_dataset
    from s2h.models import build_model
    from s2h.structured.step import S2HPruner

    ds = get_dataset("digits", image_size=32)
    x = torch.stack([ds[i][0] for i in range(8)])
    y = torch.tensor([int(ds[i][1]) for i in range(8)])
    assert x.shape == (8, 1, 32, 32)
    torch.manual_seed(0)
    net = build_model("vit_cifar", 10, in_channels=1, image_size=32)
    assert isinstance(net, vit.VisionTransformer) and len(net.blocks) == 9
    small = vit.vit_cifar(num_classes=10, in_channels=1, dim=32, depth=2, num_heads=4, head_dim=8)
    model = s2h.convert(small, x[:1], target_flops=0.5).train()
    pruner = S2HPruner(model, torch.optim.AdamW(model.weight_parameters(), lr=1e-3), ce_coef=1.0, gap_coef=1.0)
    for _ in range(3):
        st = pruner.step(x, y)
    assert math.isfinite(st["loss"]) and set(st["keep"]) == {g.name for g in model.groups}
    with torch.no_grad(), model.branch("hard"):
        close(model.eval().export().eval()(x), model(x))


@pytest.mark.skipif(importlib.util.find_spec("s2h.cli.prune") is None, reason="the prune command (s2h/cli/prune.py) is absent")
@pytest.mark.parametrize("args,coef", [
    (["--preset", "cifar100-vit", "--data", "digits"], "preset"),  # the paper's ViT settings on the digits
    (["--model", "swin_cifar", "--data", "digits"], "default"),    # no preset: Transformers default to 1 and 1
])
def test_prune_cli_transformers_on_digits(tmp_path, args, coef):
    """``python -m s2h prune`` with vit_cifar / swin_cifar on the digits upscaled to 32x32 (2 steps)."""
    import json

    from s2h import cli

    out = tmp_path / "run"
    rc = cli.main(["prune", *args, "--out", str(out), "--epochs", "1", "--batch-size", "16",
                   "--max-train-samples", "32", "--max-test-samples", "32", "--no-progress", "--threads", "1"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    cfg = s["config"]
    assert (cfg["ce_coef"], cfg["gap_coef"]) == (1.0, 1.0)
    if coef == "preset":
        assert (cfg["model"], cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["warmup_epochs"]) == \
            ("vit_cifar", "adamw", 3e-3, 0.05, 10)
    assert s["image_size"] == 32 and s["exported_matches_hard"]
    attn = [name for name in s["widths"] if name.endswith("attn")]
    assert len(attn) == (9 if cfg["model"] == "vit_cifar" else 12)
    assert (out / "pruned.pt").is_file()
