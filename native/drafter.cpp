// The DFlash v1 drafter on ggml (docs/design.md, section 2). Two graphs, each kept between calls while its shape
// holds (graph_slot):
//   inject: target features -> fc -> hidden_norm -> per layer K = rope(k_norm(Wk g)), V = Wv g,
//           written into the drafter's KV cache at their positions;
//   draft:  [anchor, MASK...] -> target token_embd -> layers with non-causal attention over
//           cached context + block -> output_norm -> target LM head -> argmax on the backend.
#include "dflash.h"
#include "common.h"
#include "dflash_schema.h"

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct dflash_layer {
    ggml_tensor * attn_norm, * wq, * wk, * wv, * wo, * q_norm, * k_norm;
    ggml_tensor * ffn_norm, * gate, * up, * down;
};

struct gguf_file {
    gguf_context * gguf = nullptr;
    ggml_context * meta = nullptr;
    std::string    path;

    explicit gguf_file(const std::string & p) : path(p) {
        gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &meta };
        gguf = gguf_init_from_file(p.c_str(), params);
        if (!gguf) {
            throw std::runtime_error("cannot read GGUF file '" + p + "' (missing, or not a valid GGUF)");
        }
    }
    ~gguf_file() {
        gguf_free(gguf);
        ggml_free(meta);
    }
    gguf_file(const gguf_file &) = delete;
    gguf_file & operator=(const gguf_file &) = delete;

    std::string str(const std::string & key, const std::string & fallback = "") const {
        const int64_t id = gguf_find_key(gguf, key.c_str());
        return id < 0 || gguf_get_kv_type(gguf, id) != GGUF_TYPE_STRING ? fallback : gguf_get_val_str(gguf, id);
    }
    bool has(const std::string & key) const {
        if (key.rfind("dflash.", 0) == 0 && !dflash_schema_has(key.c_str())) {
            throw std::logic_error("not a key of the schema: " + key);  // a typo would read as absent
        }
        return gguf_find_key(gguf, key.c_str()) >= 0;
    }

    // A numeric scalar of any integer or float type.
    double num(const std::string & key) const {
        const int64_t id = gguf_find_key(gguf, key.c_str());
        if (id < 0) {
            throw std::runtime_error("'" + path + "' lacks the metadata key " + key);
        }
        switch (gguf_get_kv_type(gguf, id)) {
            case GGUF_TYPE_UINT8:   return gguf_get_val_u8(gguf, id);
            case GGUF_TYPE_INT8:    return gguf_get_val_i8(gguf, id);
            case GGUF_TYPE_UINT16:  return gguf_get_val_u16(gguf, id);
            case GGUF_TYPE_INT16:   return gguf_get_val_i16(gguf, id);
            case GGUF_TYPE_UINT32:  return gguf_get_val_u32(gguf, id);
            case GGUF_TYPE_INT32:   return gguf_get_val_i32(gguf, id);
            case GGUF_TYPE_UINT64:  return (double) gguf_get_val_u64(gguf, id);
            case GGUF_TYPE_INT64:   return (double) gguf_get_val_i64(gguf, id);
            case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(gguf, id);
            case GGUF_TYPE_FLOAT64: return gguf_get_val_f64(gguf, id);
            default: throw std::runtime_error("metadata key " + key + " in '" + path + "' is not a number");
        }
    }
    double num(const std::string & key, double fallback) const { return has(key) ? num(key) : fallback; }

    std::vector<int64_t> ints(const std::string & key) const {
        const int64_t id = gguf_find_key(gguf, key.c_str());
        if (id < 0 || gguf_get_kv_type(gguf, id) != GGUF_TYPE_ARRAY) {
            throw std::runtime_error("'" + path + "' lacks the integer array " + key);
        }
        const size_t n    = gguf_get_arr_n(gguf, id);
        const auto   type = gguf_get_arr_type(gguf, id);
        const void * data = type == GGUF_TYPE_STRING ? nullptr : gguf_get_arr_data(gguf, id);
        std::vector<int64_t> out;
        for (size_t i = 0; i < n; ++i) {
            switch (type) {
                case GGUF_TYPE_INT32:  out.push_back(((const int32_t  *) data)[i]); break;
                case GGUF_TYPE_UINT32: out.push_back(((const uint32_t *) data)[i]); break;
                case GGUF_TYPE_INT64:  out.push_back(((const int64_t  *) data)[i]); break;
                case GGUF_TYPE_UINT64: out.push_back((int64_t) ((const uint64_t *) data)[i]); break;
                default: throw std::runtime_error(key + " in '" + path + "' is not an integer array");
            }
        }
        return out;
    }
    size_t arr_len(const std::string & key) const {
        const int64_t id = gguf_find_key(gguf, key.c_str());
        return id < 0 || gguf_get_kv_type(gguf, id) != GGUF_TYPE_ARRAY ? 0 : gguf_get_arr_n(gguf, id);
    }

    ggml_tensor * tensor(const std::string & name) const { return ggml_get_tensor(meta, name.c_str()); }

    // Copy the file bytes of `name` into `dst` (allocated on its backend).
    void load(const std::string & name, ggml_tensor * dst, std::vector<uint8_t> & buf) const {
        const int64_t id = gguf_find_tensor(gguf, name.c_str());
        const size_t  n  = ggml_nbytes(dst);
        buf.resize(n);
        std::unique_ptr<FILE, int (*)(FILE *)> f(std::fopen(path.c_str(), "rb"), std::fclose);
        const size_t off = gguf_get_data_offset(gguf) + gguf_get_tensor_offset(gguf, id);
        if (!f || std::fseek(f.get(), (long) off, SEEK_SET) != 0 || std::fread(buf.data(), 1, n, f.get()) != n) {
            throw std::runtime_error("'" + path + "' is truncated: cannot read tensor " + name);
        }
        ggml_backend_tensor_set(dst, buf.data(), 0, n);
    }
};

