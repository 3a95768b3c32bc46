// The target's greedy pick inside its graph, for all of a pass's output rows at once (a llama.cpp backend sampler).
//
// llama.cpp applies a backend sampler to each output row on its own, and its greedy sampler adds an argmax of the row:
// one GPU block scanning 150,000-250,000 logits, some 30 us on an H100 for the coder's vocabulary, and a 16-token
// verification runs 16 of them one after the other (0.49 ms of its 5.7). This sampler, at the first row llama.cpp
// hands it in a graph, takes the argmax of every row of the logits that row is a view of, in two stages that a GPU
// spreads over a block per chunk:
//   x [V, R] -> chunks [C, G*R] -> argmax of each chunk: loc [G*R] -> its value [G, R] -> argmax: the chunk of each
//   row's first maximum, best [R] -> index = best * C + loc[best], in float32 (exact below 2^24) -> int32 [R]
// and gives each row a view of its index. The first of equal maxima wins, as in ggml's argmax and numpy's: the first
// chunk holding the maximum, and its first position there. Samplers made to share one's picks (a tree's branches, each
// a sequence with a sampler of its own) take their rows' views of the same argmax: one for the pass however many
// sequences its rows belong to.
#include "dflash.h"

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#include <cmath>
#include <memory>

namespace {

struct greedy_rows {
    bool          two_stage = true;     // the device runs the two stages' ops (else a plain argmax: backend_init)
    ggml_tensor * logits    = nullptr;  // the graph's logits of all rows, argmax already built for this graph
    ggml_tensor * picks     = nullptr;  // their argmax, int32 [rows]
};

// a sampler's context: the picks it shares with the samplers made from it (dflash_greedy_sampler_share)
using shared_rows = std::shared_ptr<greedy_rows>;

greedy_rows * rows_of(const llama_sampler * smpl) { return static_cast<shared_rows *>(smpl->ctx)->get(); }

// chunks per row: the largest divisor of V up to sqrt(V) (the two stages about even: 128 for the coder's 151,936, 485
// for Qwen3.5's 248,320), or 1 (a plain argmax) for a prime V or one too large for float32 indices
int64_t n_chunks(int64_t V) {
    if (V >= (1 << 24)) {
        return 1;
    }
    for (int64_t g = (int64_t) std::sqrt((double) V); g >= 2; --g) {
        if (V % g == 0) {
            return g;
        }
    }
    return 1;
}

// argmax of each row of a contiguous float32 x [V, R]: int32 [R]
ggml_tensor * argmax_rows(ggml_context * ctx, ggml_tensor * x, bool two_stage) {
    const int64_t V = x->ne[0], R = x->ne[1], G = two_stage ? n_chunks(V) : 1, C = V / G;
    if (G == 1) {
        return ggml_argmax(ctx, x);
    }
    ggml_tensor * loc  = ggml_argmax(ctx, ggml_reshape_2d(ctx, x, C, G * R));            // [G*R]
    ggml_tensor * vals = ggml_get_rows(ctx, ggml_reshape_3d(ctx, x, 1, C, G * R),
                                       ggml_reshape_2d(ctx, loc, 1, G * R));             // [1, 1, G*R]
    ggml_tensor * best = ggml_argmax(ctx, ggml_reshape_2d(ctx, vals, G, R));             // [R]
    ggml_tensor * locb = ggml_get_rows(ctx, ggml_reshape_3d(ctx, ggml_cast(ctx, loc, GGML_TYPE_F32), 1, G, R),
                                       ggml_reshape_2d(ctx, best, 1, R));                // [1, 1, R]
    ggml_tensor * idx  = ggml_add(ctx, ggml_scale(ctx, ggml_cast(ctx, best, GGML_TYPE_F32), (float) C),
                                  ggml_reshape_1d(ctx, locb, R));
    return ggml_cast(ctx, idx, GGML_TYPE_I32);
}

const char * name(const llama_sampler *) { return "dflash-greedy"; }

// on the host, where a row's logits came back (not a backend pass): the first of equal maxima
void apply(llama_sampler *, llama_token_data_array * cur_p) {
    cur_p->selected = 0;
    for (size_t i = 1; i < cur_p->size; ++i) {
        if (cur_p->data[i].logit > cur_p->data[cur_p->selected].logit) {
            cur_p->selected = (int64_t) i;
        }
    }
}

llama_sampler * clone(const llama_sampler *) { return dflash_greedy_sampler_new(); }

void free_ctx(llama_sampler * smpl) { delete static_cast<shared_rows *>(smpl->ctx); }

// whether dev runs every op of the pick (a probe graph over made-up logits of 2 rows of 151,936)
bool supports(ggml_backend_dev_t dev, bool two_stage) {
    ggml_init_params params = { 64 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, /*.no_alloc =*/ true };
    ggml_context *   ctx    = ggml_init(params);
    ggml_cgraph *    gf     = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, argmax_rows(ctx, ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 151936, 2), two_stage));
    bool ok = true;
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ok = ok && ggml_backend_dev_supports_op(dev, ggml_graph_node(gf, i));
    }
    ggml_free(ctx);
    return ok;
}

