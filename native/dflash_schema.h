// The `dflash` GGUF schema's tables for the C++ loader (native/schema.cpp), written by convert/schema_header.py
// from convert/schema.py, which documents them: do not edit, change the schema and run (see schema_header.py)
//     python -P -m dflash_local.convert.schema_header > native/dflash_schema.h
#pragma once

#include <cstdint>

namespace dflash_schema {

enum class kind { INT, FLOAT, BOOL, STRING, INTS };
enum class dim { EMBD, FEATURES, Q, KV, HEAD, FF };

struct key {
    const char * name;
    kind         type;
    bool         required;
    bool         has_default;
    double       default_value;
    int64_t      minimum, maximum;  // INT and each element of INTS
    int32_t      max_len;           // INTS: the most elements
    const char * refused;           // the feature it configures, refused unless harmless ("": none)
    int32_t      n_harmless;        // harmless numbers (bools as 0 and 1) ...
    double       harmless[2];
    const char * harmless_str;      // ... or harmless string (nullptr: none)
};

struct tensor {
    const char * name;  // per-layer tensors without their "blk.<i>." prefix
    int32_t      n_dims;
    dim          shape[2];  // ggml order: ne[0] first
};

inline constexpr const char * arch              = "dflash";
inline constexpr const char * mask_key          = "tokenizer.ggml.mask_token_id";
inline constexpr int32_t      max_target_layers = 64;
inline constexpr int32_t      max_block_size    = 64;

inline constexpr key keys[] = {
    { "dflash.embedding_length", kind::INT, true, false, 0.0, 1, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.block_count", kind::INT, true, false, 0.0, 1, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.feed_forward_length", kind::INT, true, false, 0.0, 1, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.attention.head_count", kind::INT, true, false, 0.0, 1, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.attention.head_count_kv", kind::INT, false, false, 0.0, 1, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.attention.key_length", kind::INT, false, false, 0.0, 2, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.attention.value_length", kind::INT, false, false, 0.0, 1, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.attention.layer_norm_rms_epsilon", kind::FLOAT, true, false, 0.0, 0, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.rope.freq_base", kind::FLOAT, false, true, 10000.0, 0, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.rope.dimension_count", kind::INT, false, false, 0.0, 1, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.rope.dimension_sections", kind::INTS, false, false, 0.0, 0, 2147483647, 4, "", 0, {}, nullptr },
    { "dflash.target_layers", kind::INTS, true, false, 0.0, 1, 2147483647, 64, "", 0, {}, nullptr },
    { "dflash.block_size", kind::INT, false, true, 16.0, 2, 64, 0, "", 0, {}, nullptr },
    { "dflash.embedding_scale", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "", 0, {}, nullptr },
    { "tokenizer.ggml.mask_token_id", kind::INT, true, false, 0.0, 0, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.context_length", kind::INT, false, false, 0.0, 0, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.vocab_size", kind::INT, false, false, 0.0, 0, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.rope.scaling.original_context_length", kind::INT, false, false, 0.0, 0, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.rope.scaling.finetuned", kind::BOOL, false, false, 0.0, 0, 2147483647, 0, "", 0, {}, nullptr },
    { "dflash.attention.causal", kind::BOOL, false, false, 0.0, 0, 2147483647, 0, "causal attention inside the block", 1, {0.0}, nullptr },
    { "dflash.attention.sliding_window", kind::INT, false, false, 0.0, 0, 2147483647, 0, "sliding-window attention", 1, {0.0}, nullptr },
    { "dflash.attention.scale", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "a custom attention scale", 1, {0.0}, nullptr },
    { "dflash.attention.output_scale", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "scaled attention output", 1, {1.0}, nullptr },
    { "dflash.attention.value_scale", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "scaled attention values", 2, {0.0, 1.0}, nullptr },
    { "dflash.attention.clamp_kqv", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "clamped Q/K/V", 1, {0.0}, nullptr },
    { "dflash.attention.max_alibi_bias", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "ALiBi position biases", 1, {0.0}, nullptr },
    { "dflash.attention.layer_norm_epsilon", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "LayerNorm (this runtime has RMSNorm only)", 0, {}, nullptr },
    { "dflash.attn_logit_softcapping", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "attention soft-capping", 1, {0.0}, nullptr },
    { "dflash.final_logit_softcapping", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "logit soft-capping", 1, {0.0}, nullptr },
    { "dflash.logit_scale", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "logit scaling", 1, {1.0}, nullptr },
    { "dflash.residual_scale", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "residual scaling", 1, {1.0}, nullptr },
    { "dflash.use_parallel_residual", kind::BOOL, false, false, 0.0, 0, 2147483647, 0, "parallel residual blocks", 1, {0.0}, nullptr },
    { "dflash.hidden_activation", kind::STRING, false, false, 0.0, 0, 2147483647, 0, "an MLP activation other than silu", 0, {}, "silu" },
    { "dflash.rope.scaling.type", kind::STRING, false, false, 0.0, 0, 2147483647, 0, "RoPE scaling", 0, {}, "none" },
    { "dflash.rope.scaling.factor", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "RoPE scaling", 2, {0.0, 1.0}, nullptr },
    { "dflash.rope.scale_linear", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "RoPE scaling", 1, {1.0}, nullptr },
    { "dflash.rope.scaling.attn_factor", kind::FLOAT, false, false, 0.0, 0, 2147483647, 0, "RoPE attention scaling", 1, {1.0}, nullptr },
    { "dflash.expert_count", kind::INT, false, false, 0.0, 0, 2147483647, 0, "a mixture of experts", 1, {0.0}, nullptr },
    { "dflash.hyper_connection_count", kind::INT, false, false, 0.0, 0, 2147483647, 0, "hyper-connections", 1, {0.0}, nullptr },
    { "dflash.conv_kernel_size", kind::INT, false, false, 0.0, 0, 2147483647, 0, "DFlash2 convolutions", 0, {}, nullptr },
    { "dflash.conv_group_size", kind::INT, false, false, 0.0, 0, 2147483647, 0, "DFlash2 convolutions", 0, {}, nullptr },
    { "dflash.selector_rank", kind::INT, false, false, 0.0, 0, 2147483647, 0, "DFlash2 selectors", 0, {}, nullptr },
    { "dflash.selector_top_k", kind::INT, false, false, 0.0, 0, 2147483647, 0, "DFlash2 selectors", 0, {}, nullptr },
};

inline constexpr tensor global_tensors[] = {
    { "fc.weight", 2, { dim::FEATURES, dim::EMBD } },
    { "enc.output_norm.weight", 1, { dim::EMBD } },
    { "output_norm.weight", 1, { dim::EMBD } },
};
inline constexpr tensor layer_tensors[] = {
    { "attn_norm.weight", 1, { dim::EMBD } },
    { "attn_q.weight", 2, { dim::EMBD, dim::Q } },
    { "attn_k.weight", 2, { dim::EMBD, dim::KV } },
    { "attn_v.weight", 2, { dim::EMBD, dim::KV } },
    { "attn_output.weight", 2, { dim::Q, dim::EMBD } },
    { "attn_q_norm.weight", 1, { dim::HEAD } },
    { "attn_k_norm.weight", 1, { dim::HEAD } },
    { "ffn_norm.weight", 1, { dim::EMBD } },
    { "ffn_gate.weight", 2, { dim::EMBD, dim::FF } },
    { "ffn_up.weight", 2, { dim::EMBD, dim::FF } },
    { "ffn_down.weight", 2, { dim::FF, dim::EMBD } },
};

// ggml types (enum ggml_type) of vectors and of matrices
inline constexpr int32_t norm_types[]   = { 0 };
inline constexpr int32_t matrix_types[] = { 0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30 };

}  // namespace dflash_schema