ggml_backend_t init_backend(const char * device, int32_t n_threads) {
    ggml_backend_dev_t dev = device && *device ? ggml_backend_dev_by_name(device)
                                               : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) {
        throw std::runtime_error(std::string("no ggml device named '") + device + "' (available: " + dflash_devices() + ")");
    }
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    if (!backend) {
        throw std::runtime_error(std::string("cannot start ggml device ") + ggml_backend_dev_name(dev));
    }
    auto * reg = ggml_backend_dev_backend_reg(dev);
    auto set_threads = (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads");
    if (set_threads && n_threads > 0) {
        set_threads(backend, n_threads);
    }
    return backend;
}

constexpr int kMaxNodes = 4096;

// A graph kept between calls: while its shape (`key`) holds, a call only sets its inputs and computes it. Rebuilding it
// every call would also keep the CUDA backend from replaying it as a CUDA graph, which it does only for a graph whose
// nodes stay the same (the same tensors at the same addresses, checked by the address of the first node: each slot
// has an arena of its own). Its gallocr buffer grows only when a bigger graph comes.
struct graph_slot {
    std::vector<int64_t> key;
    std::vector<uint8_t> arena;
    ggml_context *       ctx    = nullptr;
    ggml_cgraph *        gf     = nullptr;
    ggml_gallocr_t       galloc = nullptr;
    // the inputs a call sets (those its graph has) and the outputs it reads
    ggml_tensor * feat = nullptr, * tok = nullptr, * pos = nullptr, * mask = nullptr, * v_idx = nullptr;
    ggml_tensor * ids = nullptr, * probs = nullptr, * logits = nullptr;

    graph_slot() = default;
    graph_slot(const graph_slot &) = delete;
    graph_slot & operator=(const graph_slot &) = delete;
    ~graph_slot() { release(); }

    void release() {
        ggml_gallocr_free(galloc);
        ggml_free(ctx);
        galloc = nullptr;
        ctx    = nullptr;
        gf     = nullptr;
    }

    bool stale(const std::vector<int64_t> & shape) const { return !gf || shape != key; }

    // drops the graph kept and starts one of this shape in `ctx`/`gf`
    void begin(ggml_backend_t backend) {
        ggml_free(ctx);
        key.clear();
        if (arena.empty()) {
            arena.resize(ggml_tensor_overhead() * kMaxNodes + ggml_graph_overhead_custom(kMaxNodes, false));
        }
        if (!galloc) {
            galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
        }
        ggml_init_params p = { arena.size(), arena.data(), /*.no_alloc =*/ true };
        ctx  = ggml_init(p);
        gf   = ggml_new_graph_custom(ctx, kMaxNodes, false);
        feat = tok = pos = mask = v_idx = ids = probs = logits = nullptr;
    }

    // allocates the graph built, kept for calls of this shape
    void end(const std::vector<int64_t> & shape) {
        if (!ggml_gallocr_alloc_graph(galloc, gf)) {
            throw std::runtime_error("drafter: cannot allocate the compute graph");
        }
        key = shape;
    }

    void compute(ggml_backend_t backend) const {
        if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
            throw std::runtime_error("drafter: graph computation failed");
        }
    }
};

} // namespace

struct dflash_drafter {
    dflash_drafter_info info{};
    float   eps         = 1e-6f;
    float   rope_base   = 10000.0f;
    float   embd_scale  = 0.0f;   // 0: none
    int32_t n_pos       = 0;

