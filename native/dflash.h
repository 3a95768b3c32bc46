// dflash-local native helper: hidden-state capture for the target (through llama.cpp's eval
// callback) and the DFlash drafter on ggml. Plain C API, called from Python through ctypes.
// Functions that can fail return NULL or a negative value; dflash_last_error() says why.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;

// ggml version the helper was compiled against (the loaded libggml reports its own via ggml_version()).
const char * dflash_ggml_build_version(void);
// Names of the ggml devices the loaded backends expose, comma separated ("CPU", "CUDA0", ...).
const char * dflash_devices(void);
// Message of the last failed call on this thread ("" if none).
const char * dflash_last_error(void);
// Elements per block and bytes per block of a ggml type (enum ggml_type) of the ggml compiled against; -1 for a type it
// does not know, so that GGUF files can be checked before ggml reads them.
int32_t      dflash_ggml_type_size(int32_t type, int64_t * block, int64_t * bytes);
// From now on a failed GGML_ASSERT in ggml or llama.cpp prints one "error: ..." line to stderr and exits with code 1
// (_Exit: nothing else runs) instead of printing a backtrace and aborting: for a command line, not for a library.
void         dflash_exit_on_ggml_abort(void);
// A log sink for llama_log_set (a ggml_log_callback; level: enum ggml_log_level): errors only, to stderr. In C, so that
// no Python runs inside llama.cpp's calls: it logs several lines per decode, and a Ctrl-C that lands in a Python log
// callback is lost (ctypes reports the KeyboardInterrupt raised there and drops it).
void         dflash_quiet_log(int level, const char * text, void * user_data);

// ---- capture --------------------------------------------------------------------------------
// Collects the rows of graph nodes `l_out-(L-1)` for the GGUF target layers L in batch order, across ubatches, each
// layer's rows apart ([n_rows, n_embd]): through the eval callback, or pulled from llama.cpp's layer-input capture
// (the same tensors: layer L's input is layer L-1's output).
typedef struct dflash_capture dflash_capture;

dflash_capture * dflash_capture_new(int32_t n_embd, const int32_t * target_layers, int32_t n_layers);
void             dflash_capture_free(dflash_capture * cap);
// The ggml_backend_sched_eval_callback; user_data is the dflash_capture.
bool             dflash_capture_eval(struct ggml_tensor * t, bool ask, void * user_data);
// Rows that llama.cpp's own layer-input capture extracted in one llama_decode (layers[j]: [n_rows, n_embd] in batch
// order, the input of GGUF target layer target_layers[j]), appended to the captured rows as the callback appends
// them; nothing while paused. For architectures whose graph records its layer inputs: no graph split, no
// synchronization inside the pass. Returns the rows held.
int32_t          dflash_capture_pull(dflash_capture * cap, const float * const * layers, int32_t n_rows);
// Forget captured rows; call before each llama_decode whose features are wanted.
void             dflash_capture_reset(dflash_capture * cap);
// Pause or resume capturing (paused: no node is asked for, so the target runs unsplit).
void             dflash_capture_enable(dflash_capture * cap, bool enabled);
int32_t          dflash_capture_n_rows(const dflash_capture * cap);
// The rows interleaved, [n_rows, n_layers * n_embd] (row r: its layers side by side), made when asked for.
const float *    dflash_capture_data(dflash_capture * cap);
// Layer j's rows, [n_rows, n_embd] (j in target_layers' order): what dflash_drafter_inject_layers reads.
const float *    dflash_capture_layer(const dflash_capture * cap, int32_t j);
// The same rows as float8 e4m3 (the training data's format, half the room of float16): each layer's n_embd
// values of a row divided by their largest magnitude / 448 (e4m3's largest finite value), that divisor into
// scales (n_rows * n_extract), the codes into out (n_rows * n_extract * n_embd bytes), rounded to nearest even.
// Here, not in numpy: numpy's float16 conversion alone took a fifth of the capture time on an H200 host.
// Returns n_rows.
int32_t          dflash_capture_rows_e4m3(const dflash_capture * cap, uint8_t * out, float * scales);
// Seconds spent inside the callback's copies since creation (for the benchmark).
double           dflash_capture_seconds(const dflash_capture * cap);

