"""Drafter format conversion: Hugging Face DFlash checkpoints <-> GGUF (architecture `dflash`).

`schema` declares the `dflash` GGUF format (keys, tensors, what is refused), `schema_check` checks a file against it
(the C++ loader against native/dflash_schema.h, which `schema_header` writes from it); `hf.convert_hf_to_gguf`
converts a checkpoint; `gguf_io.load_drafter_gguf` / `gguf_io.save_drafter_gguf` read and write `dflash` GGUFs as
reference drafters; `gguf_target` reads what they must agree with in the target without torch; `cli` is
`dflash convert`. Failures raise `ConversionError` (dflash_local.errors, also in gguf_target) with a message for the
user.
"""
