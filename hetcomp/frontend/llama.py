"""The LLaMA-family decoder as a Relax IRModule with ``prefill``, ``verify`` and ``commit``.

Calling convention (all functions take the KV cache and return it, updated in place):

``verify(tokens[w], positions[w], mask[w, w], row_ptr[w + 1], col_idx[nnz], k_cache, v_cache,
cache_len: Shape[n], *params)``
    Runs W tree nodes. Node i sits at ``positions[i]`` (cache length + depth) and attends to the
    committed cache ``[0, n)`` plus its tree ancestors and itself: the tree nodes j with
    ``mask[i, j] != 0``, which CSR row i (``col_idx[row_ptr[i]:row_ptr[i + 1]]``) lists too.
    The nodes' K/V are written to the cache's scratch slots ``[n, n + w)``. Returns
    ``(logits[w, V], hidden[w, E], greedy_ids[w], k_cache, v_cache)``; ``hidden`` is the final
    normed hidden state the Medusa heads read. With W = 1 this is a sequential decode step.
    Attention per layer (:func:`_attention`): the dense part (tree queries against the cache,
    ``ops.attention(part="dense")``), the sparse part (each row against its CSR ancestors,
    ``sparse_attention.sparse_tree_attention``) and their exact log-sum-exp merge
    (``ops.attention_merge``); widths in ``fused_widths`` (:data:`hetcomp.decoder.FUSED_WIDTHS`,
    measured faster there) run the fused masked kernel instead (``ops.attention``), which
    reads the mask and ignores the CSR.
``prefill(tokens, positions, mask, k_cache, v_cache, cache_len, *params)``
    A causal mask over a prompt chunk (the fused kernel); returns the last row's logits and
    hidden state. Its slots are committed by construction (the identity path).
``prefill_w{C}(tokens[C], positions[C], mask[C, C], rows: Shape[m], k_cache, v_cache, cache_len,
*params)``
    The same for a chunk of exactly C rows (``prefill_chunk``), of which the first ``m`` hold
    the prompt (a shorter last chunk is padded): its kernels tile rows exactly, 3x the
    symbolic-width kernels' GFLOP/s. Returns row ``m - 1``'s logits and hidden state; the
    padding's K/V land in cache slots past the prompt, which later calls overwrite. ``rows``
    comes with the call's own values, before the caches: the CUDA-graph build captures the
    chunk's layers once for every ``m`` (only the row's gather reads it).
Every call's ``positions[0]`` is the cache length ``n`` (a tree's root, a chunk's first
token): the CUDA-graph build (``build_module(device_len=True)``) reads ``n`` from there.

``commit(k_cache, v_cache, accepted[a], cache_len: Shape[n])``
    Moves the accepted nodes' K/V from slots ``n + accepted[j]`` to ``n + j``; the caller's new
    cache length is ``n + a``.
"""

from __future__ import annotations

import functools

from .._tvm import compiler
from ..artifact_format import MEDUSA_TOPK
from ..decoder import ACTIVATION_KERNELS, FUSED_WIDTHS, residual_linears
from ..kernels import ops, quant, script_ops, sparse_attention
from .config import LlamaConfig, kv_cache_shapes
from .weights import head_dtype, param_specs, weight_spec

#: verify's inputs before the parameters: tokens, positions, mask, row_ptr, col_idx, k_cache,
#: v_cache, cache_len.
NUM_INPUTS = 8
PREFILL_INPUTS = 6  # prefill's: the same without the CSR tree