// ---- the target's greedy pick ------------------------------------------------------------------
struct llama_sampler;
// A llama.cpp backend sampler (for a sampler chain, then llama_set_sampler) that picks the argmax of every output row of
// a pass in one two-stage argmax over all rows (a plain one on a device without the stages' ops), where llama.cpp's
// greedy sampler runs one single-block argmax per row; the first of equal maxima, as llama.cpp's greedy sampler on the
// CPU. native/greedy.cpp says how.
struct llama_sampler * dflash_greedy_sampler_new(void);
// Another greedy sampler sharing other's picks (other: one of these): set on other sequences, e.g. a tree's branches, the
// rows of a pass are all picked in one argmax whichever sequence each belongs to. Each is freed on its own.
struct llama_sampler * dflash_greedy_sampler_share(const struct llama_sampler * other);

// ---- drafter --------------------------------------------------------------------------------
typedef struct dflash_drafter dflash_drafter;

typedef struct {
    int32_t n_embd, n_vocab, n_layer, n_head, n_head_kv, head_dim, n_ff;
    int32_t n_extract, block_size, mask_token_id, n_ctx;
    int32_t target_layers[64];
} dflash_drafter_info;

// Loads a `dflash` GGUF plus the target's token_embd/output tensors from the target GGUF.
// device: a ggml device name ("CPU", "CUDA0", "Metal"...) or NULL for the CPU.
// n_ctx: most context positions the drafter cache holds.
dflash_drafter * dflash_drafter_load(const char * drafter_path, const char * target_path,
                                     const char * device, int32_t n_ctx, int32_t n_threads);
void             dflash_drafter_free(dflash_drafter * d);
int32_t          dflash_drafter_get_info(const dflash_drafter * d, dflash_drafter_info * out);
// Graphs kept between calls while their shape holds (a GPU replays one as a CUDA graph): a draft attends over its
// context padded to kv_min positions doubled as often as it takes (the rest masked; kv_min 0: exact), so that its graph
// changes at most once each time the context doubles; an injection of fewer than inject_rows rows runs as inject_rows
// (the extra rows land where the next draft writes its block; 1: exact). Set at load: 256 and the block size on GPUs,
// 0 and 1 on the CPU, where a padded row costs its compute and a new graph little.
int32_t          dflash_drafter_set_shapes(dflash_drafter * d, int32_t kv_min, int32_t inject_rows);
// Context path: features [n_tokens, n_extract * n_embd] for positions pos0 .. pos0+n_tokens-1
// become K/V in the cache; the cache then holds positions 0 .. pos0+n_tokens-1.
int32_t          dflash_drafter_inject(dflash_drafter * d, const float * features, int32_t n_tokens, int32_t pos0);
// The same with each extracted layer's rows apart: layers[j] is [n_tokens, n_embd] (as llama.cpp's layer-input
// extraction leaves them), read until the call returns.
int32_t          dflash_drafter_inject_layers(dflash_drafter * d, const float * const * layers, int32_t n_tokens,
                                              int32_t pos0);
// The same for rows picked out of each layer's [n_held, n_embd] rows (a tree's accepted path): row rows[i] for
// position pos0 + i.
int32_t          dflash_drafter_inject_gather(dflash_drafter * d, const float * const * layers, int32_t n_held,
                                              const int32_t * rows, int32_t n_tokens, int32_t pos0);
// Keep only positions < n_pos.
int32_t          dflash_drafter_crop(dflash_drafter * d, int32_t n_pos);
int32_t          dflash_drafter_n_pos(const dflash_drafter * d);
// Block path at position p0 = n_pos: [anchor, MASK x (block_size-1)] -> the n_top likeliest tokens of
// positions 1..n_draft (n_draft <= block_size-1; the whole block attends as always, only the LM head is cut) into
// out_tokens ([n_draft][n_top] ids: the argmax for n_top 1, else in no particular order) and, for n_top > 1, their
// probabilities into out_probs (if not NULL). out_logits, if not NULL, receives the logits [n_draft, n_vocab]
// (tests only). The block's K/V do not stay in the cache.
int32_t          dflash_drafter_draft(dflash_drafter * d, int32_t anchor, int32_t block_size, int32_t n_draft,
                                      int32_t n_top, int32_t * out_tokens, float * out_probs, float * out_logits);

#ifdef __cplusplus
}
#endif
