// A drafter GGUF's keys and tensors against the schema (dflash_schema.h, written from convert/schema.py), as
// convert/schema_check.py checks them in Python; the rules beyond the tables are listed there and kept in
// load_drafter (drafter.cpp). Everything is checked before anything is allocated from the file's numbers.
#include "common.h"
#include "dflash_schema.h"

#include "ggml.h"
#include "gguf.h"

#include <cctype>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <stdexcept>
#include <string>

namespace {

using namespace dflash_schema;

const key * find_key(const char * name) {
    for (const auto & k : keys) {
        if (std::strcmp(k.name, name) == 0) {
            return &k;
        }
    }
    return nullptr;
}

bool is_int(gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16:
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64:
            return true;
        default:
            return false;
    }
}

// Element i of an integer array, or the integer scalar (data: the value's bytes); false where it does not fit int64.
bool int_at(gguf_type t, const void * data, size_t i, int64_t & out) {
    switch (t) {
        case GGUF_TYPE_UINT8:  out = ((const uint8_t  *) data)[i]; return true;
        case GGUF_TYPE_INT8:   out = ((const int8_t   *) data)[i]; return true;
        case GGUF_TYPE_UINT16: out = ((const uint16_t *) data)[i]; return true;
        case GGUF_TYPE_INT16:  out = ((const int16_t  *) data)[i]; return true;
        case GGUF_TYPE_UINT32: out = ((const uint32_t *) data)[i]; return true;
        case GGUF_TYPE_INT32:  out = ((const int32_t  *) data)[i]; return true;
        case GGUF_TYPE_INT64:  out = ((const int64_t  *) data)[i]; return true;
        case GGUF_TYPE_UINT64: {
            const uint64_t v = ((const uint64_t *) data)[i];
            out = (int64_t) v;
            return v <= (uint64_t) INT64_MAX;
        }
        default: return false;
    }
}

const char * kind_name(kind k) {
    switch (k) {
        case kind::INT:    return "an integer";
        case kind::FLOAT:  return "a float";
        case kind::BOOL:   return "a bool";
        case kind::STRING: return "a string";
        case kind::INTS:   return "an integer array";
    }
    return "?";
}

// The names of convert/schema_check.py's messages (gguf_file.TYPE_NAMES), with their article.
const char * type_name(gguf_type t) {
    static const char * names[GGUF_TYPE_COUNT] = { "a uint8",   "an int8",  "a uint16", "an int16",  "a uint32",
                                                   "an int32",  "a float32", "a bool",  "a string",  "an array",
                                                   "a uint64",  "an int64", "a float64" };
    return t >= 0 && t < GGUF_TYPE_COUNT ? names[t] : "?";
}

std::string describe(const gguf_context * g, int64_t id) {
    const gguf_type t = gguf_get_kv_type(g, id);
    if (t == GGUF_TYPE_ARRAY) {
        const std::string elem = type_name(gguf_get_arr_type(g, id));
        return "an array of " + std::to_string(gguf_get_arr_n(g, id)) + " " + elem.substr(elem.find(' ') + 1);
    }
    return type_name(t);
}

// ggml's name of a type, in upper case as the schema (GGMLType) writes them.
std::string ggml_name(ggml_type t) {
    std::string name = ggml_type_name(t);
    for (auto & c : name) {
        c = (char) std::toupper((unsigned char) c);
    }
    return name;
}

std::string number(double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%g", v);
    return buf;
}

// The value of scalar key id as a number (bools 0 and 1), for the harmless values.
double scalar(const gguf_context * g, int64_t id) {
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(g, id);
        case GGUF_TYPE_FLOAT64: return gguf_get_val_f64(g, id);
        case GGUF_TYPE_BOOL:    return gguf_get_val_bool(g, id) ? 1.0 : 0.0;
        default: {
            int64_t v = 0;
            int_at(gguf_get_kv_type(g, id), gguf_get_val_data(g, id), 0, v);
            return (double) v;
        }
    }
}