class _Kernels:
    """Adds each distinct kernel to the module once and hands out its GlobalVar."""

    def __init__(self, bb, cfg: LlamaConfig, wdtype: str, kv_dtype: str = "float32",
                 device_len: bool = False, exact: bool = False):
        self.bb, self.cfg, self.wdtype, self.kv_dtype, self._gvs = bb, cfg, wdtype, kv_dtype, {}
        self.device_len = device_len  # build_module's
        self.exact = exact  # build_module's exact_attention
        self.rows: int | None = None  # static row count of the function being built

    def get(self, name: str, builder, *args, sized: bool = True, rows: int | None = None):
        """The kernel, built once; ``sized`` kernels are specialised to the static row count."""
        rows = rows if rows is not None else (self.rows if sized else None)
        kwargs = {"rows": rows} if sized else {}
        if rows is not None:
            name = f"{name}_w{rows}"
        if name not in self._gvs:
            func = builder(*args, **kwargs).with_attr("global_symbol", name)
            self._gvs[name] = self.bb.add_func(func, name)
        return self._gvs[name]

    def linear(self, n: int, k: int, residual: bool, rows: int | None = None,
               dtype: str | None = None):
        """A linear kernel; ``dtype``: its weights' dtype or block format when not the
        model's (the draft's, a quantized model's LM head)."""
        tag = "" if dtype in (None, self.wdtype) else f"_{dtype}"
        name = f"linear{'_res' if residual else ''}{tag}_n{n}_k{k}"
        fmt = dtype or self.wdtype
        builder = quant.linear_quant if quant.is_quant(fmt) else ops.linear
        return self.get(name, builder, n, k, fmt, residual, rows=rows)

    def embed(self, rows: int | None = None, scaled: bool = True):
        """The embedding gather from the table in the model's head format, scaled by the
        model's ``embed_scale`` where the rows enter the layers (``scaled``); as stored for
        the Medusa draft's root, which calibration trains on the stored rows."""
        fmt, cfg = head_dtype(self.wdtype), self.cfg
        builder = quant.embed_quant if quant.is_quant(fmt) else ops.embed
        scale = cfg.embed_scale if scaled else 1.0
        return self.get("embed" if scaled or scale == cfg.embed_scale else "embed_stored",
                        functools.partial(builder, scale=scale),
                        cfg.vocab_size, cfg.hidden_size, fmt, rows=rows)


def _tree_attention(bb, kern: _Kernels, cfg: LlamaConfig, qkv, cs, k_cache, v_cache, mask,
                    positions, layer, window: int = 0, qk_gammas: tuple = ()):
    """One layer's attention in the CUDA-graph build: ``script_ops.tree_attention``, which
    rotates the qkv rows itself and writes the tree's K/V into the caches (no ``rope_kv``),
    and norms the query and key heads first given Gemma's ``qk_gammas = (q_gamma, k_gamma)``
    (no ``qk_norm``). Returns ``(o[w, H, D], k_cache, v_cache)``."""
    c = compiler()
    relax, tt = c.relax, c.TensorType
    w = qkv.ty.shape[0]
    hq, d = cfg.num_heads, cfg.head_dim
    # "_win{S}": a stem that name.split("_w")[0] maps to the unwindowed kernel's (the same
    # kernel class for the step model and the planner; tests/frontend/test_step_description).
    eps = cfg.norm_eps if qk_gammas else None
    gv = kern.get("tree_attention" + (f"_win{window}" if window else ""), functools.partial(
        script_ops.tree_attention, kv_dtype=kern.kv_dtype, window=window, qk_norm_eps=eps),
        hq, cfg.num_kv_heads, d, cfg.num_layers, cfg.max_context, sized=False)
    g = len(qk_gammas)  # the caches' argument indices follow the gammas
    res = bb.emit(relax.call_tir_inplace(
        gv, [qkv, cs, *qk_gammas, k_cache, v_cache, mask, positions, layer], [-1, 2 + g, 3 + g],
        [tt((w, hq, d), "float32"), k_cache.ty, v_cache.ty]))
    return tuple(bb.emit(relax.TupleGetItem(res, k)) for k in range(3))