// the two stages where the device runs their ops (a device without one: a plain argmax of all rows, one block a row,
// still one kernel for the pass instead of one a row)
bool backend_init(llama_sampler * smpl, ggml_backend_buffer_type_t buft, uint32_t) {
    auto *             s   = rows_of(smpl);
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    s->two_stage           = !dev || supports(dev, true);
    return s->two_stage || supports(dev, false);
}

void backend_apply(llama_sampler * smpl, ggml_context * ctx, ggml_cgraph *, llama_sampler_data * data) {
    auto *        s   = rows_of(smpl);
    ggml_tensor * row = data->logits;  // a view of one row of the graph's logits [V, rows]
    ggml_tensor * all = row->view_src;
    const bool    of_all = all && all->type == GGML_TYPE_F32 && ggml_is_contiguous(all) && ggml_is_matrix(all) &&
                        all->ne[0] == row->ne[0] && ggml_nelements(row) == row->ne[0] && row->view_offs % all->nb[1] == 0;
    if (!of_all) {  // a lone row
        data->sampled = argmax_rows(ctx, ggml_reshape_2d(ctx, row, ggml_nelements(row), 1), s->two_stage);
        return;
    }
    if (s->logits != all) {
        s->logits = all;
        s->picks  = argmax_rows(ctx, all, s->two_stage);
    }
    const size_t r = row->view_offs / all->nb[1];
    data->sampled  = ggml_view_1d(ctx, s->picks, 1, r * ggml_element_size(s->picks));
}

// before llama.cpp builds a graph: the last one's tensors are gone
void backend_reset(llama_sampler * smpl) {
    auto * s  = rows_of(smpl);
    s->logits = s->picks = nullptr;
}

llama_sampler_i iface = {  // not const: llama_sampler_init takes a mutable one
    /* .name              = */ name,
    /* .accept            = */ nullptr,
    /* .apply             = */ apply,
    /* .reset             = */ nullptr,
    /* .clone             = */ clone,
    /* .free              = */ free_ctx,
    /* .backend_init      = */ backend_init,
    /* .backend_accept    = */ nullptr,
    /* .backend_apply     = */ backend_apply,
    /* .backend_set_input = */ nullptr,
    /* .backend_reset     = */ backend_reset,
    /* .copy_state        = */ nullptr,
};

}  // namespace

llama_sampler * dflash_greedy_sampler_new(void) {
    return llama_sampler_init(&iface, new shared_rows(std::make_shared<greedy_rows>()));
}

llama_sampler * dflash_greedy_sampler_share(const llama_sampler * other) {
    return llama_sampler_init(&iface, new shared_rows(*static_cast<const shared_rows *>(other->ctx)));
}
