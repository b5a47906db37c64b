"""What one step of the LLaMA-family decoder runs, as data that every floor reads.

The Relax module (:mod:`hetcomp.frontend.llama`), the roofline step model
(:func:`hetcomp.cost.roofline.model_step`), the profiler's probes
(:func:`hetcomp.profile.measure.plan_probes`), the planner and the partition pass take the
linear kinds and the attention kernels of a verify step from here, so that a change of the
model's structure (another width on the fused kernel) reaches all of them at once.

Ground floor: plain Python, no TVM.
"""

from __future__ import annotations

import math

#: The column-split linear layers of a decoder layer (and the LM head), in layer order.
LINEAR_KINDS = ("qkv", "o", "gate_up", "down", "lm_head")

#: The gated activation kernel of each ``LlamaConfig.activation``: SwiGLU, or GeGLU with
#: the tanh approximation (Gemma).
ACTIVATION_KERNELS = {"silu": "silu_mul", "gelu_tanh": "gelu_mul"}


def residual_linears(post_norms: bool) -> tuple[str, ...]:
    """The linear kinds whose kernel adds the residual stream: ``o`` and ``down``, unless the
    model norms their outputs first (Gemma's post-norms: an ``rms_norm_res`` kernel then
    norms and adds, :func:`norm_kernels`)."""
    return () if post_norms else ("o", "down")


def norm_kernels(layers: int, post_norms: bool, qk_norm: bool,
                 fused_linears: bool = False, device_len: bool = False) -> dict[str, int]:
    """The norm kernels of a verify step and their call counts: two RMSNorms a layer and the
    final one (only the final one with ``fused_linears``: the others run inside the qkv and
    gate_up kernels, ``passes.fuse_linear_chains``); with ``post_norms`` two residual norms a
    layer (attention and MLP outputs); with ``qk_norm`` one per-head q/k norm a layer (before
    RoPE; none in the CUDA-graph build, ``device_len``: its attention kernel norms)."""
    out = {"rms_norm": 1 if fused_linears else 2 * layers + 1}
    if post_norms:
        out["rms_norm_res"] = 2 * layers
    if qk_norm and not device_len:
        out["qk_norm"] = layers
    return out


def rope_tables(sliding_window: int) -> int:
    """cos/sin tables a step computes: one per RoPE base (sliding-window layers have their own)."""
    return 2 if sliding_window else 1

#: Widths whose verify keeps the fused masked attention kernel, measured faster there than
#: dense part + sparse part + merge (three launches a layer for a one- or two-node tree).
#: The split's log-sum-exp merge is exact in real numbers only (a tree row's logits ~1e-3 from
#: sequential decoding's). Where the linears round their input rows to int8
#: (``schedules.int8_dot``) such a difference moves a rounding and grows to ~1 logit, and
#: speculation stops being lossless: those builds run the fused kernel at every width, its
#: softmax summed in float64, which gives a tree row sequential decoding's floats bit for bit
#: (``exact`` below; ``build_module(exact_attention=True)``, ``ops.attention(exact=True)``).
#: SmolLM2-135M, cache 64, 1 thread, attention ms per step, best of 2 runs of min-of-15
#: (fused / split): W=1 0.325 / 0.388, W=2 0.412 / 0.463, W=4 0.571 / 0.541, W=8 0.855 /
#: 0.847, W=16 1.39 / 1.36, W=32 3.02 / 2.47, W=64 7.68 / 4.63. W=4-16 tie within this
#: machine's noise; the split serves them (and is what a partitioned plan places per unit).
FUSED_WIDTHS = (1, 2)

#: A verify step's attention kernels per layer: the fused masked kernel over cache + tree...
FUSED_ATTENTION = ("attention",)
#: ...or the dense part (tree queries vs the committed cache), the sparse part (each tree row
#: vs its CSR ancestors) and their exact log-sum-exp merge.
SPLIT_ATTENTION = ("attention_dense", "attention_sparse", "attention_merge")
#: The build for CUDA graphs (``device_len``) runs one kernel at every width: the fused
#: masked attention reading the cache length on the device (``script_ops.tree_attention``).
DEVICE_ATTENTION = ("tree_attention",)


def attention_kernels(width: int | None, fused_widths: tuple[int, ...] = FUSED_WIDTHS,
                      device_len: bool = False, exact: bool = False) -> tuple[str, ...]:
    """The attention kernels one layer of a verify step of ``width`` tree nodes runs
    (``None``: the symbolic-width verify, which takes the split path; ``device_len``: the
    build for CUDA graphs; ``exact``: the fused masked kernel at every width, a build with
    int8 activations, :data:`FUSED_WIDTHS`)."""
    if device_len:
        return DEVICE_ATTENTION
    return FUSED_ATTENTION if exact or width in fused_widths else SPLIT_ATTENTION


def estimated_tree_nnz(width: int) -> int:
    """Ancestor-mask non-zeros of a typical Medusa tree of ``width`` nodes, where no tree is
    at hand: ``W (1 + log2(W) / 2)``. The packaged SmolLM2 heads' trees have 8, 17, 38, 89
    and 199 at W = 4, 8, 16, 32, 64 (this gives 8, 20, 48, 112, 256): nodes sit 1-3 deep."""
    return max(width, round(width * (1 + math.log2(max(width, 1)) / 2)))