void check_value(const gguf_context * g, int64_t id, const key & k, const std::string & where) {
    const gguf_type t  = gguf_get_kv_type(g, id);
    const bool      ok = k.type == kind::INT    ? is_int(t)
                       : k.type == kind::FLOAT  ? t == GGUF_TYPE_FLOAT32 || t == GGUF_TYPE_FLOAT64
                       : k.type == kind::BOOL   ? t == GGUF_TYPE_BOOL
                       : k.type == kind::STRING ? t == GGUF_TYPE_STRING
                       : t == GGUF_TYPE_ARRAY && is_int(gguf_get_arr_type(g, id));
    if (!ok) {
        throw std::runtime_error(where + ": " + k.name + " is " + describe(g, id) + ", expected " + kind_name(k.type) +
                                 ": the file is corrupt or was written by another tool; convert the drafter again");
    }
    if (k.type == kind::INT || k.type == kind::INTS) {
        const bool   arr  = k.type == kind::INTS;
        const size_t n    = arr ? gguf_get_arr_n(g, id) : 1;
        if (arr && n > (size_t) k.max_len) {
            throw std::runtime_error(where + ": " + k.name + " has " + std::to_string(n) + " elements, at most " +
                                     std::to_string(k.max_len));
        }
        const gguf_type et   = arr ? gguf_get_arr_type(g, id) : t;
        const void *    data = arr ? gguf_get_arr_data(g, id) : gguf_get_val_data(g, id);
        for (size_t i = 0; i < n; ++i) {
            int64_t v = 0;
            if (!int_at(et, data, i, v) || v < k.minimum || v > k.maximum) {
                throw std::runtime_error(where + ": " + k.name + " has a value outside " + std::to_string(k.minimum) +
                                         ".." + std::to_string(k.maximum));
            }
        }
    }
    if (!*k.refused) {
        return;
    }
    bool        harmless = false;
    std::string shown;
    if (k.type == kind::STRING) {
        shown    = std::string("'") + gguf_get_val_str(g, id) + "'";
        harmless = k.harmless_str && std::strcmp(gguf_get_val_str(g, id), k.harmless_str) == 0;
    } else if (k.type != kind::INTS) {
        const double v = scalar(g, id);
        shown = k.type == kind::BOOL ? (v != 0 ? "true" : "false") : number(v);
        for (int32_t i = 0; i < k.n_harmless; ++i) {
            harmless = harmless || v == k.harmless[i];
        }
    }
    if (!harmless) {
        throw std::runtime_error(where + ": " + k.name + " = " + shown + " configures " + k.refused +
                                 ", which this runtime does not implement: use a drafter made without it");
    }
}

bool in(const int32_t * types, size_t n, int32_t t) {
    for (size_t i = 0; i < n; ++i) {
        if (types[i] == t) {
            return true;
        }
    }
    return false;
}

// Whether `name` is one of the schema's tensors for n_layer layers: a global one or blk.<i>.<layer tensor>.
bool expected(const char * name, int64_t n_layer) {
    for (const auto & t : global_tensors) {
        if (std::strcmp(name, t.name) == 0) {
            return true;
        }
    }
    if (std::strncmp(name, "blk.", 4) != 0) {
        return false;
    }
    const char * p = name + 4;
    int64_t      i = 0;
    int          n = 0;
    for (; *p >= '0' && *p <= '9' && n <= 10; ++p, ++n) {
        i = i * 10 + (*p - '0');
    }
    if (n == 0 || n > 10 || (n > 1 && name[4] == '0') || *p != '.' || i >= n_layer) {
        return false;
    }
    for (const auto & t : layer_tensors) {
        if (std::strcmp(p + 1, t.name) == 0) {
            return true;
        }
    }
    return false;
}

}  // namespace

