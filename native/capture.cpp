// Hidden-state capture through llama.cpp's eval callback. The scheduler asks, for every graph node,
// whether we want it (ask=true); for the nodes we do, it computes up to there, synchronizes and calls
// again (ask=false) so we can copy the data. We want only `l_out-(L-1)` for the drafter's GGUF target
// layers L: the output of decoder layer L-1, i.e. HF hidden_states[L].
#include "dflash.h"
#include "common.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

struct dflash_capture {
    int32_t              n_embd;
    std::vector<int32_t> node_layers;  // llama.cpp layer index il = L-1, one per extracted layer
    std::vector<float>   rows;         // [n_rows, n_extract * n_embd]
    std::vector<float>   scratch;      // one node's data, before scattering into its column block
    int32_t              n_rows   = 0; // rows complete in every column block
    int32_t              n_seen   = 0; // column blocks filled for the current ubatch
    int32_t              ub_rows  = 0; // rows of the current ubatch
    bool                 enabled  = true;
    bool                 failed   = false;
    double               seconds  = 0.0;
};

dflash_capture * dflash_capture_new(int32_t n_embd, const int32_t * target_layers, int32_t n_layers) {
    if (n_embd <= 0 || n_layers <= 0) {
        dflash_set_error("capture needs n_embd > 0 and at least one target layer");
        return nullptr;
    }
    auto * cap = new dflash_capture();
    cap->n_embd = n_embd;
    for (int32_t i = 0; i < n_layers; ++i) {
        if (target_layers[i] < 1) {
            dflash_set_error("target layer ids start at 1 (GGUF convention: input of layer L)");
            delete cap;
            return nullptr;
        }
        for (int32_t k = 0; k < i; ++k) {
            if (target_layers[k] == target_layers[i]) {
                dflash_set_error("target layer ids repeat: " + std::to_string(target_layers[i]));
                delete cap;
                return nullptr;
            }
        }
        cap->node_layers.push_back(target_layers[i] - 1);
    }
    return cap;
}

void dflash_capture_free(dflash_capture * cap) { delete cap; }

void dflash_capture_reset(dflash_capture * cap) {
    cap->n_rows  = 0;
    cap->n_seen  = 0;
    cap->ub_rows = 0;
    cap->failed  = false;
}

void dflash_capture_enable(dflash_capture * cap, bool enabled) { cap->enabled = enabled; }

int32_t dflash_capture_n_rows(const dflash_capture * cap) { return cap->failed ? -1 : cap->n_rows; }

const float * dflash_capture_data(const dflash_capture * cap) { return cap->rows.data(); }

int32_t dflash_capture_rows_f16(const dflash_capture * cap, uint16_t * out) {
    if (cap->failed) {
        return -1;
    }
    ggml_cpu_fp32_to_fp16(cap->rows.data(), reinterpret_cast<ggml_fp16_t *>(out),
                          (int64_t) cap->n_rows * (int64_t) cap->node_layers.size() * cap->n_embd);
    return cap->n_rows;
}

double dflash_capture_seconds(const dflash_capture * cap) { return cap->seconds; }

// Column block of node `name`, or -1 when it is not one of ours.
static int column_of(const dflash_capture * cap, const char * name) {
    if (std::strncmp(name, "l_out-", 6) != 0) {
        return -1;
    }
    char * end = nullptr;
    const long il = std::strtol(name + 6, &end, 10);
    if (end == name + 6 || *end != '\0') {
        return -1;
    }
    for (size_t j = 0; j < cap->node_layers.size(); ++j) {
        if (cap->node_layers[j] == il) {
            return (int) j;
        }
    }
    return -1;
}

static void copy_node(dflash_capture * cap, const ggml_tensor * t, int col) {
    const int64_t n_embd  = cap->n_embd;
    const int64_t n_extr  = (int64_t) cap->node_layers.size();
    const int64_t n_tok   = t->ne[1];
    if (t->type != GGML_TYPE_F32 || t->ne[0] != n_embd || !ggml_is_contiguous(t)) {
        dflash_set_error(std::string("captured node ") + t->name + " is not a contiguous f32 [n_embd, n_tokens] tensor");
        cap->failed = true;
        return;
    }
    if (cap->n_seen == 0) {
        cap->ub_rows = (int32_t) n_tok;
        cap->rows.resize((size_t) (cap->n_rows + n_tok) * n_extr * n_embd);
    } else if (n_tok != cap->ub_rows) {
        // the last layer is trimmed to output rows; the drafter must not read it
        dflash_set_error(std::string("captured node ") + t->name + " has fewer rows than the ubatch");
        cap->failed = true;
        return;
    }
    cap->scratch.resize((size_t) n_tok * n_embd);
    ggml_backend_tensor_get(t, cap->scratch.data(), 0, ggml_nbytes(t));
    float * dst = cap->rows.data() + (size_t) cap->n_rows * n_extr * n_embd + (size_t) col * n_embd;
    for (int64_t r = 0; r < n_tok; ++r) {
        std::memcpy(dst + r * n_extr * n_embd, cap->scratch.data() + r * n_embd, n_embd * sizeof(float));
    }
    if (++cap->n_seen == (int32_t) n_extr) {
        cap->n_rows += (int32_t) n_tok;
        cap->n_seen = 0;
    }
}

bool dflash_capture_eval(ggml_tensor * t, bool ask, void * user_data) {
    auto * cap = static_cast<dflash_capture *>(user_data);
    if (!cap->enabled) {
        return !ask;
    }
    const int col = column_of(cap, t->name);
    if (ask) {
        return col >= 0;
    }
    if (col >= 0 && !cap->failed) {
        const auto t0 = std::chrono::steady_clock::now();
        copy_node(cap, t, col);
        cap->seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return true;
}
