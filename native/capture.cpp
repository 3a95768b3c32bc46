// Hidden-state capture through llama.cpp's eval callback. The scheduler asks, for every graph node,
// whether we want it (ask=true); for the nodes we do, it computes up to there, synchronizes and calls
// again (ask=false) so we can copy the data. We want only `l_out-(L-1)` for the drafter's GGUF target
// layers L: the output of decoder layer L-1, i.e. HF hidden_states[L]. Each wanted node splits the graph
// there (on a GPU: a synchronization, and the CUDA graph in pieces), so where llama.cpp can extract layer
// inputs itself (its graph marks them as outputs), the rows are pulled from there instead (dflash_capture_pull).
#include "dflash.h"
#include "common.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

struct dflash_capture {
    int32_t                         n_embd;
    std::vector<int32_t>            node_layers;  // llama.cpp layer index il = L-1, one per extracted layer
    // each extracted layer's rows apart ([n_rows, n_embd] each), as llama.cpp hands them over and as the drafter's
    // injection reads them; interleaved into `rows` only when something reads them so (trees, training)
    std::vector<std::vector<float>> layers;
    std::vector<float>              rows;          // [n_rows, n_extract * n_embd], valid for n_interleaved rows
    int32_t                         n_interleaved = 0;
    int32_t                         n_rows   = 0;  // rows complete in every layer
    int32_t                         n_seen   = 0;  // layers filled for the current ubatch
    int32_t                         ub_rows  = 0;  // rows of the current ubatch
    bool                            enabled  = true;
    bool                            failed   = false;
    double                          seconds  = 0.0;
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
    cap->layers.resize(n_layers);
    return cap;
}

void dflash_capture_free(dflash_capture * cap) { delete cap; }

void dflash_capture_reset(dflash_capture * cap) {
    cap->n_rows  = 0;
    cap->n_interleaved = 0;
    cap->n_seen  = 0;
    cap->ub_rows = 0;
    cap->failed  = false;
}

void dflash_capture_enable(dflash_capture * cap, bool enabled) { cap->enabled = enabled; }

int32_t dflash_capture_n_rows(const dflash_capture * cap) { return cap->failed ? -1 : cap->n_rows; }

const float * dflash_capture_data(dflash_capture * cap) {
    const int64_t n_embd = cap->n_embd;
    const int64_t n_extr = (int64_t) cap->layers.size();
    cap->rows.resize((size_t) cap->n_rows * n_extr * n_embd);
    for (int64_t r = cap->n_interleaved; r < cap->n_rows; ++r) {
        for (int64_t j = 0; j < n_extr; ++j) {
            std::memcpy(cap->rows.data() + (r * n_extr + j) * n_embd, cap->layers[j].data() + r * n_embd,
                        sizeof(float) * n_embd);
        }
    }
    cap->n_interleaved = cap->n_rows;
    return cap->rows.data();
}

const float * dflash_capture_layer(const dflash_capture * cap, int32_t j) { return cap->layers[j].data(); }

// float8 e4m3 (1 sign, 4 exponent bits of bias 7, 3 mantissa bits, no infinities) of x clamped to +-448, rounded to
// nearest even, as torch's float8_e4m3fn
static uint8_t to_e4m3(float x) {
    const float a = std::min(std::fabs(x), 448.0f);
    uint32_t    bx, b, sub;
    std::memcpy(&bx, &x, sizeof bx);
    std::memcpy(&b, &a, sizeof b);
    // normal: the 23 mantissa bits rounded to 3 (ties to even) with the exponent, rebiased from 127 to 7
    const uint32_t normal = ((b + 0x7ffffu + ((b >> 20) & 1)) >> 20) - ((127 - 7) << 3);
    // below 2^-6, subnormal steps of 2^-9: adding 2^23 rounds a * 512 to an integer, ties to even
    const float s = a * 512.0f + 8388608.0f;
    std::memcpy(&sub, &s, sizeof sub);
    const uint32_t is_sub = 0u - (uint32_t) (a < 0.015625f);  // a mask, not a branch: 1.5x faster
    return (uint8_t) (((bx >> 24) & 0x80) | (sub & is_sub) | (normal & ~is_sub));
}