void dflash_check_keys(const gguf_context * g, const std::string & where) {
    const int64_t n_kv = gguf_get_n_kv(g);
    for (int64_t id = 0; id < n_kv; ++id) {
        const char * name = gguf_get_key(g, id);
        if (const key * k = find_key(name)) {
            check_value(g, id, *k, where);
        } else if (std::strncmp(name, "dflash.", 7) == 0) {
            throw std::runtime_error(where + ": unknown key " + name + ": not part of the dflash format this runtime "
                                     "reads (a drafter of a newer format?): update dflash-local, or use a drafter "
                                     "converted by `dflash convert drafter`");
        }
    }
    for (const auto & k : keys) {
        if (k.required && gguf_find_key(g, k.name) < 0) {
            throw std::runtime_error(where + ": missing required key " + k.name + ": the file is incomplete or not a "
                                     "drafter of this format; convert the drafter again");
        }
    }
}

bool dflash_schema_has(const char * name) { return find_key(name) != nullptr; }

double dflash_schema_default(const char * name) {
    const key * k = find_key(name);
    if (!k || !k->has_default) {
        throw std::logic_error(std::string("the schema has no default for ") + name);
    }
    return k->default_value;
}

void dflash_check_tensors(const gguf_context * g, ggml_context * meta, const int64_t (&dims)[6], int64_t n_layer,
                          const std::string & where) {
    const int64_t n_tensors = gguf_get_n_tensors(g);
    for (int64_t id = 0; id < n_tensors; ++id) {
        if (!expected(gguf_get_tensor_name(g, id), n_layer)) {
            throw std::runtime_error(where + ": unexpected tensor " + gguf_get_tensor_name(g, id) + ": it belongs to "
                                     "a feature this runtime does not implement, or to more layers than block_count " +
                                     std::to_string(n_layer));
        }
    }
    // no extras: the tensors present are expected ones, so a missing one comes within the first n_tensors + 1
    const int64_t n_global = (int64_t) std::size(global_tensors), n_per_layer = (int64_t) std::size(layer_tensors);
    for (int64_t j = 0; j < n_global + n_per_layer * n_layer; ++j) {
        const bool     global = j < n_global;
        const tensor & t      = global ? global_tensors[j] : layer_tensors[(j - n_global) % n_per_layer];
        const std::string name = global ? t.name : "blk." + std::to_string((j - n_global) / n_per_layer) + "." + t.name;
        const ggml_tensor * m = ggml_get_tensor(meta, name.c_str());
        if (!m) {
            throw std::runtime_error(where + ": " + std::to_string(n_global + n_per_layer * n_layer - n_tensors) +
                                     " tensors missing (" + name + "...) for block_count " + std::to_string(n_layer) +
                                     ": the file is incomplete or its keys are corrupt");
        }
        int64_t want[GGML_MAX_DIMS] = { 1, 1, 1, 1 };
        for (int32_t d = 0; d < t.n_dims; ++d) {
            want[d] = dims[(int) t.shape[d]];
        }
        std::string got = "[", expect = "[";
        bool        same = true;
        for (int d = 0; d < GGML_MAX_DIMS; ++d) {
            same = same && m->ne[d] == want[d];
            got += (d ? ", " : "") + std::to_string(m->ne[d]);
            expect += (d ? ", " : "") + std::to_string(want[d]);
        }
        if (!same) {
            throw std::runtime_error(where + ": tensor " + name + " has shape " + got + "], the keys give " + expect +
                                     "]");
        }
        const bool vector = t.n_dims == 1;
        const bool allowed = vector ? in(norm_types, std::size(norm_types), m->type)
                                    : in(matrix_types, std::size(matrix_types), m->type);
        if (!allowed) {
            throw std::runtime_error(where + ": tensor " + name + " is " + ggml_name(m->type) +
                                     (vector ? ", expected F32" : ", a type this runtime does not multiply by"));
        }
    }
}