def _attention(bb, kern: _Kernels, cfg: LlamaConfig, q, kv_tree, k_cache, v_cache, tree, layer,
               n, positions, window: int = 0):
    """One layer's tree attention ``[w, H, D]``: the fused masked kernel when ``tree`` is
    ``(mask,)``, else dense part + sparse part over the CSR ``tree = (row_ptr, col_idx)`` +
    merge. ``kv_tree = (k_tree, v_tree)``: the tree's own K/V, all the sparse part reads.

    ``window = S > 0``: a sliding-window layer; the kernels that see the cache (fused, dense
    part) read ``positions`` and drop keys S or more positions back (``ops.attention``). The
    sparse part needs no window: it sees only a node's tree ancestors, fewer than W <= S
    positions back (``build_module`` checks the widths)."""
    c = compiler()
    relax, tt = c.relax, c.TensorType
    w = q.ty.shape[1]
    hq, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    attn_args = (hq, g, d, cfg.num_layers, cfg.max_context)
    tag, pos = (f"_win{window}", [positions]) if window else ("", [])
    if len(tree) == 1:
        gv = kern.get("attention" + tag, functools.partial(
            ops.attention, kv_dtype=kern.kv_dtype, window=window, exact=kern.exact),
            *attn_args)
        return bb.emit(relax.call_tir(gv, [q, k_cache, v_cache, tree[0], *pos, layer, n],
                                      tt((w, hq, d), "float32")))
    part = tt((w, hq, d + 1), "float32")  # each part's output with its lse (ops.attention)
    dense_gv = kern.get("attention_dense" + tag, functools.partial(
        ops.attention, part="dense", kv_dtype=kern.kv_dtype, window=window), *attn_args)
    dense = bb.emit(relax.call_tir(dense_gv, [q, k_cache, v_cache, *pos, layer, n], part))
    sparse_gv = kern.get("sparse_tree_attention", sparse_attention.sparse_tree_attention,
                         hq, g, d, sized=False)
    sparse = bb.emit(relax.call_tir(sparse_gv, [q, *kv_tree, *tree], part))
    merge_gv = kern.get("attention_merge", ops.attention_merge, hq, d)
    return bb.emit(relax.call_tir(merge_gv, [dense, sparse], tt((w, hq, d), "float32")))


