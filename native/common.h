// Internal helpers shared by the native sources (not part of the C API).
#pragma once

#include <string>

void dflash_set_error(const std::string & msg);
