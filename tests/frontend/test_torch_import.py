"""from_torch: a small transformer block through torch.export, against torch itself."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


class Block(torch.nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(),
                                       torch.nn.Linear(4 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_transformer_block_matches_torch():
    from hetcomp import _tvm
    from hetcomp.codegen.build import compile_relax
    from hetcomp.frontend import from_torch

    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(1, 8, 32)
    mod = from_torch(block, (x,))
    assert "main" in [gv.name_hint for gv in mod.get_global_vars()]
    ex = compile_relax(mod)
    vm = _tvm.virtual_machine(ex, [_tvm.cpu()])
    out = vm["main"](_tvm.tensor(x.numpy()))
    out = out.numpy() if hasattr(out, "numpy") else out[0].numpy()
    with torch.no_grad():
        expected = block(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