def _forward(bb, kern: _Kernels, cfg: LlamaConfig, inputs, params: dict, last_only: bool,
             valid_rows=None):
    """``inputs``: tokens, positions, the tree (``(mask,)`` or ``(row_ptr, col_idx)``),
    k_cache, v_cache, n; ``valid_rows``: with ``last_only``, the row count whose last row is
    kept (a padded chunk), else the last row."""
    c = compiler()
    relax, tt = c.relax, c.TensorType
    tokens, positions, tree, k_cache, v_cache, n = inputs
    w = tokens.ty.shape[0]
    e, f = cfg.hidden_size, cfg.intermediate_size
    hq, d = cfg.num_heads, cfg.head_dim

    def call(gv, args, shape, dtype="float32"):
        return bb.emit(relax.call_tir(gv, args, tt(shape, dtype)))

    norm_gv = kern.get("rms_norm", ops.rms_norm, e, cfg.norm_eps)
    # The CUDA-graph build rotates inside its attention kernel (_tree_attention).
    rope_gv = None if kern.device_len else kern.get(
        "rope_kv", functools.partial(script_ops.rope_kv, kv_dtype=kern.kv_dtype), hq,
        cfg.num_kv_heads, d, cfg.num_layers, cfg.max_context, sized=False)
    if kern.device_len:
        # The kernels read the call's positions and mask from copies at fixed addresses (a
        # CUDA graph captures those), and the cache length as positions[0].
        staged = bb.emit(relax.call_tir(
            kern.get("stage_tree", script_ops.stage_tree, sized=False), [positions, tree[0]],
            [tt((w,), "int32"), tt((w, w), "int32")]))
        positions = bb.emit(relax.TupleGetItem(staged, 0))
        tree = (bb.emit(relax.TupleGetItem(staged, 1)),)
    act_gv = kern.get(ACTIVATION_KERNELS[cfg.activation], ops.ACTIVATIONS[cfg.activation], f)
    # Gemma: the attention and MLP outputs are normed before they join the residual, so those
    # linears add no residual and a residual norm (norm(y) + x) follows each.
    residual = residual_linears(cfg.post_norms)
    post_gv = (kern.get("rms_norm_res", functools.partial(ops.rms_norm, residual=True), e,
                        cfg.norm_eps) if "o" not in residual else None)
    x = call(kern.embed(), [tokens, params["embed"]], (w, e))
    tables = {}  # one RoPE table per base (Gemma 3: local and global layers differ)
    for theta in dict.fromkeys(cfg.layer_rope_theta(i) for i in range(cfg.num_layers)):
        name = "rope_table" if theta == cfg.rope_theta else "rope_table_win"  # "_win": above
        tables[theta] = call(kern.get(name, ops.rope_table, d, theta), [positions], (w, d))

    def residual_linear(p, n_out, k_in, inp, weight, post, res):
        if post_gv is None:
            return call(kern.linear(n_out, k_in, True), [inp, params[p + weight], res], (w, n_out))
        y = call(kern.linear(n_out, k_in, False), [inp, params[p + weight]], (w, n_out))
        return call(post_gv, [y, params[p + post], res], (w, n_out))

    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        h = call(norm_gv, [x, params[p + "attn_norm"]], (w, e))
        qkv = call(kern.linear(cfg.qkv_size, e, False), [h, params[p + "wqkv"]], (w, cfg.qkv_size))
        if cfg.qkv_bias:
            qkv = call(kern.get("bias_add", ops.bias_add, cfg.qkv_size),
                       [qkv, params[p + "bqkv"]], (w, cfg.qkv_size))
        qk_gammas = (params[p + "q_norm"], params[p + "k_norm"]) if cfg.qk_norm else ()
        if qk_gammas and not kern.device_len:  # (the CUDA-graph build's attention norms)
            qkv = call(kern.get("qk_norm", script_ops.qk_norm, hq, cfg.num_kv_heads, d,
                                cfg.norm_eps, sized=False), [qkv, *qk_gammas], (w, cfg.qkv_size))
        layer = c.prim_value(c.tir.IntImm("int64", i))
        cs = tables[cfg.layer_rope_theta(i)]
        if kern.device_len:
            o, k_cache, v_cache = _tree_attention(bb, kern, cfg, qkv, cs, k_cache, v_cache,
                                                  tree[0], positions, layer, cfg.layer_window(i),
                                                  qk_gammas)
        else:
            res = bb.emit(relax.call_tir_inplace(
                rope_gv, [qkv, cs, k_cache, v_cache, layer, n], [-1, 2, 3, -1, -1],
                [tt((hq, w, d), "float32"), k_cache.ty, v_cache.ty,
                 tt((cfg.num_kv_heads, w, d), "float32"),
                 tt((cfg.num_kv_heads, w, d), "float32")]))
            q = bb.emit(relax.TupleGetItem(res, 0))
            k_cache = bb.emit(relax.TupleGetItem(res, 1))
            v_cache = bb.emit(relax.TupleGetItem(res, 2))
            kv_tree = (bb.emit(relax.TupleGetItem(res, 3)), bb.emit(relax.TupleGetItem(res, 4)))
            o = _attention(bb, kern, cfg, q, kv_tree, k_cache, v_cache, tree, layer, n,
                           positions, cfg.layer_window(i))
        o = bb.emit(relax.op.reshape(o, (w, hq * d)))
        x = residual_linear(p, e, hq * d, o, "wo", "post_attn_norm", x)
        h = call(norm_gv, [x, params[p + "ffn_norm"]], (w, e))
        gu = call(kern.linear(2 * f, e, False), [h, params[p + "w_gate_up"]], (w, 2 * f))
        a = call(act_gv, [gu], (w, f))
        x = residual_linear(p, e, f, a, "w_down", "post_ffn_norm", x)
    rows = w
    if last_only:
        if valid_rows is None:
            x = call(kern.get("take_last", ops.take_last, e), [x], (1, e))
        else:
            x = call(kern.get("take_row", ops.take_row, e), [x, valid_rows], (1, e))
        rows = 1
        if kern.rows is not None:  # a static chunk: the rest runs on one row
            kern.rows = 1
            norm_gv = kern.get("rms_norm", ops.rms_norm, e, cfg.norm_eps)
    hidden = call(norm_gv, [x, params["norm"]], (rows, e))
    head = params["lm_head"] if "lm_head" in params else params["embed"]
    logits = call(kern.linear(cfg.vocab_size, e, False, dtype=head_dtype(kern.wdtype)),
                  [hidden, head], (rows, cfg.vocab_size))
    ids = call(kern.get("argmax", ops.argmax, cfg.vocab_size), [logits], (rows,), "int32")
    return logits, hidden, ids, k_cache, v_cache


