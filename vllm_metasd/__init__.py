"""vllm-metasd: MetaSD multi-drafter speculative decoding as a vLLM plugin.

Importing this package does not import vLLM: the bandit/reward core
(``vllm_metasd.core``) and the config (``vllm_metasd.config``) are usable
and testable on their own.
"""
__version__ = "0.1.0"
