"""Drafter format conversion: Hugging Face DFlash checkpoints <-> GGUF (architecture `dflash`).

`hf.convert_hf_to_gguf` converts a checkpoint; `gguf_io.load_drafter_gguf` / `gguf_io.save_drafter_gguf` read
and write `dflash` GGUFs as reference drafters; `gguf_target` reads what they must agree with in the target
without torch; `cli` is `dflash convert`. Failures raise `gguf_target.ConversionError` with a message for the user.
"""