def medusa_param_specs(cfg: LlamaConfig, num_heads: int, wdtype: str, root: bool = False):
    """The heads stacked: ``medusa.w`` (packed, ``K * E`` output columns: head k's are
    ``k * E .. (k + 1) * E``), ``medusa.b`` ``[K, E]`` and, for root-conditioned heads,
    ``medusa.u`` (packed like ``w``); ``wdtype`` is the draft's weight dtype. One linear
    then computes every head (one launch, not one per head)."""
    e = cfg.hidden_size
    specs = [("medusa.w", ops.packed_shape(num_heads * e, e), wdtype),
             ("medusa.b", (num_heads, e), "float32")]
    if root:
        specs.append(("medusa.u", ops.packed_shape(num_heads * e, e), wdtype))
    return specs


def _add_medusa(bb, kern: _Kernels, cfg: LlamaConfig, num_heads: int, wdtype: str, root: bool,
                draft_dtype: str | None = None, draft_vocab: int = 0):
    """``medusa(hidden[w, E], sel[2, W], embed, lm_head, w, b, [u], [vocab])``
    ``-> (logits[K, V], top-10 ids[K, 10], tokens[W])``.

    ``hidden``: the hidden states of a verify call's rows (or prefill's last row); ``sel``
    (int32): ``sel[0, 0]`` the row to draft from, ``sel[1]`` the next tree's nodes, root
    first, each a token id (>= 0) or ``-1 - (k * 10 + r)`` for head k's rank-r candidate
    (a second row rather than one more element: the tokens' length is then the call's own
    ``W``, with no shape computation on the host). ``tokens``: the nodes as
    token ids (``script_ops.draft_tokens``), ready for the next verify call on the device:
    the hidden states and the candidates never travel to the host and back between the two
    calls. The row and the root are copied first (``script_ops.stage_draft``), so that the
    heads of the build for CUDA graphs (``kern.device_len``) read buffers of their own and
    replay as one graph.

    Head k: ``h + SiLU(W_k h + U_k e + b_k)`` into the LM head (the heads' weights stacked,
    :func:`medusa_param_specs`), ``e`` the root token's stored
    embedding (root-conditioned heads only; ``root`` is ignored otherwise). ``draft_dtype``:
    the dtype of the draft's weights, ``W_k``, ``U_k`` and its LM head (float16 halves the
    bytes the draft reads every step; drafts only propose, so verification stays exact).
    ``draft_vocab = Vd > 0``: the LM head holds only the rows of a draft vocabulary
    ``vocab[Vd]`` (int32 token ids), the logits are ``[K, Vd]`` and the top ids are mapped
    back through ``vocab``.
    """
    c = compiler()
    relax, tt = c.relax, c.TensorType
    e, v = cfg.hidden_size, cfg.vocab_size
    rows, nodes = c.tir.Var("w", "int64"), c.tir.Var("s", "int64")
    hidden_rows = relax.Var("hidden", tt((rows, e), "float32"))
    sel = relax.Var("sel", tt((2, nodes), "int32"))
    shapes = {n: (sh, dt) for n, sh, dt in param_specs(cfg, wdtype)}
    embed = relax.Var("embed", tt(*shapes["embed"]))
    draft_dtype = draft_dtype or wdtype
    # A quantized model's draft reads the LM head in its own block format (no float copy).
    head_fmt = head_dtype(wdtype) if quant.is_quant(wdtype) else draft_dtype
    vd = draft_vocab or v  # the draft's output columns
    _, head_shape, head_dt = weight_spec("lm_head", vd, e, head_fmt)
    lm_head = relax.Var("lm_head", tt(head_shape, head_dt))
    specs = medusa_param_specs(cfg, num_heads, draft_dtype, root)
    pvars = {n: relax.Var(n.replace(".", "_"), tt(sh, d)) for n, sh, d in specs}
    vocab = [relax.Var("vocab", tt((vd,), "int32"))] if draft_vocab else []
    act_gv = kern.get("medusa_act", ops.medusa_act, e, num_heads, sized=False)
    with bb.function("medusa", [hidden_rows, sel, embed, lm_head, *pvars.values(), *vocab],
                     attrs={"num_input": 2}):
        with bb.dataflow():
            # A copy at a fixed address (the call's own tensors move): in the CUDA-graph
            # build the heads and their activation replay as one graph.
            staged = bb.emit(relax.call_tir(
                kern.get("stage_draft", script_ops.stage_draft, e, sized=False),
                [hidden_rows, sel], [tt((1, e), "float32"), tt((1,), "int32")]))
            hidden = bb.emit(relax.TupleGetItem(staged, 0))
            root_tok = bb.emit(relax.TupleGetItem(staged, 1))
            emb = None
            if root:  # (the table's row as stored: what calibration trains the heads on)
                emb = bb.emit(relax.call_tir(kern.embed(rows=1, scaled=False),
                                             [root_tok, embed], tt((1, e), "float32")))
            # Every head in one linear (their weights stacked by output column), the root's
            # term in a second, then the activation writes the heads' rows [K, E].
            ke = num_heads * e
            z = bb.emit(relax.call_tir(kern.linear(ke, e, False, 1, draft_dtype),
                                       [hidden, pvars["medusa.w"]], tt((1, ke), "float32")))
            if root:
                z = bb.emit(relax.call_tir(kern.linear(ke, e, True, 1, draft_dtype),
                                           [emb, pvars["medusa.u"], z], tt((1, ke), "float32")))
            stacked = bb.emit(relax.call_tir(act_gv, [hidden, z, pvars["medusa.b"]],
                                             tt((num_heads, e), "float32")))
            head_gv = kern.linear(vd, e, False, num_heads, head_fmt)
            logits = bb.emit(relax.call_tir(head_gv, [stacked, lm_head],
                                            tt((num_heads, vd), "float32")))
            # Candidates ranked on the device (a host-side argpartition cost ~2 ms a step).
            if kern.device_len:
                # One launch that keeps a top-k per thread and merges them, the vocabulary
                # map fused (TVM's GPU topk sorts whole rows in several launches).
                top_gv = kern.get("medusa_topk", functools.partial(
                    script_ops.topk_rows, mapped=bool(draft_vocab)), vd, MEDUSA_TOPK,
                    rows=num_heads)
                # Bound as an output: RewriteDataflowReshape probes every one-input call_tir
                # of a dataflow binding for a reshape, which a script kernel cannot answer.
                top = bb.emit_output(relax.call_tir(top_gv, [logits, *vocab],
                                                    tt((num_heads, MEDUSA_TOPK), "int32")))
            else:
                top = bb.emit(relax.op.topk(logits, k=MEDUSA_TOPK, axis=-1,
                                            ret_type="indices"))
                if draft_vocab:
                    top = bb.emit(relax.op.take(vocab[0], top, axis=0, mode="clip"))
            tokens = bb.emit_output(relax.call_tir(
                kern.get("draft_tokens", script_ops.draft_tokens, num_heads, MEDUSA_TOPK,
                         sized=False), [top, sel], tt((nodes,), "int32")))
            out = bb.emit_output(relax.Tuple([logits, top, tokens]))
        bb.emit_func_output(out)