    ggml_backend_t        backend = nullptr;
    ggml_context *        ctx_w   = nullptr;
    ggml_backend_buffer_t buf_w   = nullptr;
    ggml_context *        ctx_kv  = nullptr;
    ggml_backend_buffer_t buf_kv  = nullptr;
    // the shapes graphs keep (dflash_drafter_set_shapes)
    int32_t               kv_min      = 0;
    int32_t               inject_rows = 1;
    graph_slot            inject_graph, draft_graph;
    std::vector<float>    staging;  // inject's rows regrouped by layer

    ggml_tensor * fc = nullptr, * hidden_norm = nullptr, * output_norm = nullptr;
    ggml_tensor * tok_embd = nullptr, * output = nullptr;
    std::vector<dflash_layer>  layers;
    // K [head_dim, n_head_kv, n_ctx] f32; V transposed, [n_ctx, head_dim, n_head_kv] f32, so that a draft multiplies
    // the attention weights by it in place (a V stored by position was copied transposed every pass: the whole
    // context's V, each layer)
    std::vector<ggml_tensor *> k_cache, v_cache;

    ~dflash_drafter() {
        inject_graph.release();  // their buffers before the backend
        draft_graph.release();
        ggml_backend_buffer_free(buf_kv);
        ggml_free(ctx_kv);
        ggml_backend_buffer_free(buf_w);
        ggml_free(ctx_w);
        ggml_backend_free(backend);
    }

    ggml_tensor * norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * w) const {
        return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), w);
    }

    ggml_tensor * rope(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos) const {
        return ggml_rope_ext(ctx, x, pos, nullptr, info.head_dim, GGML_ROPE_TYPE_NEOX, 0, rope_base, 1.0f,
                             0.0f, 1.0f, 0.0f, 0.0f);
    }

    // K/V [head_dim, n_head_kv, n] of n new positions go into the cache of layer il: K as rows at the positions
    // (s.pos), V (transposed) element by element at the indices s.v_idx (set_positions)
    void store_kv(ggml_context * ctx, graph_slot & s, int il, ggml_tensor * k, ggml_tensor * v, int64_t n) const {
        const int64_t w = (int64_t) info.head_dim * info.n_head_kv;
        ggml_tensor * kc = ggml_reshape_2d(ctx, k_cache[il], w, info.n_ctx);
        ggml_tensor * vc = ggml_reshape_2d(ctx, v_cache[il], 1, w * info.n_ctx);
        ggml_build_forward_expand(s.gf, ggml_set_rows(ctx, kc, ggml_reshape_2d(ctx, k, w, n), s.pos));
        ggml_build_forward_expand(s.gf, ggml_set_rows(ctx, vc, ggml_reshape_2d(ctx, v, 1, w * n), s.v_idx));
    }

    // the inputs of n positions from pos0: for RoPE and the K rows, and where each V element goes
    void new_position_inputs(ggml_context * ctx, graph_slot & s, int64_t n) const {
        s.pos   = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
        s.v_idx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n * info.head_dim * info.n_head_kv);
        ggml_set_input(s.pos);
        ggml_set_input(s.v_idx);
    }

    void set_positions(graph_slot & s, int32_t pos0, int64_t n) const {
        const int64_t w = (int64_t) info.head_dim * info.n_head_kv;
        std::vector<int32_t> p(n), v(n * w);
        for (int64_t t = 0; t < n; ++t) {
            p[t] = pos0 + (int32_t) t;
            for (int64_t j = 0; j < w; ++j) {
                v[t * w + j] = (int32_t) (j * info.n_ctx + p[t]);  // element j of position t: V is [n_ctx, w]
            }
        }
        ggml_backend_tensor_set(s.pos, p.data(), 0, ggml_nbytes(s.pos));
        ggml_backend_tensor_set(s.v_idx, v.data(), 0, ggml_nbytes(s.v_idx));
    }
};

