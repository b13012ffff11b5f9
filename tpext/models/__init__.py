"""Small reference models in dense form, used by the demo, the tests and the benchmarks."""

from tpext.models.llama import LlamaConfig, LlamaForCausalLM, PRESETS

__all__ = ["LlamaConfig", "LlamaForCausalLM", "PRESETS"]
