"""`dflash train`: a DFlash drafter for any GGUF target, trained on the target's own answers.

prompts -> data (the target answers and its hidden states are stored) -> trainer (torch) -> export (GGUF)
-> evaluate (acceptance length with our engine).
"""