static void load_drafter(dflash_drafter & d, const std::string & drafter_path, const std::string & target_path,
                         const char * device, int32_t n_ctx, int32_t n_threads) {
    gguf_file dr(drafter_path);
    const std::string arch = dr.str("general.architecture");
    if (arch != dflash_schema::arch) {
        throw std::runtime_error("'" + drafter_path + "' is not a DFlash drafter (architecture '" + arch +
                                 "'; expected 'dflash')");
    }
    dflash_check_keys(dr.gguf, drafter_path);  // types, ranges, required and refused keys: the casts below are safe
    auto & in = d.info;
    in.n_embd    = (int32_t) dr.num("dflash.embedding_length");
    in.n_layer   = (int32_t) dr.num("dflash.block_count");
    in.n_ff      = (int32_t) dr.num("dflash.feed_forward_length");
    in.n_head    = (int32_t) dr.num("dflash.attention.head_count");
    in.n_head_kv = (int32_t) dr.num("dflash.attention.head_count_kv", in.n_head);
    in.block_size    = (int32_t) dr.num("dflash.block_size", dflash_schema_default("dflash.block_size"));
    in.mask_token_id = (int32_t) dr.num(dflash_schema::mask_key);
    in.n_ctx     = n_ctx;
    d.eps        = (float) dr.num("dflash.attention.layer_norm_rms_epsilon");
    d.rope_base  = (float) dr.num("dflash.rope.freq_base", dflash_schema_default("dflash.rope.freq_base"));
    d.embd_scale = (float) dr.num("dflash.embedding_scale", 0.0);

    // the rules beyond the schema's tables, as convert/schema_check.py has them: features the runtime does not
    // implement are refused, never ignored
    auto fail = [&](const std::string & msg) { return std::runtime_error(drafter_path + ": " + msg); };
    if (!dr.has("dflash.attention.key_length") && in.n_embd % in.n_head != 0) {
        throw fail("no dflash.attention.key_length, and embedding_length " + std::to_string(in.n_embd) +
                   " is not a multiple of head_count " + std::to_string(in.n_head));
    }
    in.head_dim = (int32_t) dr.num("dflash.attention.key_length", in.n_embd / in.n_head);
    if (in.n_head % in.n_head_kv != 0) {
        throw fail("dflash.attention.head_count " + std::to_string(in.n_head) + " is not a multiple of head_count_kv " +
                   std::to_string(in.n_head_kv));
    }
    if (in.head_dim % 2 != 0) {
        throw fail("the head size " + std::to_string(in.head_dim) + " is odd: RoPE needs an even head size");
    }
    for (const auto & [key, feature] : { std::pair{ "dflash.attention.value_length", "value heads of another size" },
                                         std::pair{ "dflash.rope.dimension_count", "partial rotary embeddings" } }) {
        if ((int64_t) dr.num(key, in.head_dim) != in.head_dim) {
            throw fail(std::string(key) + " = " + std::to_string((int64_t) dr.num(key)) +
                       " differs from the head size " + std::to_string(in.head_dim) + ": " + feature +
                       ", which this runtime does not implement");
        }
    }
    if (dr.has("dflash.rope.dimension_sections")) {
        // [head_dim/2, 0, 0, 0] (drafts for M-RoPE targets) is plain NeoX RoPE on the temporal position
        const auto s   = dr.ints("dflash.rope.dimension_sections");
        bool       any = false, rest = false;
        for (size_t i = 0; i < s.size(); ++i) {
            any  = any || s[i] != 0;
            rest = rest || (i > 0 && s[i] != 0);
        }
        if (any && (s[0] != in.head_dim / 2 || rest)) {
            throw fail("dflash.rope.dimension_sections: multi-section M-RoPE, which this runtime does not implement "
                       "(only [" + std::to_string(in.head_dim / 2) + ", 0, 0, 0])");
        }
    }
    const auto layers = dr.ints("dflash.target_layers");  // 1..max_target_layers ids >= 1 (schema)
    in.n_extract = (int32_t) layers.size();
    for (size_t i = 0; i < layers.size(); ++i) {
        in.target_layers[i] = (int32_t) layers[i];
    }
    const int64_t E = in.n_embd, HD = in.head_dim, Q = (int64_t) in.n_head * HD, KV = (int64_t) in.n_head_kv * HD;
    const int64_t dims[] = { E, E * in.n_extract, Q, KV, HD, in.n_ff };  // by dflash_schema::dim
    static_assert((int) dflash_schema::dim::FF == 5, "dims follows dflash_schema::dim");
    dflash_check_tensors(dr.gguf, dr.meta, dims, in.n_layer, drafter_path);

    gguf_file tg(target_path);
    const std::string tarch   = tg.str("general.architecture");
    const int32_t     t_embd  = (int32_t) tg.num(tarch + ".embedding_length");
    const int32_t     t_depth = (int32_t) tg.num(tarch + ".block_count");
    if (t_embd != in.n_embd) {
        throw std::runtime_error("drafter was made for another target: hidden size " + std::to_string(in.n_embd) +
                                 ", target '" + target_path + "' has " + std::to_string(t_embd));
    }
    for (int32_t i = 0; i < in.n_extract; ++i) {
        // layer L reads the output of target layer L-1; the last layer's output is trimmed by llama.cpp
        if (in.target_layers[i] < 1 || in.target_layers[i] >= t_depth) {
            throw std::runtime_error("drafter target layer " + std::to_string(in.target_layers[i]) +
                                     " is outside the target's usable layers 1.." + std::to_string(t_depth - 1));
        }
    }
    ggml_tensor * t_embd_meta = tg.tensor("token_embd.weight");
    if (!t_embd_meta) {
        throw std::runtime_error("target '" + target_path + "' has no token_embd.weight tensor");
    }
    ggml_tensor * t_out_meta = tg.tensor("output.weight");
    const std::string out_name = t_out_meta ? "output.weight" : "token_embd.weight";  // tied embeddings
    if (!t_out_meta) {
        t_out_meta = t_embd_meta;
    }
    in.n_vocab = (int32_t) t_out_meta->ne[1];
    if (t_embd_meta->ne[0] != in.n_embd || t_embd_meta->ne[1] != in.n_vocab) {
        throw std::runtime_error("target token_embd/output shapes disagree with its hidden size or vocabulary");
    }
    const size_t dr_vocab = dr.arr_len("tokenizer.ggml.tokens");
    if (dr_vocab != 0 && (int64_t) dr_vocab != in.n_vocab) {
        throw std::runtime_error("drafter was made for another target: vocabulary " + std::to_string(dr_vocab) +
                                 ", target has " + std::to_string(in.n_vocab));
    }
    if (in.mask_token_id < 0 || in.mask_token_id >= in.n_vocab) {
        throw std::runtime_error("drafter mask token id " + std::to_string(in.mask_token_id) + " is outside the vocabulary");
    }

    d.backend = init_backend(device, n_threads);

    // weights: the drafter's own tensors plus the target's embedding and LM head, nothing else of the target
    const int n_w = 5 + 11 * in.n_layer;
    ggml_init_params wp = { ggml_tensor_overhead() * (size_t) n_w, nullptr, /*.no_alloc =*/ true };
    d.ctx_w = ggml_init(wp);
    std::vector<std::pair<const gguf_file *, std::pair<std::string, ggml_tensor *>>> plan;
    auto take = [&](const gguf_file & f, const std::string & name, std::vector<int64_t> shape) -> ggml_tensor * {
        ggml_tensor * meta = f.tensor(name);
        if (!meta) {
            throw std::runtime_error("'" + f.path + "' lacks tensor " + name);
        }
        for (size_t i = 0; i < shape.size(); ++i) {
            if (meta->ne[i] != shape[i]) {
                throw std::runtime_error("tensor " + name + " in '" + f.path + "' has the wrong shape for this drafter");
            }
        }
        ggml_tensor * t = ggml_dup_tensor(d.ctx_w, meta);
        ggml_set_name(t, name.c_str());
        plan.push_back({ &f, { name, t } });
        return t;
    };
    d.fc          = take(dr, "fc.weight", { E * in.n_extract, E });
    d.hidden_norm = take(dr, "enc.output_norm.weight", { E });
    d.output_norm = take(dr, "output_norm.weight", { E });
    d.tok_embd    = take(tg, "token_embd.weight", { E, in.n_vocab });
    d.output      = out_name == "token_embd.weight" ? d.tok_embd : take(tg, out_name, { E, in.n_vocab });
    for (int il = 0; il < in.n_layer; ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        d.layers.push_back({
            take(dr, p + "attn_norm.weight", { E }),       take(dr, p + "attn_q.weight", { E, Q }),
            take(dr, p + "attn_k.weight", { E, KV }),      take(dr, p + "attn_v.weight", { E, KV }),
            take(dr, p + "attn_output.weight", { Q, E }),  take(dr, p + "attn_q_norm.weight", { HD }),
            take(dr, p + "attn_k_norm.weight", { HD }),    take(dr, p + "ffn_norm.weight", { E }),
            take(dr, p + "ffn_gate.weight", { E, in.n_ff }), take(dr, p + "ffn_up.weight", { E, in.n_ff }),
            take(dr, p + "ffn_down.weight", { in.n_ff, E }),
        });
    }
    d.buf_w = ggml_backend_alloc_ctx_tensors(d.ctx_w, d.backend);
    if (!d.buf_w) {
        throw std::runtime_error("cannot allocate the drafter weights on the device");
    }
    std::vector<uint8_t> buf;
    for (auto & [file, item] : plan) {
        file->load(item.first, item.second, buf);
    }

    ggml_init_params kp = { ggml_tensor_overhead() * (size_t) (2 * in.n_layer), nullptr, /*.no_alloc =*/ true };
    d.ctx_kv = ggml_init(kp);
    for (int il = 0; il < in.n_layer; ++il) {
        d.k_cache.push_back(ggml_new_tensor_3d(d.ctx_kv, GGML_TYPE_F32, HD, in.n_head_kv, n_ctx));
        d.v_cache.push_back(ggml_new_tensor_3d(d.ctx_kv, GGML_TYPE_F32, n_ctx, HD, in.n_head_kv));
    }
    d.buf_kv = ggml_backend_alloc_ctx_tensors(d.ctx_kv, d.backend);
    if (!d.buf_kv) {
        throw std::runtime_error("cannot allocate the drafter KV cache (" + std::to_string(n_ctx) + " positions)");
    }
    ggml_backend_buffer_clear(d.buf_kv, 0);

    if (ggml_backend_dev_type(ggml_backend_get_device(d.backend)) != GGML_BACKEND_DEVICE_TYPE_CPU) {
        d.kv_min      = 256;
        d.inject_rows = in.block_size;
    }
}

