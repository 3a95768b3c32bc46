"""`dflash bench`: target-only vs DFlash (and optionally upstream llama.cpp) on the same prompts."""