def build_module(cfg: LlamaConfig, wdtype: str = "float32", medusa_heads: int = 0,
                 static_widths: tuple[int, ...] = (), medusa_root: bool = False,
                 draft_dtype: str | None = None, draft_vocab: int = 0,
                 fused_widths: tuple[int, ...] = FUSED_WIDTHS, prefill_chunk: int = 0,
                 kv_dtype: str = "float32", device_len: bool = False,
                 exact_attention: bool = False):
    """The unscheduled Relax IRModule of the decoder for weight dtype ``wdtype``.

    ``verify`` takes any width; ``verify_w{W}`` for each W in ``static_widths`` is the same
    function specialised to W rows, whose kernels tile exactly (the runtime prefers them).
    With ``medusa_heads = K > 0`` it also has ``medusa(hidden[1, E], root[1], embed, lm_head,
    *head params)`` returning the K heads' logits ``[K, V]`` (``medusa_root``: heads
    conditioned on the root token's embedding; ``draft_dtype``: the dtype of its LM head,
    default ``wdtype``; ``draft_vocab``: the size of its draft vocabulary, 0 for the whole
    one). ``verify_w{W}`` for W in ``fused_widths`` runs the fused masked attention kernel;
    every other verify the dense + sparse + merge split (module doc), unless
    ``exact_attention``: then every verify runs the fused kernel, its softmax summed in
    float64 (``ops.attention(exact=True)``), which gives each tree row the floats sequential
    decoding gives it (for linears on int8 activations, where the split's rounding
    differences grow: :data:`hetcomp.decoder.FUSED_WIDTHS`). ``prefill_chunk = C > 0`` adds
    ``prefill_w{C}`` (module doc). ``kv_dtype``: the KV cache's element type
    (``float16`` halves its bytes; attention widens every element to float32 as it reads it
    and accumulates in float32). The module attribute
    ``hetcomp.model_functions`` lists the functions that run the decoder (what partitioning
    applies to).

    ``device_len``: the build for CUDA graphs (a whole-model GPU build). The kernels read the
    cache length on the device as ``positions[0]`` (the root's, a chunk's first position:
    every caller's calls hold it) from copies of positions and mask at fixed addresses
    (``script_ops.stage_tree``), every attention is ``script_ops.tree_attention`` (masked,
    fused: ``fused_widths`` and the CSR are unused; it applies RoPE, Gemma's q/k norm and
    writes the tree's K/V into the caches itself, so no ``rope_kv`` or ``qk_norm`` runs),
    and ``verify_w{W}`` and ``prefill_w{C}`` count only the call's own values as inputs (``num_input``: the tree, a chunk's ``rows``),
    so that TVM's RewriteCUDAGraph captures the whole step or chunk
    from the first layer to the final norm, the caches included: a graph replays the cache
    addresses it captured, so the caller passes the same two caches to every call (the
    runtime's :class:`~hetcomp.runtime.artifact.Artifact` owns them). Outside the graph:
    the embedding gather and the copy (they read the call's arguments), a chunk's row gather
    (it reads ``rows``) and the kernels that write the call's outputs.
    """
    c = compiler()
    relax, tir, tt = c.relax, c.tir, c.TensorType
    # The sparse part applies no window: a tree node's ancestors are < W positions back.
    assert not cfg.sliding_window or max(static_widths, default=0) <= cfg.sliding_window, (
        "tree widths above the sliding window")
    bb = c.BlockBuilder()
    kern = _Kernels(bb, cfg, wdtype, kv_dtype, device_len, exact_attention)
    k_shape, v_shape = kv_cache_shapes(cfg)
    specs = param_specs(cfg, wdtype)

    def cache_vars():
        n = tir.Var("n", "int64")
        return (relax.Var("k_cache", tt(k_shape, kv_dtype)),
                relax.Var("v_cache", tt(v_shape, kv_dtype)),
                relax.Var("cache_len", c.ShapeType([n])), n)

    functions = [("prefill", True, None), ("verify", False, None)]
    functions += [(f"prefill_w{prefill_chunk}", True, prefill_chunk)] if prefill_chunk else []
    functions += [(f"verify_w{r}", False, r) for r in static_widths]
    for fname, last_only, rows in functions:
        kern.rows = rows
        w = tir.Var("w", "int64") if rows is None else rows
        tokens = relax.Var("tokens", tt((w,), "int32"))
        positions = relax.Var("positions", tt((w,), "int32"))
        mask = relax.Var("mask", tt((w, w), "int32"))
        csr = [] if last_only else [relax.Var("row_ptr", tt((w + 1,), "int32")),
                                    relax.Var("col_idx", tt((tir.Var("nnz", "int64"),), "int32"))]
        tree = ((mask,) if last_only or device_len or exact_attention or rows in fused_widths
                else tuple(csr))
        k_cache, v_cache, cache_len, n = cache_vars()
        m = tir.Var("m", "int64")
        valid = [relax.Var("rows", c.ShapeType([m]))] if last_only and rows else []
        pvars = {name: relax.Var(name.replace(".", "_"), tt(shape, dt)) for name, shape, dt in specs}
        # The call's own values first, then the caches, then the weights: RewriteCUDAGraph
        # captures kernels whose arguments past ``num_input`` are fixed, and keys a capture by
        # the symbolic values defined past it (``rows``' would key one per chunk tail).
        own = [tokens, positions, mask, *csr, *valid]
        args = [*own, k_cache, v_cache, cache_len, *pvars.values()]
        fixed_caches = device_len and rows is not None
        inputs = len(own) if fixed_caches else len(args) - len(pvars)
        with bb.function(fname, args, attrs={"num_input": inputs}):
            with bb.dataflow():
                outs = _forward(bb, kern, cfg, (tokens, positions, tree, k_cache, v_cache,
                                                c.prim_value(n)), pvars, last_only,
                                c.prim_value(m) if valid else None)
                out = bb.emit_output(relax.Tuple(list(outs)))
            bb.emit_func_output(out)

    kern.rows = None
    k_cache, v_cache, cache_len, n = cache_vars()
    a = tir.Var("a", "int64")
    accepted = relax.Var("accepted", tt((a,), "int32"))
    commit_gv = kern.get("kv_commit", functools.partial(script_ops.kv_commit, kv_dtype=kv_dtype),
                         cfg.num_kv_heads, cfg.head_dim, cfg.num_layers, cfg.max_context,
                         sized=False)
    with bb.function("commit", [k_cache, v_cache, accepted, cache_len]):
        with bb.dataflow():
            res = bb.emit(relax.call_tir_inplace(
                commit_gv, [k_cache, v_cache, accepted, c.prim_value(n)], [0, 1],
                [k_cache.ty, v_cache.ty]))
            out = bb.emit_output(res)
        bb.emit_func_output(out)
    if medusa_heads:
        _add_medusa(bb, kern, cfg, medusa_heads, wdtype, medusa_root, draft_dtype, draft_vocab)
    mod = bb.finalize()
    return mod.with_attr("hetcomp.model_functions", [f for f, _, _ in functions])