template <typename F> static int32_t guarded(F && f) {
    try {
        return f();
    } catch (const std::exception & e) {
        dflash_set_error(e.what());
        return -1;
    }
}

dflash_drafter * dflash_drafter_load(const char * drafter_path, const char * target_path, const char * device,
                                     int32_t n_ctx, int32_t n_threads) {
    auto d = std::make_unique<dflash_drafter>();
    if (guarded([&] {
            if (n_ctx <= 0) {
                throw std::runtime_error("n_ctx must be positive");
            }
            load_drafter(*d, drafter_path, target_path, device, n_ctx, n_threads);
            return 0;
        }) < 0) {
        return nullptr;
    }
    return d.release();
}

void dflash_drafter_free(dflash_drafter * d) { delete d; }

int32_t dflash_drafter_get_info(const dflash_drafter * d, dflash_drafter_info * out) {
    *out = d->info;
    return 0;
}

int32_t dflash_drafter_n_pos(const dflash_drafter * d) { return d->n_pos; }

int32_t dflash_drafter_crop(dflash_drafter * d, int32_t n_pos) {
    if (n_pos < 0) {
        dflash_set_error("crop position must be >= 0");
        return -1;
    }
    d->n_pos = std::min(d->n_pos, n_pos);
    return 0;
}