// n values as e4m3 codes of x / scale, scale = their largest magnitude / 448
static float encode_e4m3(const float * x, int64_t n, uint8_t * out) {
    float max = 0.0f;
    for (int64_t k = 0; k < n; ++k) {
        max = std::max(max, std::fabs(x[k]));
    }
    const float scale = max > 0.0f ? max / 448.0f : 1.0f;
    for (int64_t k = 0; k < n; ++k) {
        out[k] = to_e4m3(x[k] / scale);
    }
    return scale;
}

int32_t dflash_capture_rows_e4m3(const dflash_capture * cap, uint8_t * out, float * scales) {
    if (cap->failed) {
        return -1;
    }
    const int64_t n_embd = cap->n_embd;
    const int64_t n_extr = (int64_t) cap->layers.size();
    const int64_t n      = (int64_t) cap->n_rows * n_extr;  // one scale each: row i / n_extr, layer i % n_extr
    // on several threads: one took 3.3 ns a value on the dev CPU: some 100 s for the 10.9 M positions that an H100
    // captured in 228 s
    const int64_t            n_threads = std::clamp<int64_t>(std::thread::hardware_concurrency(), 1, 8);
    std::vector<std::thread> threads;
    for (int64_t t = 0; t < n_threads; ++t) {
        threads.emplace_back([=] {
            for (int64_t i = n * t / n_threads; i < n * (t + 1) / n_threads; ++i) {
                const float * x = cap->layers[i % n_extr].data() + (i / n_extr) * n_embd;
                scales[i]       = encode_e4m3(x, n_embd, out + i * n_embd);
            }
        });
    }
    for (auto & th : threads) {
        th.join();
    }
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

// room for n_tok more rows in every layer, after the n_rows complete ones
static void grow(dflash_capture * cap, int64_t n_tok) {
    for (auto & layer : cap->layers) {
        layer.resize((size_t) (cap->n_rows + n_tok) * cap->n_embd);
    }
}

// where layer j's next rows go
static float * next_rows(dflash_capture * cap, int64_t j) {
    return cap->layers[j].data() + (size_t) cap->n_rows * cap->n_embd;
}

static void copy_node(dflash_capture * cap, const ggml_tensor * t, int col) {
    const int64_t n_embd  = cap->n_embd;
    const int64_t n_extr  = (int64_t) cap->layers.size();
    const int64_t n_tok   = t->ne[1];
    if (t->type != GGML_TYPE_F32 || t->ne[0] != n_embd || !ggml_is_contiguous(t)) {
        dflash_set_error(std::string("captured node ") + t->name + " is not a contiguous f32 [n_embd, n_tokens] tensor");
        cap->failed = true;
        return;
    }
    if (cap->n_seen == 0) {
        cap->ub_rows = (int32_t) n_tok;
        grow(cap, n_tok);
    } else if (n_tok != cap->ub_rows) {
        // the last layer is trimmed to output rows; the drafter must not read it
        dflash_set_error(std::string("captured node ") + t->name + " has fewer rows than the ubatch");
        cap->failed = true;
        return;
    }
    ggml_backend_tensor_get(t, next_rows(cap, col), 0, ggml_nbytes(t));
    if (++cap->n_seen == (int32_t) n_extr) {
        cap->n_rows += (int32_t) n_tok;
        cap->n_seen = 0;
    }
}

int32_t dflash_capture_pull(dflash_capture * cap, const float * const * layers, int32_t n_rows) {
    if (!cap->enabled || cap->failed || n_rows <= 0) {
        return cap->failed ? -1 : cap->n_rows;
    }
    const auto    t0     = std::chrono::steady_clock::now();
    grow(cap, n_rows);
    for (size_t j = 0; j < cap->layers.size(); ++j) {
        std::memcpy(next_rows(cap, (int64_t) j), layers[j], sizeof(float) * n_rows * cap->n_embd);
    }
    cap->n_rows += n_rows;
    cap->seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return cap->n_rows;
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
