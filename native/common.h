// Internal helpers shared by the native sources (not part of the C API).
#pragma once

#include <cstdint>
#include <string>

struct gguf_context;
struct ggml_context;

void dflash_set_error(const std::string & msg);

// schema.cpp: a drafter GGUF against the schema (dflash_schema.h); each throws std::runtime_error naming the key or
// tensor, prefixed with `where`.
// Every key: unknown dflash.* keys, refused features, missing required keys, wrong types, values out of range.
void   dflash_check_keys(const gguf_context * g, const std::string & where);
// Whether the schema has the key; the default of a key that has one in the schema.
bool   dflash_schema_has(const char * name);
double dflash_schema_default(const char * name);
// Exactly the schema's tensors for n_layer layers, of the shapes of dims (indexed by dflash_schema::dim) and the
// types the schema allows; meta: the file's tensors as gguf_init_from_file gives them (no data).
void   dflash_check_tensors(const gguf_context * g, ggml_context * meta, const int64_t (&dims)[6], int64_t n_layer,
                            const std::string & where);