int32_t dflash_drafter_set_shapes(dflash_drafter * d, int32_t kv_min, int32_t inject_rows) {
    return guarded([&] {
        if (kv_min < 0 || inject_rows < 1 || inject_rows > d->info.block_size) {
            throw std::runtime_error("kv_min must be >= 0 and inject_rows in 1.." + std::to_string(d->info.block_size));
        }
        d->kv_min      = kv_min;
        d->inject_rows = inject_rows;
        return 0;
    });
}

int32_t dflash_drafter_inject_layers(dflash_drafter * d, const float * const * layers, int32_t n_tokens, int32_t pos0) {
    return guarded([&] {
        const auto & in = d->info;
        if (n_tokens <= 0 || pos0 < 0 || pos0 > d->n_pos) {
            throw std::runtime_error("inject: positions must continue the cache (have " + std::to_string(d->n_pos) +
                                     ", got " + std::to_string(pos0) + ")");
        }
        if (pos0 + n_tokens > in.n_ctx) {
            throw std::runtime_error("inject: drafter context is full (" + std::to_string(in.n_ctx) + " positions)");
        }
        // fewer rows than inject_rows (a decoding step's) run as inject_rows, so that every step has the same graph;
        // the rows past n_tokens land where the next draft writes its block
        const int64_t n = n_tokens < d->inject_rows && pos0 + d->inject_rows <= in.n_ctx ? d->inject_rows : n_tokens;
        auto &        s = d->inject_graph;
        if (s.stale({ n })) {
            s.begin(d->backend);
            ggml_context * ctx = s.ctx;
            // each extracted layer's rows apart, as the target leaves them: a copy per layer fills it. An output too,
            // so that its memory is never lent to another tensor: the padding rows keep earlier (finite) rows
            s.feat = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, in.n_embd, n, in.n_extract);
            ggml_set_input(s.feat);
            ggml_set_output(s.feat);
            d->new_position_inputs(ctx, s, n);

            // [n_embd, n, n_extract] -> [n_extract * n_embd, n]: a position's layers side by side, as fc reads them
            ggml_tensor * f = ggml_cont(ctx, ggml_permute(ctx, s.feat, 0, 2, 1, 3));
            f = ggml_reshape_2d(ctx, f, (int64_t) in.n_extract * in.n_embd, n);
            ggml_tensor * g = d->norm(ctx, ggml_mul_mat(ctx, d->fc, f), d->hidden_norm);
            for (int il = 0; il < in.n_layer; ++il) {
                const auto & L = d->layers[il];
                ggml_tensor * k = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wk, g), in.head_dim, in.n_head_kv, n);
                ggml_tensor * v = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wv, g), in.head_dim, in.n_head_kv, n);
                k = d->rope(ctx, d->norm(ctx, k, L.k_norm), s.pos);
                d->store_kv(ctx, s, il, k, v, n);
            }
            s.end({ n });
            ggml_backend_tensor_memset(s.feat, 0, 0, ggml_nbytes(s.feat));
        }
        // queued on the drafter's stream ahead of its graph; from llama.cpp's output buffer, pinned on a GPU, a copy
        // needs no staging
        const size_t layer_bytes = sizeof(float) * in.n_embd * n_tokens;
        for (int j = 0; j < in.n_extract; ++j) {
            ggml_backend_tensor_set_async(d->backend, s.feat, layers[j], s.feat->nb[2] * j, layer_bytes);
        }
        d->set_positions(s, pos0, n);
        s.compute(d->backend);
        d->n_pos = pos0 + n_tokens;
        return 0;
    });
}

