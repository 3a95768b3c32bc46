// Version and device queries, and the per-thread error message shared by the helper.
#include "dflash.h"
#include "common.h"

#include "ggml-backend.h"
#include "ggml.h"

#include <cstdio>
#include <cstdlib>
#include <string>

static thread_local std::string g_last_error;

void dflash_set_error(const std::string & msg) { g_last_error = msg; }

const char * dflash_last_error(void) { return g_last_error.c_str(); }

const char * dflash_ggml_build_version(void) { return DFLASH_GGML_VERSION; }

void dflash_quiet_log(int level, const char * text, void * /*user_data*/) {
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

const char * dflash_devices(void) {
    static std::string names;
    names.clear();
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        if (!names.empty()) {
            names += ",";
        }
        names += ggml_backend_dev_name(ggml_backend_dev_get(i));
    }
    return names.c_str();
}

int32_t dflash_ggml_type_size(int32_t type, int64_t * block, int64_t * bytes) {
    if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type) <= 0) {
        return -1;  // unknown, or a type ggml removed (its slot has no block size)
    }
    *block = ggml_blck_size((ggml_type) type);
    *bytes = (int64_t) ggml_type_size((ggml_type) type);
    return 0;
}

// A failed GGML_ASSERT (ggml_abort): one error line and exit code 1 instead of a backtrace and SIGABRT.
static void exit_with_error(const char * message) {
    std::fprintf(stderr, "error: llama.cpp stopped on a failed check (%s): the model file is probably damaged or of a "
                         "kind this llama.cpp cannot run\n", message);
    std::fflush(stderr);
    std::_Exit(1);
}

void dflash_exit_on_ggml_abort(void) { ggml_set_abort_callback(exit_with_error); }
