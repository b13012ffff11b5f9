"""Small reference models in dense form, used by the demo, the tests and the benchmarks."""

from tpext.models.llama import PRESETS, LlamaConfig, LlamaForCausalLM

__all__ = ["LlamaConfig", "LlamaForCausalLM", "PRESETS"]