// inject_layers from rows copied into the staging buffer, each layer's apart: row(j, i) is where layer j's row for
// position pos0 + i is
template <typename Row> static int32_t inject_staged(dflash_drafter * d, int32_t n_tokens, int32_t pos0, Row row) {
    const int64_t n_embd = d->info.n_embd, n_extr = d->info.n_extract;
    std::vector<const float *> layers(n_extr, nullptr);
    d->staging.resize((size_t) std::max(n_tokens, 0) * n_extr * n_embd);
    for (int64_t j = 0; j < n_extr && n_tokens > 0; ++j) {
        float * dst = d->staging.data() + j * n_tokens * n_embd;
        for (int64_t i = 0; i < n_tokens; ++i) {
            std::memcpy(dst + i * n_embd, row(j, i), sizeof(float) * n_embd);
        }
        layers[j] = dst;
    }
    return dflash_drafter_inject_layers(d, layers.data(), n_tokens, pos0);
}

int32_t dflash_drafter_inject(dflash_drafter * d, const float * features, int32_t n_tokens, int32_t pos0) {
    // rows [n_tokens, n_extract * n_embd]: a position's layers side by side
    const int64_t n_embd = d->info.n_embd, n_extr = d->info.n_extract;
    return inject_staged(d, n_tokens, pos0, [&](int64_t j, int64_t i) { return features + (i * n_extr + j) * n_embd; });
}

int32_t dflash_drafter_inject_gather(dflash_drafter * d, const float * const * layers, int32_t n_held,
                                     const int32_t * rows, int32_t n_tokens, int32_t pos0) {
    return guarded([&] {
        for (int32_t i = 0; i < n_tokens; ++i) {
            if (rows[i] < 0 || rows[i] >= n_held) {
                throw std::runtime_error("inject: row " + std::to_string(rows[i]) + " asked for, " +
                                         std::to_string(n_held) + " held");
            }
        }
        const int64_t n_embd = d->info.n_embd;
        return inject_staged(d, n_tokens, pos0, [&](int64_t j, int64_t i) { return layers[j] + rows[i] * n_embd; });
    });
}

