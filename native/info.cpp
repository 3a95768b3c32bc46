// Version and device queries, and the per-thread error message shared by the helper.
#include "dflash.h"
#include "common.h"

#include "ggml-backend.h"

#include <string>

static thread_local std::string g_last_error;

void dflash_set_error(const std::string & msg) { g_last_error = msg; }

const char * dflash_last_error(void) { return g_last_error.c_str(); }

const char * dflash_ggml_build_version(void) { return DFLASH_GGML_VERSION; }

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