int32_t dflash_drafter_draft(dflash_drafter * d, int32_t anchor, int32_t block_size, int32_t n_draft, int32_t n_top,
                             int32_t * out_tokens, float * out_probs, float * out_logits) {
    return guarded([&] {
        const auto &  in = d->info;
        const int32_t B  = block_size;
        const int32_t p0 = d->n_pos;
        if (B < 2 || B > in.block_size) {
            throw std::runtime_error("block size must be in 2.." + std::to_string(in.block_size) + " (the drafter's trained size)");
        }
        if (n_draft < 1 || n_draft > B - 1) {
            throw std::runtime_error("n_draft must be in 1.." + std::to_string(B - 1));
        }
        if (n_top < 1 || n_top > in.n_vocab) {
            throw std::runtime_error("n_top must be in 1.." + std::to_string(in.n_vocab));
        }
        if (anchor < 0 || anchor >= in.n_vocab) {
            throw std::runtime_error("anchor token " + std::to_string(anchor) + " is outside the vocabulary");
        }
        if (p0 + B > in.n_ctx) {
            throw std::runtime_error("draft: drafter context is full (" + std::to_string(in.n_ctx) + " positions)");
        }
        // the context attended, padded (masked) to kv_min positions doubled as often as it takes: a new graph, which
        // on a GPU is allocated and warmed up again before it is replayed, at most once each time the context doubles
        int64_t n_kv = p0 + B;
        if (d->kv_min > 0) {
            int64_t padded = d->kv_min;
            while (padded < n_kv) {
                padded *= 2;
            }
            n_kv = std::min<int64_t>(padded, in.n_ctx);
        }
        auto &        s    = d->draft_graph;
        const std::vector<int64_t> shape = { B, n_draft, n_top, n_kv };
        if (s.stale(shape)) {
            s.begin(d->backend);
            ggml_context * ctx = s.ctx;
            s.tok  = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, B);
            s.mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, B);
            ggml_set_input(s.tok);
            ggml_set_input(s.mask);
            d->new_position_inputs(ctx, s, B);

            const float   scale = 1.0f / std::sqrt((float) in.head_dim);
            ggml_tensor * x     = ggml_get_rows(ctx, d->tok_embd, s.tok);
            if (d->embd_scale != 0.0f) {
                x = ggml_scale(ctx, x, d->embd_scale);
            }
            for (int il = 0; il < in.n_layer; ++il) {
                const auto & L = d->layers[il];
                ggml_tensor * h = d->norm(ctx, x, L.attn_norm);
                ggml_tensor * q = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wq, h), in.head_dim, in.n_head, B);
                ggml_tensor * k = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wk, h), in.head_dim, in.n_head_kv, B);
                ggml_tensor * v = ggml_reshape_3d(ctx, ggml_mul_mat(ctx, L.wv, h), in.head_dim, in.n_head_kv, B);
                q = d->rope(ctx, d->norm(ctx, q, L.q_norm), s.pos);
                k = d->rope(ctx, d->norm(ctx, k, L.k_norm), s.pos);
                // the block's K/V sit after the context just for this pass; the next inject overwrites them
                d->store_kv(ctx, s, il, k, v, B);

                ggml_tensor * kc = d->k_cache[il];
                ggml_tensor * vc = d->v_cache[il];
                ggml_tensor * K  = ggml_view_3d(ctx, kc, in.head_dim, in.n_head_kv, n_kv, kc->nb[1], kc->nb[2], 0);
                ggml_tensor * V  = ggml_view_3d(ctx, vc, n_kv, in.head_dim, in.n_head_kv, vc->nb[1], vc->nb[2], 0);
                K = ggml_permute(ctx, K, 0, 2, 1, 3);                  // [hd, n_kv, n_head_kv]; V is [n_kv, hd, n_head_kv]
                q = ggml_permute(ctx, q, 0, 2, 1, 3);                  // [hd, B, n_head]

                // non-causal: every block query sees all context and the whole block; the mask hides the padding
                ggml_tensor * kq  = ggml_soft_max_ext(ctx, ggml_mul_mat(ctx, K, q), s.mask, scale, 0.0f);
                ggml_tensor * kqv = ggml_mul_mat(ctx, V, kq);          // [hd, B, n_head]
                kqv = ggml_cont_2d(ctx, ggml_permute(ctx, kqv, 0, 2, 1, 3), (int64_t) in.head_dim * in.n_head, B);
                x   = ggml_add(ctx, x, ggml_mul_mat(ctx, L.wo, kqv));

                h = d->norm(ctx, x, L.ffn_norm);
                ggml_tensor * ff = ggml_mul(ctx, ggml_silu(ctx, ggml_mul_mat(ctx, L.gate, h)), ggml_mul_mat(ctx, L.up, h));
                x = ggml_add(ctx, x, ggml_mul_mat(ctx, L.down, ff));
            }
            // positions 1..n_draft are the drafts wanted: the LM head, most of a pass's cost, runs on those rows only
            x        = ggml_view_2d(ctx, x, in.n_embd, n_draft, x->nb[1], x->nb[1]);
            s.logits = ggml_mul_mat(ctx, d->output, d->norm(ctx, x, d->output_norm));
            if (n_top == 1) {
                s.ids = ggml_argmax(ctx, s.logits);
            } else {  // the n_top likeliest tokens of each position and their probabilities, for a tree of drafts
                s.ids = ggml_top_k(ctx, s.logits, n_top);
                if (!ggml_backend_supports_op(d->backend, s.ids)) {
                    s.ids = ggml_cont(ctx, ggml_argsort_top_k(ctx, s.logits, n_top));
                }
                ggml_tensor * p = ggml_soft_max(ctx, s.logits);
                s.probs = ggml_get_rows(ctx, ggml_reshape_3d(ctx, p, 1, in.n_vocab, n_draft), s.ids);  // [1, n_top, n_draft]
                ggml_set_output(s.probs);
                ggml_build_forward_expand(s.gf, s.probs);
            }
            ggml_set_output(s.logits);
            ggml_set_output(s.ids);
            ggml_build_forward_expand(s.gf, s.ids);
            s.end(shape);
        }
        std::vector<int32_t> t(B, in.mask_token_id);
        t[0] = anchor;
        std::vector<ggml_fp16_t> mask(n_kv * B, ggml_fp32_to_fp16(-std::numeric_limits<float>::infinity()));
        for (int32_t i = 0; i < B; ++i) {
            std::fill_n(mask.begin() + i * n_kv, p0 + B, ggml_fp32_to_fp16(0.0f));
        }
        ggml_backend_tensor_set(s.tok, t.data(), 0, ggml_nbytes(s.tok));
        ggml_backend_tensor_set(s.mask, mask.data(), 0, ggml_nbytes(s.mask));
        d->set_positions(s, p0, B);
        s.compute(d->backend);
        ggml_backend_tensor_get(s.ids, out_tokens, 0, ggml_nbytes(s.ids));
        if (s.probs && out_probs) {
            ggml_backend_tensor_get(s.probs, out_probs, 0, ggml_nbytes(s.probs));
        }
        if (out_logits) {
            ggml_backend_tensor_get(s.logits, out_logits, 0, ggml_nbytes(s.logits));
        }
        return 0;
    });
}
